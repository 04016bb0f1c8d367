"""The ``d1`` algorithm: diffu-GRPO (Zhao et al., 2025, "d1: Scaling Reasoning in Diffusion
Large Language Models via Reinforcement Learning").

Reference: dllm-reasoning/d1 ``diffu-grpo/diffu_grpo_trainer.py`` and its ``train.yaml``
(defaults below), DARE ``verl/trainer/ppo/dllm_core_algos.py`` (``_forward_process_d1``).

Per inner iteration k (of ``num_iterations`` = mu), with the d1 one-step estimate ``logp`` of
``loss.py`` (completion fully masked, prompt masked at ``p_mask_prompt``, mask seeded by
``noise_seeds * 1000 + k``):

    l_ij = -min(r_ij A_i, clip(r_ij, 1 - epsilon, 1 + epsilon) A_i) + beta * k3_ij
    r_ij = exp(logp_ij - logp_old_ij)        (old policy = the weights before the first update)
    k3_ij = exp(ref_ij - logp_ij) - (ref_ij - logp_ij) - 1

    L = sum_ij l_ij m_ij / sum_ij m_ij       ("token", d1's code)  or
    L = mean_i (1/|o_i|) sum_j l_ij m_ij     ("sequence", the GRPO/d1 paper's formula)

m = ``completion_mask`` (completion up to and including the first EOS). A_i = ``batch.advantages``
(``dare.rl.group_advantages``, computed by the driver with the recipe's ``reward.advantage``; d1
itself uses r - group mean, i.e. ``reward.advantage: mean``).
``prepare`` computes, once per rollout batch and under no_grad, logp_old (when mu > 1; with
mu = 1 the ratio is exactly 1, as in d1) and logp_ref (when beta > 0) for the mask of every inner
iteration, stored as (mu, B, C) in ``batch.extras["old_logps"]`` / ``["ref_logps"]``.

Families: LLaDA and Dream through ``dare.registry.denoise``. SDAR (block-causal): the estimate
applies -- the denoiser runs ``[noisy | clean]`` under the block-diffusion training mask, so each
fully masked completion block is scored given the clean blocks before it (a block-wise one-step
estimate, the natural analogue for a block-diffusion model); prompt masking then only affects the
block that holds the prompt/completion boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import dare
from dare.protocol import RolloutBatch
from dare.registry import Algorithm, ModelFamily
from dare.rl import (check_grpo_options, ensure_token_norm, grpo_objective, map_row_chunks,
                     model_config, row_token_norm)

from .loss import d1_logps, d1_noise

__all__ = ["D1Config", "d1_loss", "d1_prepare", "d1_logps", "d1_noise"]


@dataclass
class D1Config:
    """Options of ``algorithm: {name: d1, ...}`` (defaults: d1's ``train.yaml``).

    num_iterations: mu, optimiser steps per rollout batch, each with a fresh mask (12).
    p_mask_prompt: probability of masking each prompt token in the estimate (0.15).
    epsilon: clip range of the ratio, clip(r, 1 - epsilon, 1 + epsilon_high) (0.5).
    epsilon_high: upper clip range; None = epsilon (d1 has a single epsilon).
    beta: coefficient of the k3 KL to the reference policy; 0 = no reference (0.04).
    normalization: "token" (sum over the batch's completion tokens / their number, d1's code)
        or "sequence" (each completion's mean, then the mean over completions, the paper's form).
    prepare_batch_size: rows per forward when ``prepare`` computes old/reference log-probs
        (0 = the whole shard at once); memory only, results do not change.
    """

    num_iterations: int = 12
    p_mask_prompt: float = 0.15
    epsilon: float = 0.5
    epsilon_high: float | None = None
    beta: float = 0.04
    normalization: Literal["token", "sequence"] = "token"
    prepare_batch_size: int = 0

    def __post_init__(self):
        check_grpo_options(self)
        if not 0.0 <= self.p_mask_prompt < 1.0:
            raise ValueError(f"p_mask_prompt must be in [0, 1), got {self.p_mask_prompt}")



def _logps_for(model, family, batch, k, config, mask_id):
    return map_row_chunks(batch, config.prepare_batch_size,
                          lambda part: d1_logps(model, family, part, k, mask_id, config.p_mask_prompt))


def d1_prepare(model: torch.nn.Module, batch: RolloutBatch, config: D1Config, family: ModelFamily,
               reference=None) -> RolloutBatch:
    """Old-policy (mu > 1) and reference (beta > 0) log-probs for every inner iteration's mask,
    (mu, B, C) in ``batch.extras``; also the batch's token normaliser. Run under no_grad."""
    ensure_token_norm(batch)
    mask_id = family.special_tokens(model_config(model)).mask_id
    K = config.num_iterations
    with torch.no_grad():
        if K > 1:
            batch.extras["old_logps"] = torch.stack(
                [_logps_for(model, family, batch, k, config, mask_id) for k in range(K)])
        if config.beta > 0:
            if reference is None:
                raise ValueError("d1 with beta > 0 needs the reference policy (Algorithm.needs_reference)")
            batch.extras["ref_logps"] = torch.stack(
                [_logps_for(reference, family, batch, k, config, mask_id) for k in range(K)])
    return batch


def d1_loss(model: torch.nn.Module, batch: RolloutBatch, config: D1Config, family: ModelFamily,
            reference=None):
    """``Algorithm.loss`` of ``d1``: per-row loss (B,) for inner iteration ``batch.iteration``."""
    k = int(batch.iteration)
    if not 0 <= k < config.num_iterations:
        raise ValueError(f"batch.iteration {k} is outside 0..{config.num_iterations - 1}")
    if config.num_iterations > 1 and "old_logps" not in batch.extras:
        raise ValueError("d1 with num_iterations > 1 needs the old log-probs: run Algorithm.prepare first")
    mask_id = family.special_tokens(model_config(model)).mask_id
    logp = d1_logps(model, family, batch, k, mask_id, config.p_mask_prompt)
    old = batch.extras["old_logps"][k] if config.num_iterations > 1 else None
    ref = None
    if config.beta > 0:
        if "ref_logps" in batch.extras:
            ref = batch.extras["ref_logps"][k]
        elif reference is not None:
            with torch.no_grad():
                ref = d1_logps(reference, family, batch, k, mask_id, config.p_mask_prompt)
        else:
            raise ValueError("d1 with beta > 0 needs reference log-probs: run Algorithm.prepare or pass reference")
    mask = batch.completion_mask.to(logp.device)
    return grpo_objective(logp, old, ref, batch.advantages, mask, config.epsilon, config.epsilon_high,
                          config.beta, config.normalization, row_token_norm(batch))


@dare.hookimpl
def register_algorithms(register):
    register(Algorithm(
        name="d1", config_type=D1Config, loss=d1_loss, kind="rl", prepare=d1_prepare, needs_reference=True,
        description="diffu-GRPO (d1): one-step per-token log-probs (completion fully masked, prompt "
                    "masked at p_mask_prompt, fresh mask per inner iteration), clipped ratio, k3 KL",
    ))
