"""VRPO (LLaDA 1.5, arXiv:2505.19223): DPO-E with a variance-reduced preference score.

The bias and variance of the ELBO-DPO loss and gradient are bounded by the variance of the
estimated score s (``dare_plugins.dpo.loss``). VRPO reduces it, without bias, by

1. budget: n = n_t * n_yt masked samples per ELBO;
2. allocation: n_t = n timesteps with n_yt = 1 mask each (the recommended split) -- here
   the timesteps are also stratified, one in each of n_t equal strata;
3. antithetic sampling: B_theta(y) and B_ref(y) share the same timesteps and masks, so the
   sampling noise common to both cancels in B_theta(y) - B_ref(y).

``vrpo_masks`` draws those shared masks from the batch's per-row seeds; ``vrpo_loss`` scores
policy and reference on them.
"""
from __future__ import annotations

import torch

from dare.elbo import MCMasks, draw_masks
from dare.protocol import TokenBatch
from dare_plugins.dpo.loss import elbo_preference_loss, pair_seeds


def vrpo_masks(batch: TokenBatch, mask_id: int, n_t: int, n_yt: int = 1, estimator: str = "count",
               eps: float = 1e-3, couple_pairs: bool = False) -> MCMasks:
    """The one set of stratified masks (B, n_t * n_yt, L) that policy and reference share
    (with ``couple_pairs`` also chosen and rejected: ``dare_plugins.dpo.loss.pair_seeds``)."""
    seeds = pair_seeds(batch.noise_seeds) if couple_pairs else batch.noise_seeds
    return draw_masks(batch.input_ids, batch.loss_mask, seeds, mask_id, n_t, n_yt,
                      stratified=True, estimator=estimator, eps=eps)


def vrpo_loss(model, reference, family, batch: TokenBatch, mask_id: int, beta: float, n_t: int,
              n_yt: int = 1, estimator: str = "count", eps: float = 1e-3, mc_chunk: int = 0,
              length_normalize: bool = False, couple_pairs: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair VRPO loss (P,) and metrics summed over pairs (see ``dpo_loss``)."""
    masks = vrpo_masks(batch, mask_id, n_t, n_yt, estimator, eps, couple_pairs)
    return elbo_preference_loss(model, reference, family, batch, masks, masks, beta, mc_chunk,
                                length_normalize)
