"""Typed registries, filled by plugins through the ``register_*`` hooks.

A recipe key such as ``algorithm: {name: sft}`` or ``model: {family: llada}`` is a plain
lookup in one of these tables. Each entry type documents what a plugin must provide.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

import torch


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the rest of dare needs, read from config.json / the tokenizer."""

    mask_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None


@dataclass(frozen=True)
class ModelFamily:
    """A model family (LLaDA, Dream, SDAR, ...).

    name: registry key used in recipes (``model.family``).
    model_types: the ``model_type`` values of config.json this family loads.
    build: ``build(config: dict) -> torch.nn.Module`` from the raw config.json dict. The
        module must (a) have parameter names equal to the checkpoint's weight names,
        (b) keep the raw dict as ``module.hf_config`` and set ``module.family = name``,
        (c) create no tensors besides parameters in ``__init__`` (it is built on the meta
        device and weights are assigned), and (d) return ``dare.protocol.ModelOutput``
        from ``forward(input_ids, attention_mask=None, position_ids=None, **kw)``.
    special_tokens: ``special_tokens(config: dict) -> SpecialTokens``.
    default_sampler: the sampler name ``dare.generate`` uses when none is given.
    shifted_logits: True when position i predicts token i+1 (Dream).
    attention: "bidirectional" or "block_causal" (SDAR).
    block_size: ``block_size(config) -> int | None`` for block-causal families.
    lora_target_modules: module-name suffixes peft should adapt.
    load_tokenizer: optional ``load_tokenizer(folder: Path)``; the default loads
        ``tokenizer.json`` as a fast tokenizer, else vocab.json + merges.txt as Qwen2.
    denoiser_logits: optional ``denoiser_logits(model, noisy_ids, clean_ids) -> (B, L, V)``:
        how training objectives run the model as a denoiser; ``[:, j]`` must score
        ``clean_ids[:, j]`` given the noisy sequence. Default (``denoise``): a plain
        forward on ``noisy_ids``, shifted right by one for ``shifted_logits`` families.
        Block-diffusion families (SDAR) concatenate noisy and clean under their
        training mask.
    """

    name: str
    model_types: tuple[str, ...]
    build: Callable[[dict], torch.nn.Module]
    special_tokens: Callable[[dict], SpecialTokens]
    default_sampler: str
    shifted_logits: bool = False
    attention: str = "bidirectional"
    block_size: Callable[[dict], int | None] = lambda config: None
    lora_target_modules: tuple[str, ...] = ()
    load_tokenizer: Callable[[Path], Any] | None = None
    denoiser_logits: Callable[..., torch.Tensor] | None = None


