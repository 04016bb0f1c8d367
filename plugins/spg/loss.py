"""Sandwiched Policy Gradient (SPG): masks, the ELBO / EUBO sequence estimates, the loss.

Follows facebookresearch/SPG ``spg/spg_trainer.py`` (``forward_process``, ``_get_per_seq_logps``,
``compute_loss``) and DARE's port (``_forward_process_spg``, ``llada_dp_actor_spg.py``,
``compute_policy_loss_spg``).

Masks (``forward_type``), ``num_t`` samples per row and inner iteration k, all drawn from the
row's generator seeded with ``noise_seeds[i] * 1000 + k``. With n = the row's counted completion
length (``completion_mask``, up to and including the first EOS), C the completion width and
``bl = block_length``:

* ``"all"`` (num_t = 1): every completion column masked.
* ``"random"``: per sample, l ~ U{max(int(n min_t), 1) .. min(int(n max_t), n)} of the n counted
  tokens masked uniformly at random; columns past n masked.
* ``"block_all"`` / ``"block_random"``: the completion is cut into C / bl blocks, n covers
  nb = (n - 1) // bl + 1 of them; a random permutation of the C / bl block indices taken modulo nb
  gives the chosen block b_j of each sample (its first num_t entries). Every column from block b_j
  on is masked (block_all). ``block_random`` keeps only l ~ U{max(int(m min_t), 1) .. min(int(m
  max_t), m)} random masked tokens among the m = min(bl, n - bl b_j) counted tokens of block b_j
  (blocks after b_j stay fully masked, columns past n masked).

With ``use_mask_prompt`` every real (non-padding) token of the context is then masked with
probability ``p_mask_prompt``: the context is the prompt for ``all``/``random`` and everything
before block b_j (prompt and earlier completion blocks) for the block types, as in the reference
(``~is_mask & (rand < p_mask_prompt)``); masked completion tokens of earlier blocks then count in
the estimates like any other masked token.

Estimates, from per-token log-probs logp_sjc (sample s, completion column c) and the counted,
masked columns M_sc = masked_sc & m_c:

    ELBO = 1/num_t sum_s [ sum_c M_sc logp_sc / sum_c M_sc ]
    t_s  = sum_c M_sc / sum_c m_c                              (the sample's empirical mask rate)
    a_c  = 1/num_t sum_s M_sc p_sc^beta / t_s,  p = exp(logp)  (beta = ``eubo_beta``)
    EUBO = 1/beta * mean over {c : a_c > 0} of log a_c

The sequence log-likelihood used for row i is the ELBO when A_i > 0, else (``logp_estimation``)
the EUBO, ``mix_weight * EUBO + (1 - mix_weight) * ELBO`` ("mix"), the ELBO, or 0 ("zero"); the
loss is -A_i * logp_i weighted by the completion length: ``sum_i -A_i logp_i |o_i| / sum_i |o_i|``.
"""
from __future__ import annotations

import math

import torch

from dare.protocol import RolloutBatch
from dare.registry import ModelFamily, denoise
from dare.rl import row_generators, token_logps

__all__ = ["FORWARD_TYPES", "LOGP_ESTIMATIONS", "spg_masks", "spg_bounds", "spg_sequence_logp", "spg_logps"]

FORWARD_TYPES = ("all", "random", "block_all", "block_random")
LOGP_ESTIMATIONS = ("eubo", "mix", "elbo", "zero")


def _count_range(length: int, min_t: float, max_t: float) -> tuple[int, int]:
    lo = max(int(length * min_t), 1)
    hi = min(int(length * max_t), length)
    if lo > hi:
        raise ValueError(f"min_t={min_t}, max_t={max_t} leave no masked count for a span of {length} tokens")
    return lo, hi


