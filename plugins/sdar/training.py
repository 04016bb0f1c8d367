"""SDAR as a denoiser in training: ``ModelFamily.denoiser_logits`` of the sdar family.

As in the training branch of the reference ``modeling_sdar.py`` (``prepare_for_bd_training``),
the noisy and the clean copy of each row are run together as one sequence ``[noisy | clean]`` of
length 2L, both halves with position ids 0..L-1, under the block-diffusion mask
(:func:`~dare_plugins.sdar.modeling.block_diffusion_training_mask`): a noisy block attends to
itself and to the clean blocks before it, a clean block to the clean blocks up to itself. The
logits of the noisy half score the clean tokens at the same positions (no shift).

One row is one sample here: the reference packs several samples per row and builds the mask
per sample; dare's rows are single prompt/response pairs (padding is trained on), so the whole
row is one sample with positions 0..L-1.
"""
from __future__ import annotations

import torch

from dare_plugins.sdar.modeling import build_training_inputs

__all__ = ["denoiser_logits"]


def _config(model: torch.nn.Module) -> dict:
    cfg = getattr(model, "hf_config", None)
    if cfg is None and hasattr(model, "get_base_model"):  # a peft wrapper
        cfg = model.get_base_model().hf_config
    if cfg is None:
        raise TypeError(f"{type(model).__name__} has no hf_config; expected an SDAR family model")
    return cfg


def denoiser_logits(model: torch.nn.Module, noisy_ids: torch.Tensor, clean_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V): ``[:, j]`` scores ``clean_ids[:, j]`` given the noisy row and the clean
    blocks before j's block, from one forward of ``[noisy | clean]`` under the training mask."""
    if noisy_ids.shape != clean_ids.shape:
        raise ValueError(f"noisy_ids {tuple(noisy_ids.shape)} and clean_ids {tuple(clean_ids.shape)} differ in shape")
    length = clean_ids.shape[1]
    ids, position_ids, mask = build_training_inputs(clean_ids, noisy_ids, int(_config(model)["block_size"]))
    logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    return logits[:, :length]
