"""Pure helpers shared by the RL algorithms for diffusion LLMs (``d1``, ``coupled_grpo``, ``spg``).

Everything here is a plain tensor function (no model, no plugin state), so each piece can be
checked by hand:

* :func:`group_advantages` -- GRPO's group-relative advantages, computed by the driver before a
  :class:`~dare.protocol.RolloutBatch` reaches the learner;
* :func:`iteration_seed` / :func:`row_generators` -- the per-row random streams of inner
  iteration k (``noise_seeds * 1000 + k``, one ``torch.Generator`` per row, so a row's masks
  never depend on how a batch is split);
* :func:`token_logps` -- float32 ``log_softmax`` + gather of the targets, row by row;
* :func:`k3_kl` -- Schulman's k3 estimator of KL(pi || pi_ref) per token;
* :func:`clipped_surrogate` -- PPO/GRPO's clipped per-token objective and its clip metrics;
* :func:`token_norm` / :func:`normalise_rows` -- how per-token losses become per-row losses so
  that the learner's mean over rows equals the reference's token- or sequence-level mean.

Normalisation. The learner minimises ``sum_i L_i / B`` (the mean of the per-row losses, see
``dare.executor.roles``). The reference GRPO trainers (d1, DiffuCoder) use the token-level mean
``sum_ij l_ij m_ij / sum_ij m_ij`` over a batch; that equals the mean over rows of

    L_i = sum_j l_ij m_ij / N,    N = (sum_ij m_ij) / B  (the batch's mean completion length)

so ``"token"`` normalisation divides each row's sum by N, which ``prepare`` records once per
rollout batch in ``batch.extras["token_norm"]`` (shape (1, B), the same value in every column) so
that it does not change when the batch is cut into micro-batches. ``"sequence"`` is GRPO's
``1/|o_i| sum_j`` (each row's own mean) and needs no shared value.
"""
from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "ADVANTAGE_SCALES", "NORMALIZATIONS", "group_advantages", "iteration_seed", "row_generators",
    "token_logps", "k3_kl", "clipped_surrogate", "token_norm", "ensure_token_norm", "row_token_norm",
    "normalise_rows", "model_config", "masked_row_mean", "grpo_objective", "map_row_chunks",
]

ADVANTAGE_SCALES = ("mean", "mean_std")
NORMALIZATIONS = ("token", "sequence")
_MASK64 = (1 << 64) - 1


# --- advantages ----------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                     scale: Literal["mean", "mean_std"] = "mean", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (B,) float32.

    ``A_i = r_i - mean_{g(i)}(r)``; with ``scale="mean_std"`` divided by ``std_{g(i)}(r) + eps``.
    The std is the unbiased sample std (``torch.std``, Bessel-corrected) as in TRL's GRPO, which
    d1 and DiffuCoder inherit (``rewards.view(-1, G).std(dim=1)``, ``+ 1e-4``). d1, SPG and
    DiffuCoder's released recipe (``scale_rewards: false``) all use ``"mean"``. A group of one
    row has advantage 0 (and std 0). Groups need not be contiguous.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r} (choose from {', '.join(ADVANTAGE_SCALES)})")
    r = rewards.detach().to(torch.float64).flatten()
    ids = group_ids.flatten()
    if ids.numel() != r.numel():
        raise ValueError(f"rewards ({r.numel()}) and group_ids ({ids.numel()}) differ in length")
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    n = counts.to(torch.float64)
    sums = torch.zeros_like(n).index_add(0, inverse, r)
    mean = sums / n
    centred = r - mean[inverse]
    if scale == "mean":
        return centred.float()
    squares = torch.zeros_like(n).index_add(0, inverse, centred ** 2)
    std = torch.where(n > 1, (squares / (n - 1).clamp(min=1)).sqrt(), torch.zeros_like(n))
    return (centred / (std[inverse] + eps)).float()


# --- randomness ------------------------------------------------------------------------------------


