"""diffu-GRPO (d1): the one-step per-token log-probability estimate and its GRPO loss.

Follows dllm-reasoning/d1 ``diffu-grpo/diffu_grpo_trainer.py`` (``forward_process``,
``_get_per_token_logps``, ``compute_loss``) and DARE's ``_forward_process_d1``.

Estimate. For inner iteration k, every completion column is replaced by the mask token and each
real prompt token is masked independently with probability ``p_mask_prompt``; one forward of the
model as a denoiser (``dare.registry.denoise``) then gives, for completion token j of row i,

    logp_ij = log pi_theta(o_ij | q masked at p_mask_prompt, completion fully masked)

(a mean-field, one-step estimate of the per-token log-likelihood). The prompt mask of row i in
iteration k comes from a generator seeded with ``noise_seeds[i] * 1000 + k``: it draws u ~ U[0,1)
for the P prompt columns and masks column j iff ``u_j < p_mask_prompt`` and j is a real token.
The same masks are used for the old policy, the reference and the current policy within an
iteration, and a fresh one in each iteration (d1's ``random_masking: True``).

Loss: :func:`dare.rl.grpo_objective` (clipped ratio, beta * k3 KL, token normalisation).
"""
from __future__ import annotations

import torch

from dare.protocol import RolloutBatch
from dare.registry import ModelFamily, denoise
from dare.rl import row_generators, token_logps

__all__ = ["d1_noise", "d1_logps"]


def d1_noise(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int,
             noise_seeds: torch.Tensor, iteration: int, mask_id: int, p_mask_prompt: float):
    """d1's forward process for inner iteration ``iteration``.

    input_ids, attention_mask: (B, P + C); the last ``completion_width`` columns are the completion.
    Returns noisy (B, P + C) int64 and masked (B, P + C) bool: every completion column masked,
    real prompt tokens masked with probability ``p_mask_prompt`` (left padding never).
    """
    B, L = input_ids.shape
    P = L - completion_width
    masked = torch.zeros(B, L, dtype=torch.bool)
    masked[:, P:] = True
    if p_mask_prompt > 0 and P > 0:
        real = attention_mask[:, :P].detach().bool().cpu()
        for i, g in enumerate(row_generators(noise_seeds, iteration)):
            u = torch.rand(P, generator=g)
            masked[i, :P] = (u < p_mask_prompt) & real[i]
    masked = masked.to(input_ids.device)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked


def d1_logps(model, family: ModelFamily, batch: RolloutBatch, iteration: int, mask_id: int,
             p_mask_prompt: float) -> torch.Tensor:
    """(B, C) float32 per-token log-probs of the completions under ``model`` for ``iteration``'s mask."""
    C = batch.completion_mask.shape[1]
    noisy, _ = d1_noise(batch.input_ids, batch.attention_mask, C, batch.noise_seeds, iteration, mask_id,
                        p_mask_prompt)
    logits = denoise(family, model, noisy, batch.input_ids)
    P = batch.input_ids.shape[1] - C
    return token_logps(logits[:, P:], batch.input_ids[:, P:])