def spg_masks(attention_mask: torch.Tensor, completion_mask: torch.Tensor, noise_seeds: torch.Tensor,
              iteration: int, forward_type: str = "block_random", num_t: int = 2, block_length: int = 32,
              min_t: float = 0.0, max_t: float = 1.0, use_mask_prompt: bool = True,
              p_mask_prompt: float = 0.15) -> torch.Tensor:
    """(B, num_t, P + C) bool masks of SPG's forward process (see the module docstring).

    attention_mask: (B, P + C), 0 on the prompt's left padding; completion_mask: (B, C).
    Per row the generator draws, in order: the block permutation (block types), then per sample
    the masked count and its positions (random / block_random), then u (num_t, P + C) for the
    context masking (when ``use_mask_prompt``).
    """
    if forward_type not in FORWARD_TYPES:
        raise ValueError(f"unknown forward_type {forward_type!r} (choose from {', '.join(FORWARD_TYPES)})")
    B, L = attention_mask.shape
    C = completion_mask.shape[1]
    P = L - C
    if forward_type == "all" and num_t != 1:
        raise ValueError(f"forward_type 'all' needs num_t == 1, got {num_t}")
    blocks = forward_type.startswith("block")
    if blocks:
        if block_length < 1 or C % block_length:
            raise ValueError(f"the completion width {C} is not a multiple of block_length {block_length}")
        num_blocks = C // block_length
        if num_t > num_blocks:
            raise ValueError(f"num_t={num_t} exceeds the {num_blocks} blocks of the completion")
    real = attention_mask.detach().bool().cpu()
    lengths = completion_mask.detach().bool().cpu().sum(1).tolist()
    out = torch.zeros(B, num_t, L, dtype=torch.bool)
    for i, g in enumerate(row_generators(noise_seeds, iteration)):
        n = int(lengths[i])
        m = torch.zeros(num_t, L, dtype=torch.bool)
        context = torch.zeros(num_t, L, dtype=torch.bool)
        context[:, :P] = True
        if n == 0 or forward_type == "all":  # nothing counted: the whole completion masked
            m[:, P:] = True
        elif forward_type == "random":
            lo, hi = _count_range(n, min_t, max_t)
            for j in range(num_t):
                count = int(torch.randint(lo, hi + 1, (1,), generator=g))
                chosen = torch.randperm(n, generator=g)[:count]
                m[j, P + chosen] = True
            m[:, P + n:] = True
        else:
            covered = (n - 1) // block_length + 1
            picked = (torch.randperm(num_blocks, generator=g) % covered)[:num_t].tolist()
            block_mask = torch.zeros(num_t, L, dtype=torch.bool)
            for j, b in enumerate(picked):
                block_mask[j, P + b * block_length:] = True
            m = block_mask.clone()
            if forward_type == "block_random":
                for j, b in enumerate(picked):
                    start = P + b * block_length
                    span = min(block_length, n - block_length * b)
                    lo, hi = _count_range(span, min_t, max_t)
                    count = int(torch.randint(lo, hi + 1, (1,), generator=g))
                    chosen = torch.randperm(span, generator=g)[:count]
                    m[j, start:start + span] = False
                    m[j, start + chosen] = True
                m[:, P + n:] = True
            context = ~block_mask
        if use_mask_prompt and p_mask_prompt > 0:
            u = torch.rand(num_t, L, generator=g)
            m |= context & real[i] & (u < p_mask_prompt)
        out[i] = m
    return out.to(attention_mask.device)


def spg_bounds(logps: torch.Tensor, masked: torch.Tensor, completion_mask: torch.Tensor, eubo_beta: float):
    """SPG's ELBO and EUBO sequence estimates (B,) each (see the module docstring).

    logps: (B, num_t, C) per-token log-probs; masked: (B, num_t, C) bool, the masked completion
    columns of each sample; completion_mask: (B, C). The EUBO's per-token average of
    p^beta / t is taken in log space (logsumexp), which equals the reference's
    ``log(mean(p ** beta * M / t))`` without underflow of p ** beta.
    """
    cm = completion_mask.to(logps.device).bool()[:, None, :]
    counted = masked.to(logps.device).bool() & cm
    cnt = counted.sum(-1).to(logps.dtype)  # (B, n)
    elbo = ((logps * counted).sum(-1) / cnt.clamp(min=1e-8)).mean(1)
    num_t = logps.shape[1]
    t = cnt / cm.sum(-1).to(logps.dtype).clamp(min=1e-8)  # (B, n)
    terms = eubo_beta * logps - torch.log(t.clamp(min=1e-8))[..., None]
    valid = counted.any(1)  # (B, C): masked in at least one sample (the reference's a_c > 0)
    terms = torch.where(counted, terms, torch.full_like(terms, -math.inf))
    terms = torch.where(valid[:, None, :], terms, torch.zeros_like(terms))
    log_avg = torch.logsumexp(terms, dim=1) - math.log(num_t)
    log_avg = torch.where(valid, log_avg, torch.zeros_like(log_avg))
    eubo = log_avg.sum(-1) / valid.sum(-1).to(logps.dtype).clamp(min=1e-8) / eubo_beta
    return elbo, eubo


def spg_sequence_logp(elbo: torch.Tensor, eubo: torch.Tensor, advantages: torch.Tensor,
                      logp_estimation: str = "mix", mix_weight: float = 0.5) -> torch.Tensor:
    """(B,) the sequence log-likelihood estimate per row: the ELBO where A > 0, else the
    ``logp_estimation`` estimate (eubo | mix | elbo | zero)."""
    if logp_estimation == "eubo":
        negative = eubo
    elif logp_estimation == "mix":
        negative = mix_weight * eubo + (1 - mix_weight) * elbo
    elif logp_estimation == "elbo":
        negative = elbo
    elif logp_estimation == "zero":
        negative = torch.zeros_like(elbo)
    else:
        raise ValueError(f"unknown logp_estimation {logp_estimation!r} (choose from {', '.join(LOGP_ESTIMATIONS)})")
    positive = advantages.to(elbo.device) > 0
    return torch.where(positive, elbo, negative)


def spg_logps(model, family: ModelFamily, batch: RolloutBatch, masks: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, num_t, C) float32 per-token log-probs of the completions under each of the num_t masks
    (one forward of B * num_t rows)."""
    ids = batch.input_ids
    B, L = ids.shape
    n = masks.shape[1]
    C = batch.completion_mask.shape[1]
    clean = ids[:, None, :].expand(B, n, L).reshape(B * n, L)
    noisy = torch.where(masks.reshape(B * n, L).to(ids.device), torch.full_like(clean, mask_id), clean)
    logits = denoise(family, model, noisy, clean)
    return token_logps(logits[:, L - C:], clean[:, L - C:]).reshape(B, n, C)
