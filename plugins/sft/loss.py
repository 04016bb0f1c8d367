"""Masked-diffusion SFT: the forward (noising) process and the weighted denoising loss.

For a row with prompt p and response r (its trailing <EOS> padding included, all trained on),
one noise level t ~ U(0, 1) is drawn per row and p_mask = (1 - eps) * t + eps. Every response
position is masked independently with probability p_mask; the prompt stays clean. With
``logits[:, j]`` scoring token j given the noisy row (see ``dare.registry.denoise``), the loss
of a row is

    L = (1 / Z) * sum_{j masked} -log p_theta(x_j | x_noisy) / p_mask

where the normaliser Z is

* ``"answer_length"``: |r|, the number of loss positions of the row (response + EOS padding),
  LLaDA's ``sum(token_loss / answer_lengths) / batch_size`` and SDAR's ``loss / answer_len``;
* ``"masked_tokens"``: the number of masked positions of the row (Dream's
  ``sum(loss) / sum(t_mask)``); a row with nothing masked contributes 0.

The batch loss is the mean of L over rows. The references normalise per micro-batch
(``sum over the micro-batch / its token count``); per row is that with one row per micro-batch
(DARE's Dream recipe uses ``micro_batch_size_per_gpu=1``), and it keeps the loss independent of
how a batch is split across workers.

Two options of the forward process come from the references:

* ``ensure_masked`` (SDAR's ``forward_add_noise_packed``): redraw (t, mask) up to ``max_tries``
  times until at least one response position is masked, then force one uniformly chosen
  response position;
* ``treat_eos_as_one`` (Dream's ``q_sample`` with an ``eos_token_id``): the trailing run of
  <EOS> in the response is masked or kept as a whole, following its first token's draw.

All randomness of a row comes from one ``torch.Generator`` seeded with the row's noise seed, so
the noise does not depend on which other rows share the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZE = ("answer_length", "masked_tokens")


def forward_noise(input_ids: torch.Tensor, loss_mask: torch.Tensor, seeds: torch.Tensor,
                  mask_id: int, eps: float = 1e-3, ensure_masked: bool = False, max_tries: int = 10,
                  eos_id: int | None = None):
    """Mask response tokens, one generator per row so the noise depends only on the row's seed.

    input_ids: (B, L) int64; loss_mask: (B, L) bool, True on response positions;
    seeds: (B,) int64. ``eos_id`` set = treat the trailing <EOS> run as one token.
    Returns noisy (B, L) int64, masked (B, L) bool, p_mask (B,) float32.

    Per row the generator draws t (1 value) then u (L values); ``ensure_masked`` repeats that
    draw while nothing is masked (at most ``max_tries`` times), then draws the index to force.
    """
    B, L = input_ids.shape
    eligible_all = loss_mask.detach().to("cpu", torch.bool)
    ids_cpu = input_ids.detach().cpu()
    p_mask = torch.empty(B)
    masked = torch.zeros(B, L, dtype=torch.bool)
    for i in range(B):
        g = torch.Generator().manual_seed(int(seeds[i]))
        eligible = eligible_all[i]
        for _ in range(max_tries if ensure_masked else 1):
            t = torch.rand(1, generator=g)
            u = torch.rand(L, generator=g)
            p = (1 - eps) * t + eps
            row = (u < p) & eligible
            if row.any():
                break
        if ensure_masked and not row.any() and eligible.any():
            candidates = eligible.nonzero(as_tuple=True)[0]
            row[candidates[torch.randint(len(candidates), (1,), generator=g)]] = True
        if eos_id is not None:
            row = _group_trailing_eos(row, ids_cpu[i], eligible, eos_id)
        p_mask[i] = p
        masked[i] = row
    masked = masked.to(input_ids.device)
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p_mask.to(input_ids.device)


def _group_trailing_eos(row: torch.Tensor, ids: torch.Tensor, eligible: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Mask the trailing run of eligible <EOS> tokens as a whole, as its first token's draw says."""
    not_eos = ~((ids == eos_id) & eligible)
    last = int(not_eos.nonzero().max()) if bool(not_eos.any()) else -1
    start = last + 1
    if start < row.numel():
        row = row.clone()
        row[start:] = bool(row[start])
    return row


def row_normalizer(normalize: str, loss_mask: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Z per row (B,) float: answer length, or number of masked tokens (at least 1)."""
    if normalize == "answer_length":
        return loss_mask.sum(dim=1).float()
    if normalize == "masked_tokens":
        return masked.sum(dim=1).clamp(min=1).float()
    raise ValueError(f"unknown normalize {normalize!r} (choose from {', '.join(NORMALIZE)})")


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                          p_mask: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
    """Per-row loss (B,): sum over masked positions of CE / p_mask, divided by the row's normaliser.

    logits: (B, L, V) position-aligned (logits[:, j] scores targets[:, j]);
    targets: (B, L) int64; masked: (B, L) bool; p_mask: (B,); normalizer: (B,), e.g. the
    answer lengths (see :func:`row_normalizer`).
    """
    rows = masked.nonzero(as_tuple=True)[0]
    ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    weighted = ce / p_mask[rows].float() / normalizer[rows].float()
    return torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32).index_add(0, rows, weighted)
