"""Typed data that crosses worker and plugin boundaries.

Every field documents its shape. B = batch, L = sequence length, P = prompt length,
G = generated length. Only these objects (and plain Python data) are passed between
Ray actors; tensors inside them are always on CPU when they cross a boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelOutput:
    """What a family model's ``forward`` returns.

    logits: (B, L, V) float, raw and unshifted, exactly as the original model returns them
        (Dream: position i scores token i+1; LLaDA/SDAR: position i scores token i).
    past_key_values: family-specific cache object, or None.
    """

    logits: torch.Tensor
    past_key_values: Any = None


@dataclass
class GenerationOutput:
    """What every sampler returns.

    sequences: (B, P + G) int64, prompt followed by the generated tokens, as the original
        generate function returns them.
    unmask_step: (B, G) int64, 0-based global denoising step at which each generated
        position was unmasked (-1 where a position was never unmasked, e.g. after early stop).
    nfe: number of model forward passes used for the whole batch.
    """

    sequences: torch.Tensor
    unmask_step: torch.Tensor
    nfe: int


@dataclass
class TokenBatch:
    """A batch of tokenised prompt/response pairs for a learner step.

    input_ids: (B, L) int64, right-padded with the family's pad/eos id.
    prompt_lengths: (B,) int64, number of prompt tokens at the start of each row.
    attention_mask: (B, L) int64, 1 on real tokens (prompt + response + eos padding
        that the objective trains on), 0 on padding that must be ignored entirely.
    loss_mask: (B, L) bool, True on positions that contribute to the loss (response
        tokens, including trailing eos as the reference SFT trainers do).
    noise_seeds: (B,) int64, one seed per row for the objective's random masking. The
        seed depends only on (run seed, step, row position in the global batch), so the
        noise is the same whatever the number of learner workers, and after a resume.
    """

    input_ids: torch.Tensor
    prompt_lengths: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    noise_seeds: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def slice(self, start: int, stop: int) -> "TokenBatch":
        return TokenBatch(
            self.input_ids[start:stop],
            self.prompt_lengths[start:stop],
            self.attention_mask[start:stop],
            self.loss_mask[start:stop],
            self.noise_seeds[start:stop],
        )

    def chunk(self, n: int) -> list["TokenBatch"]:
        """Split into ``n`` contiguous, equally sized shards (B must divide by n)."""
        if len(self) % n:
            raise ValueError(f"batch of {len(self)} rows does not split into {n} equal shards")
        size = len(self) // n
        return [self.slice(i * size, (i + 1) * size) for i in range(n)]


@dataclass
class RolloutBatch:
    """Completions with their advantages, for an RL learner step (G completions per prompt).

    input_ids: (B, P + C) int64, the left-padded prompt (P columns, same for every row)
        followed by the completion (C columns), exactly as the rollout sampler returned it.
    attention_mask: (B, P + C) int64, 0 on the prompt's left padding, 1 elsewhere.
    completion_mask: (B, C) bool, True on completion tokens that count: up to and
        including the first EOS (the rest, the sampler's EOS padding, does not).
    advantages: (B,) float32, group-relative advantages.
    rewards: (B,) float32, the summed rewards (for logging and SPG's sign split).
    group_ids: (B,) int64, rows with the same id come from the same prompt.
    noise_seeds: (B,) int64, per-row seeds for the estimator's random masks; inner
        iteration k uses ``noise_seeds * 1000 + k`` (a fresh mask per iteration).
    unmask_step: (B, C) int64, the sampler's trajectory (step each position was unmasked).
    extras: per-algorithm tensors filled by ``Algorithm.prepare`` before the updates,
        e.g. {"old_logps": (K, B, C), "ref_logps": (K, B, C)} for K inner iterations.
    iteration: the inner iteration the next loss call belongs to.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    noise_seeds: torch.Tensor
    unmask_step: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    iteration: int = 0

    @property
    def prompt_width(self) -> int:
        return int(self.input_ids.shape[1] - self.completion_mask.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def slice(self, start: int, stop: int) -> "RolloutBatch":
        return RolloutBatch(
            self.input_ids[start:stop], self.attention_mask[start:stop], self.completion_mask[start:stop],
            self.advantages[start:stop], self.rewards[start:stop], self.group_ids[start:stop],
            self.noise_seeds[start:stop], self.unmask_step[start:stop],
            {k: v[:, start:stop] for k, v in self.extras.items()}, self.iteration,
        )

    def chunk(self, n: int) -> list["RolloutBatch"]:
        if len(self) % n:
            raise ValueError(f"batch of {len(self)} rows does not split into {n} equal shards")
        size = len(self) // n
        return [self.slice(i * size, (i + 1) * size) for i in range(n)]


@dataclass
class PromptBatch:
    """Prompts for a rollout worker.

    input_ids: (B, P) int64, left-padded with the family's pad id.
    attention_mask: (B, P) int64, 0 on left padding; None when no row is padded.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


@dataclass
class StepResult:
    """What a learner worker reports after one optimiser step (already all-reduced).

    metrics: scalar floats, e.g. {"loss": ..., "grad_norm": ..., "lr": ..., "tokens": ...}.
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class WeightsUpdate:
    """Weights sent from learner rank 0 to rollout/evaluator workers.

    state_dict: parameter name -> CPU tensor, names exactly as in the checkpoint.
    version: the learner step that produced them.
    """

    state_dict: dict[str, torch.Tensor]
    version: int


@dataclass
class EvalResult:
    """What an evaluator worker reports.

    metrics: scalar floats (e.g. {"heldout_loss": ...}).
    samples: a few decoded generations, {"prompt": str, "completion": str} each.
    """

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
