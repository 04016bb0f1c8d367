"""Monte-Carlo ELBO estimates of log p(y | x) for masked diffusion LMs (preference objectives).

A masked diffusion model has no tractable log-likelihood; DPO-style objectives for dLLMs
(LLaDA 1.5 / VRPO, arXiv:2505.19223) replace log pi(y|x) by its evidence lower bound

    B_pi(y|x) = E_{t ~ U(0,1)} E_{y_t ~ q(y_t | t, y)} [ (1/t) sum_{j: y_t^j = M} log pi(y^j | y_t, x) ]

where q masks every response token independently with probability t (the prompt x stays
clean). Its doubly Monte-Carlo estimate draws n_t timesteps and n_yt masked sequences per
timestep, n = n_t * n_yt samples in all:

    B_hat(y|x) = (1/n) sum_{s=1..n} (1/t_s) sum_{j in masked_s} log pi(y^j | y_{t_s}, x).

Two samplers of (t, mask) are offered; both estimate exactly the same quantity:

``estimator="count"`` (default; LLaDA's low-variance likelihood form, the one DARE's VRPO
    uses in ``_forward_process_vrpo``): draw a masked count l uniform on {1..R} (R = number of
    response tokens), mask exactly l tokens chosen uniformly, and weight by R/l (= 1/t with
    t = l/R). Integrating t out of the 1/t form gives sum_l f(l)/l for both (f(l) = expected
    masked log-prob sum given l masked tokens), so the two are equal in expectation; the count
    form never draws an empty mask and its weight is bounded by R, whereas 1/t is unbounded near
    t = 0, so its variance is lower.
``estimator="time"``: the 1/t form as written above, t = eps + (1 - eps) u (the SFT
    objective's lower bound), each response token masked with probability t.

Timesteps are ``stratified`` (u_k = (k + U_k) / n_t, one draw in each of n_t equal strata) or
iid. All randomness comes from per-row ``torch.Generator``s seeded by the batch's
``noise_seeds`` (``stream`` derives further independent streams from the same seeds, e.g.
the reference policy's independent masks in plain DPO), so a row's samples do not depend on
how a batch is split. The same ``MCMasks`` can be scored by policy and reference: VRPO's
antithetic sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dare.registry import ModelFamily, denoise

ESTIMATORS = ("count", "time")
_MASK64 = (1 << 64) - 1


@dataclass
class MCMasks:
    """Monte-Carlo samples of the forward (masking) process for a batch.

    noisy: (B, n, L) int64, the rows with masked positions replaced by the mask id.
    masked: (B, n, L) bool, True where a response token is masked.
    t: (B, n) float32, the masking level of each sample; the sample's weight is 1/t
        (for ``estimator="count"``, t = l / R exactly). Sample s = k * n_yt + j is mask j of
        timestep k.
    """

    noisy: torch.Tensor
    masked: torch.Tensor
    t: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.t.shape[1])


def stream_seed(seed: int, stream: int) -> int:
    """Seed of an independent random stream derived from a row seed (stream 0 = the seed)."""
    if stream == 0:
        return int(seed)
    x = (int(seed) + (stream * 0x9E3779B97F4A7C15)) & _MASK64  # splitmix64 finaliser
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def draw_masks(input_ids: torch.Tensor, loss_mask: torch.Tensor, seeds: torch.Tensor, mask_id: int,
               n_t: int, n_yt: int = 1, *, stratified: bool = True, estimator: str = "count",
               eps: float = 1e-3, stream: int = 0) -> MCMasks:
    """Draw n = n_t * n_yt masked copies of every row, one generator per row.

    input_ids: (B, L) int64; loss_mask: (B, L) bool, True on the response tokens that may be
    masked (the ELBO is over these); seeds: (B,) int64. Returns ``MCMasks`` on the device of
    ``input_ids``. Rows without response tokens get t = 1 and no mask (their ELBO is 0).
    """
    if n_t < 1 or n_yt < 1:
        raise ValueError(f"need n_t >= 1 and n_yt >= 1, got n_t={n_t}, n_yt={n_yt}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown ELBO estimator {estimator!r} ({', '.join(ESTIMATORS)})")
    B, L = input_ids.shape
    n = n_t * n_yt
    lm = loss_mask.bool().cpu()
    masked = torch.zeros(B, n, L, dtype=torch.bool)
    t = torch.ones(B, n, dtype=torch.float64)
    for i in range(B):
        g = torch.Generator().manual_seed(stream_seed(int(seeds[i]), stream))
        u = torch.rand(n_t, generator=g, dtype=torch.float64)
        if stratified:
            u = (torch.arange(n_t, dtype=torch.float64) + u) / n_t
        u = u.repeat_interleave(n_yt)  # (n,): the n_yt masks of a timestep share it
        positions = lm[i].nonzero().squeeze(1)
        R = positions.numel()
        keys = torch.rand(n, max(R, 1), generator=g, dtype=torch.float64)[:, :R]
        if R == 0:
            continue
        if estimator == "count":
            count = torch.clamp((u * R).floor().long() + 1, max=R)  # uniform on {1..R}
            rank = keys.argsort(dim=1).argsort(dim=1)  # a uniform random order of the positions
            chosen = rank < count[:, None]
            t[i] = count.double() / R
        else:
            level = eps + (1 - eps) * u
            chosen = keys < level[:, None]
            t[i] = level
        masked[i][:, positions] = chosen
    masked = masked.to(input_ids.device)
    noisy = torch.where(masked, torch.full_like(masked, mask_id, dtype=input_ids.dtype),
                        input_ids[:, None, :].expand(B, n, L))
    return MCMasks(noisy=noisy, masked=masked, t=t.float().to(input_ids.device))


def weighted_masked_logprob(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                            t: torch.Tensor) -> torch.Tensor:
    """Per-row (1/t) * sum over masked positions of log p(target) (N,).

    logits: (N, L, V) position-aligned (``[:, j]`` scores ``targets[:, j]``); targets: (N, L)
    int64; masked: (N, L) bool; t: (N,). Only masked positions enter the softmax, so the
    (N, L, V) log-softmax is never materialised.
    """
    rows = masked.nonzero(as_tuple=True)[0]
    logp = -F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
    out = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.float32)
    return out.index_add(0, rows, logp / t[rows].float())


def elbo_terms(family: ModelFamily, model, input_ids: torch.Tensor, masks: MCMasks,
               mc_chunk: int = 0) -> torch.Tensor:
    """The n per-sample ELBO terms (B, n): (1/t_s) sum_{masked_s} log p(y_j | noisy_s).

    ``model`` is the network or any callable with its signature (a ``ReferencePolicy``);
    logits come from ``dare.registry.denoise`` so every family scores token j at position j.
    ``mc_chunk`` > 0 runs the forward over that many samples (of every row) at a time; when
    gradients are on and there is more than one chunk, each chunk is activation-checkpointed,
    so only one chunk's activations are alive at once (at the cost of one more forward).
    """
    B, n, L = masks.noisy.shape
    chunk = n if mc_chunk <= 0 else min(mc_chunk, n)
    recompute = chunk < n and torch.is_grad_enabled()

    def score(noisy, clean, masked, t):
        logits = denoise(family, model, noisy, clean)
        return weighted_masked_logprob(logits, clean, masked, t)

    parts = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        c = stop - start
        args = (masks.noisy[:, start:stop].reshape(B * c, L),
                input_ids.repeat_interleave(c, dim=0),
                masks.masked[:, start:stop].reshape(B * c, L),
                masks.t[:, start:stop].reshape(B * c))
        out = checkpoint(score, *args, use_reentrant=False) if recompute else score(*args)
        parts.append(out.view(B, c))
    return torch.cat(parts, dim=1)


def elbo(family: ModelFamily, model, input_ids: torch.Tensor, masks: MCMasks,
         mc_chunk: int = 0) -> torch.Tensor:
    """The ELBO estimate B_hat(y|x) of every row (B,): the mean of ``elbo_terms`` over samples."""
    return elbo_terms(family, model, input_ids, masks, mc_chunk).mean(dim=1)
