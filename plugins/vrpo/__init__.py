"""The ``vrpo`` algorithm: Variance-Reduced Preference Optimization (LLaDA 1.5).

The same ELBO-DPO loss as ``dpo`` (-log sigmoid(beta * s)), with the score s estimated by
VRPO: a budget of n_t * n_yt samples per ELBO, stratified timesteps, and antithetic
sampling (policy and reference share timesteps and masks). See ``loss.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import dare
from dare.protocol import TokenBatch
from dare.registry import Algorithm, ModelFamily
from dare_plugins.dpo import model_config

from .loss import vrpo_loss, vrpo_masks

__all__ = ["VRPOConfig", "vrpo", "vrpo_loss", "vrpo_masks"]


@dataclass
class VRPOConfig:
    """Options of ``algorithm: {name: vrpo, ...}``.

    beta: DPO temperature on the ELBO log-ratio.
    n_t: timesteps per ELBO (stratified: one in each of n_t equal strata).
    n_yt: masks per timestep; the paper's optimal allocation is n_yt = 1 (budget n_t * n_yt).
    estimator: "count" (mask exactly l ~ U{1..R} tokens, weight R/l) or "time" (mask each
        token with probability t, weight 1/t); see ``dare.elbo``.
    eps: lower bound of t for the "time" estimator.
    mc_chunk: samples per forward (0 = all n_t * n_yt at once); smaller bounds memory.
    length_normalize: divide each ELBO by its number of response tokens (DARE's scale).
    couple_pairs: chosen and rejected share timesteps and masks too (see ``DPOConfig``).
    """

    beta: float = 0.1
    n_t: int = 8
    n_yt: int = 1
    estimator: Literal["count", "time"] = "count"
    eps: float = 1e-3
    mc_chunk: int = 0
    length_normalize: bool = False
    couple_pairs: bool = False

    def __post_init__(self):
        if self.n_t < 1 or self.n_yt < 1:
            raise ValueError(f"n_t and n_yt must be >= 1, got n_t={self.n_t}, n_yt={self.n_yt}")
        if self.mc_chunk < 0:
            raise ValueError(f"mc_chunk must be >= 0, got {self.mc_chunk}")


def vrpo(model: torch.nn.Module, batch: TokenBatch, config: VRPOConfig, family: ModelFamily,
         reference=None):
    """``Algorithm.loss`` of ``vrpo``: per-pair loss (B/2,) and metrics summed over pairs."""
    mask_id = family.special_tokens(model_config(model)).mask_id
    return vrpo_loss(model, reference, family, batch, mask_id, config.beta, config.n_t, config.n_yt,
                     config.estimator, config.eps, config.mc_chunk, config.length_normalize, config.couple_pairs)


@dare.hookimpl
def register_algorithms(register):
    register(Algorithm(
        name="vrpo", config_type=VRPOConfig, loss=vrpo, kind="supervised",
        description="VRPO (LLaDA 1.5): ELBO-DPO with stratified timesteps and antithetic "
                    "policy/reference masks",
        rows_per_unit=2, data_format="preference", needs_reference=True,
    ))
