"""torch_engine plugin: dare's native rollout engine ``torch``.

The registered samplers run in the worker's own process on the worker's own model, so a
weight update is a ``load_state_dict`` into that model (nothing to copy when the worker
already loaded the weights into it). An external engine (SGLang, vLLM's dLLM path, lmdeploy)
implements the same two methods in its own package; see docs/rollout.md.
"""
from __future__ import annotations

import inspect

import torch

import dare
from dare.generation import generate
from dare.plugins import registry
from dare.protocol import GenerationOutput
from dare.registry import RolloutEngine


class TorchEngine:
    """Generation with dare's samplers on an in-process model.

    options: ``threads`` (intra-op threads for generation; default: leave as set).
    """

    def __init__(self, model: torch.nn.Module, options: dict | None = None):
        options = dict(options or {})
        threads = options.pop("threads", None)
        options.pop("model_path", None)
        if options:
            raise ValueError(f"rollout engine 'torch' got unknown options: {', '.join(sorted(options))} "
                             "(it takes: threads)")
        if threads:
            torch.set_num_threads(int(threads))
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, sampler: str | None,
                 sampler_args: dict, seed: int | None = None) -> GenerationOutput:
        """Run ``sampler`` (None: the family's default). ``seed`` seeds a ``torch.Generator``
        when the sampler takes one, else the global RNG, so every call is reproducible."""
        self.model.eval()
        kwargs = dict(sampler_args)
        if seed is not None:
            from dare.generation import family_name

            name = sampler or registry().families.get(family_name(self.model)).default_sampler
            if "generator" in inspect.signature(registry().samplers.get(name).fn).parameters:
                device = next(self.model.parameters()).device
                kwargs["generator"] = torch.Generator(device=device).manual_seed(int(seed))
            else:
                torch.manual_seed(int(seed))
        return generate(self.model, prompt_ids, attention_mask=attention_mask, sampler=sampler, **kwargs)

    def update_weights(self, state_dict: dict, version: int) -> None:
        """Load full weights (checkpoint names) into the model."""
        self.model.load_state_dict(state_dict, strict=True)


ENGINE = RolloutEngine(
    name="torch", create=TorchEngine,
    description="dare's samplers in the worker process (PyTorch, CPU or GPU)",
)


@dare.hookimpl
def register_rollout_engines(register):
    register(ENGINE)
