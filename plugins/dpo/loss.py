"""DPO for masked diffusion LMs with ELBO log-likelihoods (LLaDA 1.5, "DPO-E").

For a pair (x, y_w, y_l) and ELBO estimates B (``dare.elbo``) of the policy pi_theta and the
frozen reference pi_ref, the preference score and the loss of the pair are

    s = (B_theta(y_w) - B_ref(y_w)) - (B_theta(y_l) - B_ref(y_l))
    loss = -log sigmoid(beta * s)

and the implicit rewards are r_w = beta (B_theta(y_w) - B_ref(y_w)), r_l likewise, so the
reward margin r_w - r_l = beta * s. Only the estimator of B differs between ``dpo`` (plain:
iid timesteps, policy and reference scored on independent masks) and ``vrpo`` (stratified
timesteps, shared masks); both call ``elbo_preference_loss`` with their own masks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dare.elbo import MCMasks, elbo
from dare.protocol import TokenBatch


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-pair DPO loss (P,) from (estimated) log-likelihoods, plus metrics summed over pairs.

    All inputs are (P,). Metrics: reward_chosen / reward_rejected (beta * log-ratio),
    reward_margin (beta * s), reward_accuracy (pairs with s > 0), elbo_chosen /
    elbo_rejected (the policy's estimates).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    score = chosen_ratio - rejected_ratio
    loss = -F.logsigmoid(beta * score)
    with torch.no_grad():
        metrics = {
            "reward_chosen": float(beta * chosen_ratio.sum()),
            "reward_rejected": float(beta * rejected_ratio.sum()),
            "reward_margin": float(beta * score.sum()),
            "reward_accuracy": float((score > 0).float().sum()),
            "elbo_chosen": float(policy_chosen.sum()),
            "elbo_rejected": float(policy_rejected.sum()),
        }
    return loss, metrics


def pair_seeds(seeds: torch.Tensor) -> torch.Tensor:
    """Noise seeds with each rejected row (2k+1) given its chosen row's seed (2k).

    Common random numbers for the pair: chosen and rejected responses of one prompt occupy the
    same positions (same prompt, both padded to the batch length), so equal seeds draw the same
    timesteps and mask the same positions in both. Each ELBO estimate keeps its distribution
    (unbiased), but the noise from the tokens the two responses share (the common reasoning
    prefix, the EOS padding) now cancels in B(y_w) - B(y_l) instead of adding up.
    """
    out = seeds.clone()
    out[1::2] = seeds[0::2]
    return out


def check_pairs(batch: TokenBatch) -> None:
    if len(batch) % 2:
        raise ValueError(f"preference batches hold (chosen, rejected) row pairs; got {len(batch)} rows")


def elbo_preference_loss(model, reference, family, batch: TokenBatch, policy_masks: MCMasks,
                         reference_masks: MCMasks, beta: float, mc_chunk: int = 0,
                         length_normalize: bool = False):
    """DPO loss per pair (P,) and metrics, with the policy scored on ``policy_masks`` and the
    reference on ``reference_masks`` (the same object for antithetic sampling).

    Rows 2k / 2k+1 of ``batch`` are the chosen / rejected response of pair k. With
    ``length_normalize`` every ELBO is divided by its number of response tokens (DARE's
    actor reports the ELBO per response token).
    """
    check_pairs(batch)
    if reference is None:
        raise ValueError("ELBO-based DPO needs the frozen reference policy (reference=None given)")
    ids = batch.input_ids
    policy = elbo(family, model, ids, policy_masks, mc_chunk)
    with torch.no_grad():
        ref = elbo(family, reference, ids, reference_masks, mc_chunk)
    if length_normalize:
        lengths = batch.loss_mask.sum(dim=1).clamp_min(1).to(policy.dtype)
        policy, ref = policy / lengths, ref / lengths
    return dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta)
