"""The ``coupled_grpo`` algorithm: Coupled-GRPO (Gong et al., 2025, "DiffuCoder: Understanding and
Improving Masked Diffusion Models for Code Generation").

Reference: apple/ml-diffucoder ``src/open_r1/coupled_grpo.py`` and ``recipes/config_coupled_code.yaml``
(defaults below); DARE ``_forward_process_coupled_grpo`` / ``llada_dp_actor_coupled_grpo.py``.

The loss is GRPO's (as d1): per inner iteration k,

    l_ij = -min(r_ij A_i, clip(r_ij, 1 - epsilon, 1 + epsilon_high) A_i) + beta * k3_ij,
    r_ij = exp(logp_ij - logp_old_ij),  k3_ij = exp(ref_ij - logp_ij) - (ref_ij - logp_ij) - 1,
    L = sum_ij l_ij m_ij / sum_ij m_ij   ("token", DiffuCoder's ``/ completion_mask.sum()``),

A_i = ``batch.advantages`` (the driver's ``reward.advantage``; DiffuCoder's recipe has
``scale_rewards: false``, i.e. ``mean``), and logp is the coupled estimate of ``loss.py``: three
views per iteration (completion fully masked; masked at rate t ~ U(0.2, 0.8); the exact complement
of that mask), combined as
``(logp_full + [masked at t] logp_t / t + [in the complement] logp_c / (1 - t)) / 2``. Old-policy
(num_iterations > 1) and reference (beta > 0) estimates use the same masks and are computed once by
``prepare`` as (K, B, C) ``extras["old_logps"]`` / ``["ref_logps"]``.

Masks. Iteration k of row i uses the generator seeded with ``noise_seeds[i] * 1000 + k``: a
fresh t and mask per iteration and per row, as DiffuCoder's ``random_masking: True`` (DARE's port
reseeds a fixed ``seed=42``, so its masks repeat across iterations; see REFERENCES.md).

Families: LLaDA and Dream via ``dare.registry.denoise`` (DiffuCoder itself is a Dream model and
reads the shifted logits the same way). SDAR: the estimate applies -- each view is scored under
the block-diffusion training mask, i.e. every completion token given its own (partially) masked
block and the clean blocks before it, and the two complementary views still cover every token once.
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

from .loss import coupled_combine, coupled_logps, coupled_masks, coupled_views

__all__ = ["CoupledGRPOConfig", "coupled_grpo_loss", "coupled_grpo_prepare", "coupled_logps",
           "coupled_masks", "coupled_views", "coupled_combine"]


@dataclass
class CoupledGRPOConfig:
    """Options of ``algorithm: {name: coupled_grpo, ...}`` (defaults: DiffuCoder's
    ``recipes/config_coupled_code.yaml``).

    num_iterations: optimiser steps per rollout batch, each with fresh coupled masks (2).
    t_min, t_max: range of the masking rate t of the coupled pair (0.2, 0.8, hard-coded there).
    epsilon: clip range, clip(r, 1 - epsilon, 1 + epsilon_high) (0.5).
    epsilon_high: upper clip range; None = epsilon (TRL's epsilon_high default).
    beta: coefficient of the k3 KL to the reference policy (0.01).
    normalization: "token" (DiffuCoder) or "sequence" (each completion's mean, then the mean).
    prepare_batch_size: rows per forward in ``prepare`` (0 = whole shard); memory only.
    """

    num_iterations: int = 2
    t_min: float = 0.2
    t_max: float = 0.8
    epsilon: float = 0.5
    epsilon_high: float | None = None
    beta: float = 0.01
    normalization: Literal["token", "sequence"] = "token"
    prepare_batch_size: int = 0

    def __post_init__(self):
        check_grpo_options(self)
        if not 0.0 < self.t_min <= self.t_max < 1.0:
            raise ValueError(f"need 0 < t_min <= t_max < 1, got t_min={self.t_min}, t_max={self.t_max}")



def _estimate(model, family, batch, k, config, mask_id):
    return coupled_logps(model, family, batch, k, mask_id, config.t_min, config.t_max)


def coupled_grpo_prepare(model: torch.nn.Module, batch: RolloutBatch, config: CoupledGRPOConfig,
                         family: ModelFamily, reference=None) -> RolloutBatch:
    """Old-policy (num_iterations > 1) and reference (beta > 0) coupled estimates for every inner
    iteration, (K, B, C) in ``batch.extras``; also the batch's token normaliser."""
    ensure_token_norm(batch)
    mask_id = family.special_tokens(model_config(model)).mask_id
    K = config.num_iterations

    def all_iterations(policy):
        return torch.stack([map_row_chunks(batch, config.prepare_batch_size,
                                           lambda part, k=k: _estimate(policy, family, part, k, config, mask_id))
                            for k in range(K)])

    with torch.no_grad():
        if K > 1:
            batch.extras["old_logps"] = all_iterations(model)
        if config.beta > 0:
            if reference is None:
                raise ValueError("coupled_grpo with beta > 0 needs the reference policy")
            batch.extras["ref_logps"] = all_iterations(reference)
    return batch


def coupled_grpo_loss(model: torch.nn.Module, batch: RolloutBatch, config: CoupledGRPOConfig,
                      family: ModelFamily, reference=None):
    """``Algorithm.loss`` of ``coupled_grpo``: per-row loss (B,) for inner iteration ``batch.iteration``."""
    k = int(batch.iteration)
    if not 0 <= k < config.num_iterations:
        raise ValueError(f"batch.iteration {k} is outside 0..{config.num_iterations - 1}")
    if config.num_iterations > 1 and "old_logps" not in batch.extras:
        raise ValueError("coupled_grpo with num_iterations > 1 needs the old log-probs: run Algorithm.prepare first")
    mask_id = family.special_tokens(model_config(model)).mask_id
    logp = _estimate(model, family, batch, k, config, mask_id)
    old = batch.extras["old_logps"][k] if config.num_iterations > 1 else None
    ref = None
    if config.beta > 0:
        if "ref_logps" in batch.extras:
            ref = batch.extras["ref_logps"][k]
        elif reference is not None:
            with torch.no_grad():
                ref = _estimate(reference, family, batch, k, config, mask_id)
        else:
            raise ValueError("coupled_grpo with beta > 0 needs reference log-probs: run Algorithm.prepare")
    mask = batch.completion_mask.to(logp.device)
    return grpo_objective(logp, old, ref, batch.advantages, mask, config.epsilon, config.epsilon_high,
                          config.beta, config.normalization, row_token_norm(batch))


@dare.hookimpl
def register_algorithms(register):
    register(Algorithm(
        name="coupled_grpo", config_type=CoupledGRPOConfig, loss=coupled_grpo_loss, kind="rl",
        prepare=coupled_grpo_prepare, needs_reference=True,
        description="Coupled-GRPO (DiffuCoder): fully masked + complementary mask pair per inner "
                    "iteration, (logp0 + logp_t/t or logp_c/(1-t)) / 2, clipped ratio, k3 KL",
    ))
