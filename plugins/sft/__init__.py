"""The ``sft`` algorithm: masked-diffusion supervised fine-tuning for every family.

The objective (``loss.py``) is the same for all families: mask the response of each row at a
per-row noise level t, score the masked tokens with ``dare.registry.denoise`` (so position j's
logits score token j whatever the family's convention), and weight each token's cross-entropy
by 1 / p_mask:

    L_row = (1 / Z) * sum_{j masked} CE(logits_j, x_j) / p_mask,   p_mask = (1 - eps) * t + eps

Options left unset take the reference trainer's value for the family, chosen from the family's
declared traits (not its name), so a new family with the same traits gets the same objective:

=========================  ===============  ===============  ================
option                     bidirectional    shifted_logits   block_causal
                           (LLaDA)          (Dream)          (SDAR)
=========================  ===============  ===============  ================
``eps``                    1e-3             0 (t ~ U(0, 1))  1e-3
``normalize`` (Z)          answer_length    masked_tokens    answer_length
``ensure_masked``          False            False            True
=========================  ===============  ===============  ================

* LLaDA: GUIDELINES.md / DARE ``llada_fsdp_sft_trainer.py`` (CE / t on masked response
  tokens, summed and divided by the answer length).
* Dream: DARE ``dream_fsdp_sft_trainer.py`` (= Dream's own ``fsdp_sft_trainer.py`` with its
  defaults): ``q_sample`` draws t ~ U(0, 1) with no floor, logits are shifted right by one
  (``cat([logits[:, :1], logits[:, :-1]])``, so the first response token is predicted from the
  last prompt position), CE / t is summed over masked tokens and divided by their number.
  ``treat_eos_as_one`` (off there by default) is available here too.
* SDAR: the training branch of ``modeling_sdar.py`` (``forward_add_noise_packed``,
  ``block_attn_mask``, ``FusedLinearDiffusionCrossEntropyLoss``): one t per sequence (not per
  block), at least one masked token, the model run on ``[noisy | clean]`` under the
  block-diffusion mask (the family's ``denoiser_logits``), CE / p_mask summed and divided by the
  number of response tokens.

``normalize: answer_length`` gives Z = number of loss positions of the row (response + EOS
padding); ``masked_tokens`` gives Z = number of masked positions (a row with none contributes 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import dare
from dare.protocol import TokenBatch
from dare.registry import Algorithm, ModelFamily, denoise

from .loss import NORMALIZE, forward_noise, masked_diffusion_loss, row_normalizer


@dataclass
class SFTConfig:
    """Options of ``algorithm: {name: sft, ...}``; ``None`` = the family's reference value.

    eps: floor of the masking probability, p_mask = (1 - eps) * t + eps, in [0, 1).
    normalize: per-row normaliser Z, "answer_length" or "masked_tokens".
    ensure_masked: redraw the noise (up to 10 times), then force one masked response token,
        so that every row has at least one masked token.
    treat_eos_as_one: mask or keep the trailing <EOS> run of a response as a whole.
    """

    eps: float | None = None
    normalize: Literal["answer_length", "masked_tokens"] | None = None
    ensure_masked: bool | None = None
    treat_eos_as_one: bool = False

    def __post_init__(self):
        if self.eps is not None and not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        if self.normalize is not None and self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")


@dataclass(frozen=True)
class Resolved:
    eps: float
    normalize: str
    ensure_masked: bool
    treat_eos_as_one: bool


def family_defaults(family: ModelFamily) -> dict:
    """The reference trainer's settings for a family, from its traits (see the module docstring)."""
    if family.attention == "block_causal":
        return {"eps": 1e-3, "normalize": "answer_length", "ensure_masked": True}
    if family.shifted_logits:
        return {"eps": 0.0, "normalize": "masked_tokens", "ensure_masked": False}
    return {"eps": 1e-3, "normalize": "answer_length", "ensure_masked": False}


def resolve(config: SFTConfig, family: ModelFamily) -> Resolved:
    defaults = family_defaults(family)
    pick = lambda name: defaults[name] if getattr(config, name) is None else getattr(config, name)  # noqa: E731
    return Resolved(float(pick("eps")), pick("normalize"), bool(pick("ensure_masked")), config.treat_eos_as_one)


def sft_loss(model: torch.nn.Module, batch: TokenBatch, config: SFTConfig, family: ModelFamily,
             reference=None):
    """Per-row masked-diffusion SFT loss (B,) and metrics (sums over rows) for one micro-batch."""
    opts = resolve(config, family)
    special = family.special_tokens(model_config(model))
    noisy, masked, p_mask = forward_noise(
        batch.input_ids, batch.loss_mask, batch.noise_seeds, special.mask_id, opts.eps,
        ensure_masked=opts.ensure_masked, eos_id=special.eos_id if opts.treat_eos_as_one else None)
    per_row = sft_objective(model, family, batch.input_ids, noisy, masked, p_mask, batch.loss_mask,
                            opts.normalize)
    # metrics are sums over the rows; the learner reports their mean per row
    metrics = {"masked_tokens": float(masked.sum()), "mask_ratio": float(p_mask.sum())}
    return per_row, metrics


def sft_objective(model: torch.nn.Module, family: ModelFamily, clean: torch.Tensor, noisy: torch.Tensor,
                  masked: torch.Tensor, p_mask: torch.Tensor, loss_mask: torch.Tensor,
                  normalize: str) -> torch.Tensor:
    """Per-row loss (B,) for given noise: the family's denoiser logits, CE / p_mask, / Z."""
    logits = denoise(family, model, noisy, clean)
    return masked_diffusion_loss(logits, clean, masked, p_mask, row_normalizer(normalize, loss_mask, masked))


def model_config(model: torch.nn.Module) -> dict:
    cfg = getattr(model, "hf_config", None)
    if cfg is None:  # a peft wrapper
        cfg = model.get_base_model().hf_config
    return cfg


@dare.hookimpl
def register_algorithms(register):
    register(Algorithm(name="sft", config_type=SFTConfig, loss=sft_loss, kind="supervised",
                       description="masked-diffusion SFT (LLaDA, Dream with shifted logits, "
                                   "SDAR block diffusion); per-family reference defaults"))


@dare.hookimpl
def validate_recipe(recipe, registry):
    if recipe.algorithm_name != "sft" or recipe.model.family not in registry.families:
        return []
    family = registry.families.get(recipe.model.family)
    if family.attention != "bidirectional" and family.denoiser_logits is None:
        return [f"algorithm.name: sft needs the {family.attention} family {family.name!r} to provide "
                f"denoiser_logits (how to run it as a denoiser in training); it provides none"]
    return []
