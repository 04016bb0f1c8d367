"""The ``sft`` algorithm: masked-diffusion supervised fine-tuning.

Objective in ``loss.py``. Position-aligned families (LLaDA) score token j at position j;
for shifted-logit families (Dream), logits are shifted right by one first, as Dream's
trainer does, so position j's score for token j comes from position j - 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import dare
from dare.protocol import TokenBatch
from dare.registry import Algorithm, ModelFamily, denoise

from .loss import forward_noise, masked_diffusion_loss


@dataclass
class SFTConfig:
    """Options of ``algorithm: {name: sft, ...}``.

    eps: lower bound of the masking probability, p_mask = (1 - eps) * t + eps.
    """

    eps: float = 1e-3


def sft_loss(model: torch.nn.Module, batch: TokenBatch, config: SFTConfig, family: ModelFamily,
             reference=None):
    """Per-row masked-diffusion SFT loss (B,) and metrics for one micro-batch."""
    special = family.special_tokens(model_config(model))
    noisy, masked, p_mask = forward_noise(batch.input_ids, batch.loss_mask, batch.noise_seeds,
                                          special.mask_id, config.eps)
    logits = denoise(family, model, noisy, batch.input_ids)
    answer_lengths = batch.loss_mask.sum(dim=1)
    per_row = masked_diffusion_loss(logits, batch.input_ids, masked, p_mask, answer_lengths)
    # metrics are sums over the rows; the learner reports their mean per row
    metrics = {"masked_tokens": float(masked.sum()), "mask_ratio": float(p_mask.sum())}
    return per_row, metrics


def model_config(model: torch.nn.Module) -> dict:
    cfg = getattr(model, "hf_config", None)
    if cfg is None:  # a peft wrapper
        cfg = model.get_base_model().hf_config
    return cfg


@dare.hookimpl
def register_algorithms(register):
    register(Algorithm(name="sft", config_type=SFTConfig, loss=sft_loss, kind="supervised",
                       description="masked-diffusion SFT (LLaDA objective; Dream with shifted logits)"))


@dare.hookimpl
def validate_recipe(recipe, registry):
    if recipe.algorithm_name != "sft" or recipe.model.family not in registry.families:
        return []
    family = registry.families.get(recipe.model.family)
    if family.attention != "bidirectional":
        return [f"algorithm.name: sft does not support the {family.attention} family "
                f"{family.name!r} yet (block-diffusion SFT is a separate objective)"]
    return []
