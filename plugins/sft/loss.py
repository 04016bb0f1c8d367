"""Masked-diffusion SFT (LLaDA, "Large Language Diffusion Models", Appendix B / GUIDELINES).

For a prompt p and response r (with its trailing <EOS> padding, all trained on), draw
t ~ U(0, 1), set p_mask = (1 - eps) * t + eps, and mask every response token
independently with probability p_mask; the prompt stays clean. The loss of one row is

    L = (1 / |r|) * sum_{j in masked} -log p_theta(x_j | x_noisy) / p_mask

and the batch loss is the mean of L over rows, which is the reference's
``sum(token_loss / answer_lengths) / batch_size``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_noise(input_ids: torch.Tensor, loss_mask: torch.Tensor, seeds: torch.Tensor,
                  mask_id: int, eps: float = 1e-3):
    """Mask response tokens, one generator per row so the noise depends only on the row's seed.

    input_ids: (B, L) int64; loss_mask: (B, L) bool, True on response positions;
    seeds: (B,) int64. Returns noisy (B, L) int64, masked (B, L) bool, p_mask (B,) float32.
    """
    B, L = input_ids.shape
    t = torch.empty(B)
    u = torch.empty(B, L)
    for i in range(B):
        g = torch.Generator().manual_seed(int(seeds[i]))
        t[i] = torch.rand(1, generator=g)
        u[i] = torch.rand(L, generator=g)
    p_mask = (1 - eps) * t + eps
    masked = (u < p_mask[:, None]) & loss_mask.cpu()
    masked = masked.to(input_ids.device)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask.to(input_ids.device)


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                          p_mask: torch.Tensor, answer_lengths: torch.Tensor) -> torch.Tensor:
    """Per-row loss (B,): sum over masked positions of CE / p_mask, divided by the answer length.

    logits: (B, L, V) position-aligned (logits[:, j] scores targets[:, j]);
    targets: (B, L) int64; masked: (B, L) bool; p_mask: (B,); answer_lengths: (B,).
    """
    rows = masked.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    weighted = ce / p_mask[rows].float() / answer_lengths[rows].float()
    return torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32).index_add(0, rows, weighted)