def iteration_seed(seed: int, iteration: int) -> int:
    """Seed of inner iteration ``iteration`` for a row with noise seed ``seed``:
    ``seed * 1000 + iteration`` (taken modulo 2**64 so that ``torch.Generator`` accepts it)."""
    return (int(seed) * 1000 + int(iteration)) & _MASK64


def row_generators(noise_seeds: torch.Tensor, iteration: int) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per row, seeded with :func:`iteration_seed`."""
    return [torch.Generator().manual_seed(iteration_seed(int(s), iteration)) for s in noise_seeds.tolist()]


# --- log-probabilities and KL ------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., target]`` in float32, shape ``targets.shape``.

    logits: (..., V) position-aligned with targets (...); computed one leading row at a time so
    that only one row's float32 copy of the logits is alive (TRL's ``selective_log_softmax``).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    flat_logits = logits.reshape(-1, *logits.shape[-2:]) if logits.dim() > 2 else logits.unsqueeze(0)
    flat_targets = targets.reshape(-1, targets.shape[-1]) if targets.dim() > 1 else targets.unsqueeze(0)
    rows = [torch.log_softmax(row.float(), dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            for row, tgt in zip(flat_logits, flat_targets)]
    return torch.stack(rows).reshape(targets.shape)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      eps_low: float, eps_high: float | None = None):
    """PPO/GRPO clipped objective per token, as a loss.

    ``r = exp(logp - old_logp)``; ``loss = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)``.
    advantages broadcast against logp (pass ``A[:, None]`` for per-row advantages).
    Returns ``(loss, low_clipped, high_clipped)``: the bool masks mark tokens whose ratio was
    clipped below (A < 0, r < 1 - eps_low) or above (A > 0, r > 1 + eps_high), as TRL logs them.
    """
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - eps_low) & (advantages < 0)
    high = (ratio > 1 + eps_high) & (advantages > 0)
    return loss, low, high


# --- normalisation -------------------------------------------------------------------------------------


def token_norm(completion_mask: torch.Tensor) -> torch.Tensor:
    """The batch's mean number of counted completion tokens, as (1, B) float32 (at least 1)."""
    B = completion_mask.shape[0]
    mean = completion_mask.float().sum() / max(B, 1)
    return mean.clamp(min=1.0).reshape(1, 1).expand(1, B).clone().cpu()


def ensure_token_norm(batch) -> None:
    """Record :func:`token_norm` of ``batch`` in ``batch.extras["token_norm"]`` unless present
    (a driver may set it for the whole rollout batch before cutting it into worker shards)."""
    if "token_norm" not in batch.extras:
        batch.extras["token_norm"] = token_norm(batch.completion_mask)


def row_token_norm(batch) -> torch.Tensor:
    """(B,) the ``"token"`` normaliser of each row: ``extras["token_norm"]`` when ``prepare``
    recorded it, else the mean completion length of this (micro-)batch."""
    if "token_norm" in batch.extras:
        return batch.extras["token_norm"][0].float()
    return token_norm(batch.completion_mask)[0]