def denoise(family: ModelFamily, model: torch.nn.Module, noisy_ids: torch.Tensor,
            clean_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) of ``model`` as a denoiser: ``[:, j]`` scores ``clean_ids[:, j]``."""
    if family.denoiser_logits is not None:
        return family.denoiser_logits(model, noisy_ids, clean_ids)
    logits = model(noisy_ids).logits
    if family.shifted_logits:  # position j-1 predicts token j; position 0 keeps its own (Dream)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


@dataclass(frozen=True)
class Sampler:
    """A dLLM sampler.

    fn: ``fn(model, prompt_ids, attention_mask=None, **kwargs) -> GenerationOutput``,
        kwargs named as in the original generate function of the family.
    families: family names the sampler works with.
    """

    name: str
    fn: Callable[..., Any]
    families: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Algorithm:
    """A post-training algorithm.

    config_type: a dataclass of the algorithm's own options (the ``algorithm:`` block of a
        recipe minus ``name``); unknown keys are rejected at validation.
    loss: ``loss(model, batch, config, family, reference=None) -> (per_unit_loss, metrics)``,
        run by learner and evaluator workers. A unit is ``rows_per_unit`` consecutive rows
        of the TokenBatch (1 for SFT; 2 for preference pairs: chosen then rejected), so
        ``per_unit_loss`` has shape (B / rows_per_unit,). ``metrics`` are sums over units
        (the learner reports their mean per unit). All randomness comes from
        ``batch.noise_seeds``, so results do not depend on how a batch is split.
        ``reference`` (when ``needs_reference``) is a callable with the model's signature
        returning the frozen reference policy's output under ``torch.no_grad``.
    kind: "supervised" (data -> loss) or "rl" (rollouts -> loss). An rl loss receives a
        ``dare.protocol.RolloutBatch`` (rows_per_unit 1) and returns per-row losses.
    data_format: "sft" (rows with prompt + response) or "preference" (prompt + chosen +
        rejected); rl algorithms read prompts (+ reward columns) and ignore it.
    prepare: rl only, optional ``prepare(model, batch, config, family, reference=None) ->
        RolloutBatch``, run once per rollout batch under ``torch.no_grad`` before the
        updates (e.g. the old policy's and the reference's log-probabilities for every
        inner iteration, stored in ``batch.extras``). The learner then runs
        ``config.num_iterations`` optimiser steps on the batch (default 1), setting
        ``batch.iteration`` before each.
    """

    name: str
    config_type: type
    loss: Callable[..., Any]
    kind: str = "supervised"
    description: str = ""
    rows_per_unit: int = 1
    data_format: str = "sft"
    needs_reference: bool = False
    prepare: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Reward:
    """A reward: ``fn(prompts, completions, **row) -> list[float]``."""

    name: str
    fn: Callable[..., list[float]]
    description: str = ""


@dataclass(frozen=True)
class Dataset:
    """A dataset or benchmark.

    load: ``load(split: str, **options) -> list[dict]``; every row has ``prompt`` (a chat
        message list or a string) and, for supervised data, ``response``; other keys
        (e.g. ``ground_truth``) are passed to rewards and scorers.
    splits: the split names it offers.
    """

    name: str
    load: Callable[..., list[dict]]
    splits: tuple[str, ...] = ("train", "test")
    description: str = ""


@dataclass(frozen=True)
class Benchmark:
    """An evaluation benchmark: a fixed set of problems and a scorer.

    load: ``load(limit=None, few_shot=0, **options) -> list[dict]``; every row has ``id``
        (stable across calls), ``prompt`` (a chat message list or a string, few-shot
        examples already included) and whatever the scorer needs (e.g. ``ground_truth``).
        ``limit`` keeps the first N problems (quick runs); ``few_shot`` prepends that many
        solved examples.
    score: ``score(completion: str, row: dict) -> (score, prediction)``: a float in [0, 1]
        and the answer extracted from the completion (None when none was found), so
        predictions can be checked by hand.
    """

    name: str
    load: Callable[..., list[dict]]
    score: Callable[[str, dict], tuple[float, str | None]]
    description: str = ""


@dataclass(frozen=True)
class RolloutEngine:
    """A generation backend for rollout and evaluator workers.

    create: ``create(model, options: dict) -> engine``; ``model`` is the worker's loaded
        dare model (an external engine may ignore it and load ``model.hf_config`` /
        ``options["model_path"]`` itself). The engine object provides
        ``generate(prompt_ids, attention_mask, sampler, sampler_args, seed) ->
        dare.protocol.GenerationOutput`` (``sampler`` a registered sampler name or None for
        the family default, ``seed`` an int or None) and
        ``update_weights(state_dict, version)`` (full weights under checkpoint names).
    """

    name: str
    create: Callable[..., Any]
    description: str = ""


T = TypeVar("T")


class Table(Generic[T]):
    """A name -> entry table whose errors name what is installed."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self.owner: dict[str, str] = {}

    def add(self, name: str, entry: T, plugin: str) -> None:
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} registered twice: by plugin {self.owner[name]!r} "
                f"and by plugin {plugin!r}"
            )
        self._entries[name] = entry
        self.owner[name] = plugin

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(self.unknown_message(name))
        return self._entries[name]

    def unknown_message(self, name: str) -> str:
        installed = ", ".join(sorted(self._entries)) or "none"
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}; installed: {installed}.{hint}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self):
        return sorted(self._entries.items())


@dataclass
class Registry:
    """All registries, filled once per plugin manager."""

    families: Table[ModelFamily] = field(default_factory=lambda: Table("model family"))
    samplers: Table[Sampler] = field(default_factory=lambda: Table("sampler"))
    algorithms: Table[Algorithm] = field(default_factory=lambda: Table("algorithm"))
    rewards: Table[Reward] = field(default_factory=lambda: Table("reward"))
    datasets: Table[Dataset] = field(default_factory=lambda: Table("dataset"))
    benchmarks: Table[Benchmark] = field(default_factory=lambda: Table("benchmark"))
    engines: Table[RolloutEngine] = field(default_factory=lambda: Table("rollout engine"))

    def family_for_model_type(self, model_type: str) -> ModelFamily:
        for _, fam in self.families.items():
            if model_type in fam.model_types:
                return fam
        known = sorted(t for _, f in self.families.items() for t in f.model_types)
        raise KeyError(
            f"no installed model family loads model_type {model_type!r}; known model types: "
            f"{', '.join(known) or 'none'}"
        )
