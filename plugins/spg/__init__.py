"""The ``spg`` algorithm: Sandwiched Policy Gradient (Wang et al., 2025, "SPG: Sandwiched Policy
Gradient for Masked Diffusion Language Models").

Reference: facebookresearch/SPG ``spg/spg_trainer.py``, ``spg/diffu_grpo_config.py`` and its
``slurm_scripts/spg_mix/*`` (defaults below: ``--forward_type block_random --num_t 2 --min_t 0
--max_t 1 --logp_estimation mix --mix_weight 0.5 --eubo_beta 1.5 --num_iterations 4 --beta 0``);
DARE ``_forward_process_spg`` / ``compute_policy_loss_spg``.

A log-likelihood lower bound (ELBO) is pushed up for completions with positive advantage and an
upper bound (EUBO, or a mix of the two) is pushed down for the others, so the policy gradient of
-A * log pi is "sandwiched" (see ``loss.py`` for the masks and both estimates):

    logp_i = ELBO_i                                       if A_i > 0
           = w EUBO_i + (1 - w) ELBO_i  ("mix"), EUBO_i ("eubo"), ELBO_i, or 0   otherwise
    L = sum_i -A_i logp_i |o_i| / sum_i |o_i|             ("token": the reference's length weighting)
      = mean_i -A_i logp_i                                ("sequence")

There is no ratio, clipping or KL (the reference raises for beta != 0): each of the
``num_iterations`` inner steps is a plain policy-gradient step on the rollout batch with fresh
masks (iteration k uses seeds ``noise_seeds * 1000 + k``). A_i = ``batch.advantages``
(set by the driver from the recipe's ``reward.advantage``; SPG uses r - group mean: ``mean``).

Families: LLaDA and Dream (bidirectional) through ``dare.registry.denoise``. SDAR is rejected
(ValueError from the loss and a recipe validation error): SPG's block-wise masks emulate
semi-autoregressive decoding on a bidirectional denoiser (blocks after the chosen one fully
masked), while SDAR's block-diffusion denoiser always scores a block given the clean blocks before
it and never sees later ones, so the masks would not mean what the bounds assume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import dare
from dare.protocol import RolloutBatch
from dare.registry import Algorithm, ModelFamily
from dare.rl import NORMALIZATIONS, ensure_token_norm, model_config, row_token_norm

from .loss import FORWARD_TYPES, LOGP_ESTIMATIONS, spg_bounds, spg_logps, spg_masks, spg_sequence_logp

__all__ = ["SPGConfig", "spg_loss", "spg_prepare", "spg_masks", "spg_bounds", "spg_sequence_logp", "spg_logps"]


@dataclass
class SPGConfig:
    """Options of ``algorithm: {name: spg, ...}``, named as SPG's ``DiffuGRPOConfig``.

    num_iterations: policy-gradient steps per rollout batch, a fresh mask each (4).
    forward_type: "all" | "random" | "block_all" | "block_random" masks ("block_random").
    num_t: Monte-Carlo mask samples per estimate (2).
    min_t, max_t: range of the masked fraction for the random types (0, 1).
    block_length: block size of the block types; must divide the completion width (32).
    use_mask_prompt: mask the context (prompt, and earlier blocks for the block types) (True).
    p_mask_prompt: its masking probability (0.15, d1's train.yaml value).
    logp_estimation: estimate for A <= 0 rows: "eubo" | "mix" | "elbo" | "zero" ("mix").
    eubo_beta: the EUBO's beta (1.5, the GSM8K/MATH/Countdown scripts; 1.0 for Sudoku).
    mix_weight: weight of the EUBO in "mix" (0.5).
    normalization: "token" (rows weighted by completion length, the reference) or "sequence".
    """

    num_iterations: int = 4
    forward_type: Literal["all", "random", "block_all", "block_random"] = "block_random"
    num_t: int = 2
    min_t: float = 0.0
    max_t: float = 1.0
    block_length: int = 32
    use_mask_prompt: bool = True
    p_mask_prompt: float = 0.15
    logp_estimation: Literal["eubo", "mix", "elbo", "zero"] = "mix"
    eubo_beta: float = 1.5
    mix_weight: float = 0.5
    normalization: Literal["token", "sequence"] = "token"

    def __post_init__(self):
        if self.num_iterations < 1 or self.num_t < 1:
            raise ValueError(f"num_iterations and num_t must be >= 1, got {self.num_iterations}, {self.num_t}")
        if self.forward_type not in FORWARD_TYPES:
            raise ValueError(f"forward_type must be one of {', '.join(FORWARD_TYPES)}, got {self.forward_type!r}")
        if self.forward_type == "all" and self.num_t != 1:
            raise ValueError("forward_type 'all' needs num_t = 1")
        if not 0.0 <= self.min_t <= self.max_t <= 1.0:
            raise ValueError(f"need 0 <= min_t <= max_t <= 1, got {self.min_t}, {self.max_t}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")
        if not 0.0 <= self.p_mask_prompt < 1.0:
            raise ValueError(f"p_mask_prompt must be in [0, 1), got {self.p_mask_prompt}")
        if self.logp_estimation not in LOGP_ESTIMATIONS:
            raise ValueError(f"logp_estimation must be one of {', '.join(LOGP_ESTIMATIONS)}")
        if self.eubo_beta <= 0:
            raise ValueError(f"eubo_beta must be > 0, got {self.eubo_beta}")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"mix_weight must be in [0, 1], got {self.mix_weight}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}")



def _check_family(family: ModelFamily) -> None:
    if family.attention != "bidirectional":
        raise ValueError(
            f"spg needs a bidirectional denoiser; family {family.name!r} is {family.attention}: its "
            f"denoiser scores each block given the clean blocks before it, so SPG's block-wise masks "
            f"(every block after the chosen one masked) do not give the bounds SPG assumes")


def spg_prepare(model: torch.nn.Module, batch: RolloutBatch, config: SPGConfig, family: ModelFamily,
                reference=None) -> RolloutBatch:
    """SPG needs no old or reference log-probs; records the batch's token normaliser only."""
    _check_family(family)
    ensure_token_norm(batch)
    return batch


def spg_estimates(model, batch: RolloutBatch, config: SPGConfig, family: ModelFamily, iteration: int):
    """(elbo, eubo) (B,) each for ``iteration``'s masks."""
    mask_id = family.special_tokens(model_config(model)).mask_id
    masks = spg_masks(batch.attention_mask, batch.completion_mask, batch.noise_seeds, iteration,
                      config.forward_type, config.num_t, config.block_length, config.min_t, config.max_t,
                      config.use_mask_prompt, config.p_mask_prompt)
    logps = spg_logps(model, family, batch, masks, mask_id)
    C = batch.completion_mask.shape[1]
    return spg_bounds(logps, masks[:, :, -C:], batch.completion_mask, config.eubo_beta)


def spg_loss(model: torch.nn.Module, batch: RolloutBatch, config: SPGConfig, family: ModelFamily,
             reference=None):
    """``Algorithm.loss`` of ``spg``: per-row loss (B,) for inner iteration ``batch.iteration``."""
    _check_family(family)
    k = int(batch.iteration)
    if not 0 <= k < config.num_iterations:
        raise ValueError(f"batch.iteration {k} is outside 0..{config.num_iterations - 1}")
    elbo, eubo = spg_estimates(model, batch, config, family, k)
    adv = batch.advantages.to(elbo.device, elbo.dtype)
    seq_logp = spg_sequence_logp(elbo, eubo, adv, config.logp_estimation, config.mix_weight)
    per_row = -adv * seq_logp
    if config.normalization == "token":
        lengths = batch.completion_mask.to(elbo.device).float().sum(1)
        per_row = per_row * lengths / row_token_norm(batch).to(elbo.device)
    positive = adv > 0
    metrics = {
        "elbo": float(elbo.detach().sum()),
        "eubo": float(eubo.detach().sum()),
        "seq_logp": float(seq_logp.detach().sum()),
        "positive_rows": float(positive.sum()),
        "completion_tokens": float(batch.completion_mask.float().sum()),
    }
    return per_row, metrics


@dare.hookimpl
def register_algorithms(register):
    register(Algorithm(
        name="spg", config_type=SPGConfig, loss=spg_loss, kind="rl", prepare=spg_prepare, needs_reference=False,
        description="Sandwiched Policy Gradient: ELBO for positive-advantage completions, EUBO / mix "
                    "for the others, block-wise Monte-Carlo masks (bidirectional families)",
    ))


@dare.hookimpl
def validate_recipe(recipe, registry):
    if getattr(recipe, "algorithm_name", None) != "spg" or recipe.model.family not in registry.families:
        return []
    family = registry.families.get(recipe.model.family)
    if family.attention != "bidirectional":
        return [f"algorithm.name: spg needs a bidirectional model family; {family.name!r} is {family.attention} "
                f"(SPG's block-wise masks assume a bidirectional denoiser)"]
    return []
