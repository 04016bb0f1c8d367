"""The ``dpo`` algorithm: DPO for masked diffusion LMs with Monte-Carlo ELBO likelihoods.

The loss (``loss.py``) is -log sigmoid(beta * s) with the preference score s built from ELBO
estimates of policy and reference (``dare.elbo``). Plain DPO draws ``n_mc`` iid timesteps
(one mask each) and scores the reference on masks independent of the policy's; the
``stratified`` and ``antithetic`` switches turn on VRPO's variance reductions one at a time
(the ``vrpo`` plugin has both on). Units are (chosen, rejected) row pairs of preference data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import dare
from dare.elbo import draw_masks
from dare.protocol import TokenBatch
from dare.registry import Algorithm, ModelFamily

from .loss import check_pairs, dpo_loss, elbo_preference_loss, pair_seeds

__all__ = ["DPOConfig", "dpo", "dpo_loss", "elbo_preference_loss", "model_config", "pair_seeds"]


@dataclass
class DPOConfig:
    """Options of ``algorithm: {name: dpo, ...}``.

    beta: DPO temperature on the ELBO log-ratio.
    n_mc: Monte-Carlo samples per ELBO (one mask per timestep).
    stratified: one timestep in each of n_mc equal strata instead of iid timesteps.
    antithetic: score the reference on the policy's masks (VRPO) instead of independent ones.
    estimator: "count" (mask exactly l ~ U{1..R} tokens, weight R/l) or "time" (mask each
        token with probability t, weight 1/t); see ``dare.elbo``.
    eps: lower bound of t for the "time" estimator.
    mc_chunk: samples per forward (0 = all n_mc at once); smaller bounds memory.
    length_normalize: divide each ELBO by its number of response tokens (DARE's scale).
    couple_pairs: draw the rejected response's masks from the chosen one's seed, so both are
        masked at the same positions (``loss.pair_seeds``): unbiased, much lower variance of
        the preference score when the two responses share most tokens. Off by default (the
        papers draw them independently).
    eval_antithetic: when the model is in eval mode (held-out evaluation), score the
        reference on the policy's masks whatever ``antithetic`` says. Both estimates of the
        margin are unbiased; with shared masks the Monte-Carlo noise of the two ELBOs largely
        cancels (at step 0, policy == reference, the margin is then exactly 0 instead of
        noise of a few units: ELBOs of long responses are ~1e3 nats). Training is unchanged.
    """

    beta: float = 0.1
    n_mc: int = 8
    stratified: bool = False
    antithetic: bool = False
    estimator: Literal["count", "time"] = "count"
    eps: float = 1e-3
    mc_chunk: int = 0
    length_normalize: bool = False
    couple_pairs: bool = False
    eval_antithetic: bool = True

    def __post_init__(self):
        if self.n_mc < 1:
            raise ValueError(f"n_mc must be >= 1, got {self.n_mc}")
        if self.mc_chunk < 0:
            raise ValueError(f"mc_chunk must be >= 0, got {self.mc_chunk}")


def model_config(model) -> dict:
    """The raw config.json dict of a family model, a peft wrapper or a ReferencePolicy."""
    cfg = getattr(model, "hf_config", None)
    if cfg is None:
        cfg = model.get_base_model().hf_config
    return cfg


def dpo(model: torch.nn.Module, batch: TokenBatch, config: DPOConfig, family: ModelFamily,
        reference=None):
    """``Algorithm.loss`` of ``dpo``: per-pair loss (B/2,) and metrics summed over pairs."""
    mask_id = family.special_tokens(model_config(model)).mask_id
    draw = dict(n_t=config.n_mc, n_yt=1, stratified=config.stratified, estimator=config.estimator,
                eps=config.eps)
    check_pairs(batch)
    seeds = pair_seeds(batch.noise_seeds) if config.couple_pairs else batch.noise_seeds
    policy_masks = draw_masks(batch.input_ids, batch.loss_mask, seeds, mask_id, **draw)
    shared = config.antithetic or (config.eval_antithetic and not model.training)
    reference_masks = policy_masks if shared else draw_masks(
        batch.input_ids, batch.loss_mask, seeds, mask_id, stream=1, **draw)
    return elbo_preference_loss(model, reference, family, batch, policy_masks, reference_masks,
                                config.beta, config.mc_chunk, config.length_normalize)


@dare.hookimpl
def register_algorithms(register):
    register(Algorithm(
        name="dpo", config_type=DPOConfig, loss=dpo, kind="supervised",
        description="DPO with Monte-Carlo ELBO likelihoods (plain: iid timesteps, independent "
                    "policy/reference masks)",
        rows_per_unit=2, data_format="preference", needs_reference=True,
    ))
