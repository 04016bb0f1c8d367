"""Coupled-GRPO (DiffuCoder): complementary-mask per-token log-probabilities.

Follows apple/ml-diffucoder ``src/open_r1/coupled_grpo.py`` (``forward_process``,
``selective_log_softmax``, ``_get_per_token_logps``) and DARE's ``_forward_process_coupled_grpo``
and ``llada_dp_actor_coupled_grpo.py`` (the same three views and the same combination).

Views. For inner iteration k, row i draws (generator seeded with ``noise_seeds[i] * 1000 + k``)

    t_i ~ U(t_min, t_max)            (DiffuCoder: random.uniform(0.2, 0.8))
    u_ij ~ U[0, 1) for the C completion columns

and the model (as a denoiser, ``dare.registry.denoise``) scores the completion in three views,
the prompt always clean:

    view 0: every completion column masked                      -> logp0_ij
    view 1: column j masked iff u_ij < t_i          (set S_i)   -> logp1_ij
    view 2: column j masked iff j not in S_i  (the complement)  -> logp2_ij

so every completion column is masked in exactly one of views 1 and 2. The per-token estimate is

    logp_ij = ( logp0_ij + [j in S_i] logp1_ij / t_i + [j not in S_i] logp2_ij / (1 - t_i) ) / 2

(DiffuCoder's ``final_logps = (p0 + where(mask, p1 * 1/t, p2 * 1/(1-t))) / 2``).
"""
from __future__ import annotations

import torch

from dare.protocol import RolloutBatch
from dare.registry import ModelFamily, denoise
from dare.rl import row_generators, token_logps

__all__ = ["coupled_masks", "coupled_views", "coupled_combine", "coupled_logps"]


def coupled_masks(completion_width: int, noise_seeds: torch.Tensor, iteration: int, t_min: float = 0.2,
                  t_max: float = 0.8):
    """Per row: t ~ U(t_min, t_max), then u (C values); ``partial[i, j] = u_ij < t_i``.

    Returns t (B,) float32 and partial (B, C) bool (CPU); the complement view is ``~partial``.
    """
    B = noise_seeds.shape[0]
    t = torch.empty(B)
    partial = torch.zeros(B, completion_width, dtype=torch.bool)
    for i, g in enumerate(row_generators(noise_seeds, iteration)):
        t[i] = t_min + (t_max - t_min) * torch.rand(1, generator=g)
        partial[i] = torch.rand(completion_width, generator=g) < t[i]
    return t, partial


def coupled_views(input_ids: torch.Tensor, partial: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(3, B, P + C) noisy inputs: completion fully masked, masked on ``partial``, masked on its
    complement; the prompt columns are never masked."""
    B, L = input_ids.shape
    C = partial.shape[1]
    P = L - C
    partial = partial.to(input_ids.device)
    completion_masks = torch.stack([torch.ones_like(partial), partial, ~partial])  # (3, B, C)
    masked = torch.cat([torch.zeros(3, B, P, dtype=torch.bool, device=input_ids.device), completion_masks], dim=2)
    return torch.where(masked, torch.full_like(input_ids, mask_id).expand(3, B, L), input_ids.expand(3, B, L))


def coupled_combine(logp_full: torch.Tensor, logp_partial: torch.Tensor, logp_complement: torch.Tensor,
                    partial: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DiffuCoder's per-token estimate (B, C):
    ``(logp_full + where(partial, logp_partial / t, logp_complement / (1 - t))) / 2``."""
    t = t.to(logp_full.device, logp_full.dtype)[:, None]
    weighted = torch.where(partial.to(logp_full.device), logp_partial / t, logp_complement / (1 - t))
    return (logp_full + weighted) / 2


def coupled_logps(model, family: ModelFamily, batch: RolloutBatch, iteration: int, mask_id: int,
                  t_min: float = 0.2, t_max: float = 0.8) -> torch.Tensor:
    """(B, C) float32 coupled per-token log-probs of the completions for ``iteration``'s masks:
    one forward of the 3B views."""
    ids = batch.input_ids
    B, L = ids.shape
    C = batch.completion_mask.shape[1]
    t, partial = coupled_masks(C, batch.noise_seeds, iteration, t_min, t_max)
    noisy = coupled_views(ids, partial, mask_id).reshape(3 * B, L)
    clean = ids.repeat(3, 1)
    logits = denoise(family, model, noisy, clean)
    lp = token_logps(logits[:, L - C:], clean[:, L - C:]).reshape(3, B, C)
    return coupled_combine(lp[0], lp[1], lp[2], partial, t)
