"""``dare.generate``: run a registered sampler on a loaded model."""
from __future__ import annotations

import torch

from dare.plugins import registry as default_registry
from dare.protocol import GenerationOutput
from dare.registry import Registry


def family_name(model: torch.nn.Module) -> str:
    name = getattr(model, "family", None)
    if name is None:
        base = getattr(model, "base_model", None)  # a peft wrapper
        name = getattr(getattr(base, "model", None), "family", None)
    if name is None:
        raise ValueError("model has no 'family' attribute; load it with dare.load_model")
    return name


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             sampler: str | None = None, registry: Registry | None = None, **sampler_kwargs) -> GenerationOutput:
    """Generate with ``sampler`` (default: the family's default sampler).

    ``sampler_kwargs`` use the original generate function's argument names for the family.
    """
    registry = registry or default_registry()
    family = registry.families.get(family_name(model))
    entry = registry.samplers.get(sampler or family.default_sampler)
    if family.name not in entry.families:
        raise ValueError(
            f"sampler {entry.name!r} does not support family {family.name!r} "
            f"(it supports: {', '.join(entry.families)})"
        )
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    return entry.fn(model, prompt_ids, attention_mask=attention_mask, **sampler_kwargs)