def masked_row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean of ``values`` over each row's True ``mask`` positions (0 for an empty row)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def normalise_rows(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
                   norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row losses (B,) from per-token losses (B, C) on the counted tokens ``mask``.

    ``"sequence"``: each row's own mean, ``sum_j l_ij m_ij / sum_j m_ij`` (GRPO's 1/|o_i|).
    ``"token"``: ``sum_j l_ij m_ij / norm_i`` with ``norm`` (B,) the batch's mean completion
    length (:func:`row_token_norm`), so the mean over rows is the token-level mean of the batch.
    """
    m = mask.to(per_token.dtype)
    sums = (per_token * m).sum(-1)
    if mode == "sequence":
        return sums / m.sum(-1).clamp(min=1)
    if mode == "token":
        if norm is None:
            norm = (m.sum() / max(m.shape[0], 1)).clamp(min=1).expand(m.shape[0])
        return sums / norm.to(sums.device, sums.dtype)
    raise ValueError(f"unknown normalization {mode!r} (choose from {', '.join(NORMALIZATIONS)})")


def model_config(model) -> dict:
    """The raw config.json dict of a family model, a peft wrapper or a reference policy."""
    cfg = getattr(model, "hf_config", None)
    if cfg is None and hasattr(model, "get_base_model"):
        cfg = model.get_base_model().hf_config
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no hf_config; expected a dare family model")
    return cfg


# --- the GRPO objective shared by d1 and coupled-GRPO ----------------------------------------------------


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                   advantages: torch.Tensor, mask: torch.Tensor, epsilon: float,
                   epsilon_high: float | None, beta: float, normalization: str,
                   norm: torch.Tensor | None = None):
    """Per-row GRPO loss (B,) and metrics (sums over rows), from per-token log-probs (B, C).

    Per token (d1 ``compute_loss``, DiffuCoder ``compute_loss``, TRL GRPO):

        l_ij = -min(r_ij A_i, clip(r_ij, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_ij
        r_ij = exp(logp_ij - old_ij),  k3_ij = exp(ref_ij - logp_ij) - (ref_ij - logp_ij) - 1

    with ``old = logp.detach()`` when ``old_logp`` is None (one inner iteration: r = 1 exactly,
    so l_ij = -A_i + beta * k3_ij), then :func:`normalise_rows` over the counted tokens ``mask``.
    Metrics: ``kl`` (each row's mean k3), ``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high``
    (each row's fraction of clipped tokens), ``logp`` (each row's mean token log-prob).
    """
    old = logp.detach() if old_logp is None else old_logp.to(logp.device, logp.dtype)
    adv = advantages.to(logp.device, logp.dtype)[:, None]
    per_token, low, high = clipped_surrogate(logp, old, adv, epsilon, epsilon_high)
    metrics = {}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        kl = k3_kl(logp, ref_logp.to(logp.device, logp.dtype))
        per_token = per_token + beta * kl
        metrics["kl"] = float(masked_row_mean(kl.detach(), mask).sum())
    per_row = normalise_rows(per_token, mask, normalization, norm)
    with torch.no_grad():
        metrics["clip_ratio_low"] = float(masked_row_mean(low.float(), mask).sum())
        metrics["clip_ratio_high"] = float(masked_row_mean(high.float(), mask).sum())
        metrics["clip_ratio"] = float(masked_row_mean((low | high).float(), mask).sum())
        metrics["logp"] = float(masked_row_mean(logp.detach(), mask).sum())
        metrics["completion_tokens"] = float(mask.float().sum())
    return per_row, metrics


def map_row_chunks(batch, rows: int, fn) -> torch.Tensor:
    """``fn`` on consecutive row slices of ``batch`` (``rows`` at a time, 0 = all), results
    concatenated along dim 0. Every row's randomness comes from its own seed, so chunking changes
    memory only, not the result."""
    n = len(batch)
    if rows <= 0 or rows >= n:
        return fn(batch)
    return torch.cat([fn(batch.slice(start, min(start + rows, n))) for start in range(0, n, rows)], dim=0)


def check_grpo_options(config) -> None:
    """Validate the options every GRPO-style config shares (d1, coupled_grpo)."""
    if config.num_iterations < 1:
        raise ValueError(f"num_iterations must be >= 1, got {config.num_iterations}")
    if config.epsilon < 0 or (config.epsilon_high is not None and config.epsilon_high < 0):
        raise ValueError("epsilon and epsilon_high must be >= 0")
    if config.beta < 0:
        raise ValueError(f"beta must be >= 0, got {config.beta}")
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {config.normalization!r}")
    if config.prepare_batch_size < 0:
        raise ValueError(f"prepare_batch_size must be >= 0, got {config.prepare_batch_size}")
