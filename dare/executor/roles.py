"""Role logic of the three workers, as plain classes (usable without Ray in tests).

``actors.py`` turns each into a Ray actor. Constructors take the recipe as a plain dict
and everything else crossing a boundary is a ``dare.protocol`` dataclass.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dare.checkpoint import load_model, save_model
from dare.generation import generate
from dare.lora import apply_lora, base_of, is_peft, load_adapter, merged_state_dict, save_adapter
from dare.plugins import default_manager
from dare.protocol import (EvalResult, GenerationOutput, PromptBatch, RolloutBatch, StepResult, TokenBatch,
                           WeightsUpdate)
from dare.recipe import ModelConfig, Recipe, RolloutConfig, parse_options

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _Role:
    """What every role shares: the recipe, the family and algorithm entries, a model."""

    def __init__(self, recipe: dict, num_threads: float):
        self.recipe = Recipe.model_validate(recipe)
        self._setup(self.recipe.model, self.recipe.rollout, num_threads)
        self.algorithm = default_manager().registry.algorithms.get(self.recipe.algorithm_name)
        self.algo_config = parse_options(self.algorithm.config_type, self.recipe.algorithm_options(), "algorithm")

    def _setup(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, num_threads: float,
               model: torch.nn.Module | None = None) -> None:
        torch.set_num_threads(max(1, int(num_threads)))
        self.model_cfg, self.rollout_cfg = model_cfg, rollout_cfg
        self.family = default_manager().registry.families.get(model_cfg.family)
        self.model = model if model is not None else load_model(model_cfg.path, DTYPES[model_cfg.dtype])
        self.special = self.family.special_tokens(base_of(self.model).hf_config)
        self.version = 0
        self._frozen = None  # reference copy when the algorithm needs one and LoRA is off
        self._engine = None

    def engine(self):
        """The rollout engine (``rollout.engine``), created on first use."""
        if self._engine is None:
            entry = default_manager().registry.engines.get(self.rollout_cfg.engine)
            self._engine = entry.create(self.model, dict(self.rollout_cfg.engine_options,
                                                         model_path=self.model_cfg.path))
        return self._engine

    @property
    def units_per_micro(self) -> int:
        return self.recipe.learner.micro_batch_size

    def _loss(self, batch: TokenBatch):
        reference = ReferencePolicy(self) if self.algorithm.needs_reference else None
        return self.algorithm.loss(self.model, batch, self.algo_config, self.family, reference=reference)

    def set_weights(self, update: WeightsUpdate) -> int:
        self.model.load_state_dict(update.state_dict, strict=True)
        if self._engine is not None and getattr(self._engine, "model", None) is not self.model:
            self._engine.update_weights(update.state_dict, update.version)
        self.version = update.version
        return self.version

    def weights_checksum(self) -> float:
        """Sum of all weights in float64: cheap evidence that two workers hold the same weights."""
        return float(sum(v.double().sum() for v in merged_state_dict(self.model).values()))

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, seed: int | None = None, sampler_args: dict | None = None
                 ) -> GenerationOutput:
        """Sample completions with the recipe's sampler through the rollout engine. ``seed``
        makes every call draw fresh but reproducible samples."""
        cfg = self.rollout_cfg
        kwargs = dict(cfg.sampler_args if sampler_args is None else sampler_args)
        return self.engine().generate(prompts.input_ids, prompts.attention_mask, cfg.sampler, kwargs, seed)


class Learner(_Role):
    """Computes the algorithm's loss and takes optimiser steps, data-parallel over ranks."""

    def __init__(self, recipe: dict, rank: int = 0, world_size: int = 1):
        learner_cfg = Recipe.model_validate(recipe).learner
        super().__init__(recipe, learner_cfg.num_cpus)
        self.rank, self.world_size = rank, world_size
        seed = self.recipe.run.seed
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        if self.recipe.learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        lora = self.recipe.model.lora
        if lora is not None:
            targets = lora.target_modules or list(self.family.lora_target_modules)
            self.model = apply_lora(self.model, lora.r, lora.alpha, lora.dropout, targets)
        self.model.train()
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    # -- set-up -----------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        opt = self.recipe.learner.optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        if opt.name == "adamw":
            return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        return torch.optim.SGD(params, lr=opt.lr, weight_decay=opt.weight_decay)

    def _lr_factor(self, step: int) -> float:
        cfg = self.recipe.learner
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, progress)
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def _autocast(self):
        if self.recipe.learner.precision == "bf16-autocast":
            device = "cuda" if next(self.model.parameters()).is_cuda else "cpu"
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def address(self) -> str:
        """host:port for torch.distributed's rendezvous (called on rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"{_node_ip()}:{port}"

    def init_distributed(self, address: str) -> None:
        backend = "nccl" if torch.cuda.is_available() and self.recipe.learner.num_gpus > 0 else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=self.rank,
                                world_size=self.world_size)
        for p in self.model.parameters():  # identical start even if loading differed
            dist.broadcast(p.data, src=0)

    # -- training ---------------------------------------------------------------------
    def train_step(self, shard: TokenBatch, step: int) -> StepResult:
        cfg = self.recipe.learner
        rows = cfg.micro_batch_size * self.algorithm.rows_per_unit
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0}
        for start in range(0, len(shard), rows):
            with self._autocast():
                per_unit, metrics = self._loss(shard.slice(start, start + rows))
            (per_unit.float().sum() / cfg.global_batch_size).backward()
            sums["loss"] += float(per_unit.detach().sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        sums["tokens"] = float(shard.attention_mask.sum())
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._reduce_and_step()
        sums = self._all_reduce_sums(sums)
        self.scheduler.step()
        self.version = step + 1
        metrics = {"loss": sums.pop("loss") / cfg.global_batch_size, "grad_norm": grad_norm, "lr": lr,
                   "tokens": sums.pop("tokens")}
        metrics.update({k: v / cfg.global_batch_size for k, v in sums.items()})
        return StepResult(step, metrics)

    def train_rl(self, shard: RolloutBatch, step: int) -> StepResult:
        """One RL update on this worker's share of a rollout batch: ``prepare`` (old/ref
        log-probs, no grad), then ``num_iterations`` optimiser steps over the shard."""
        cfg = self.recipe.learner
        per_worker = cfg.global_batch_size // self.world_size
        reference = ReferencePolicy(self) if self.algorithm.needs_reference else None
        if self.algorithm.prepare is not None:
            with torch.no_grad():
                shard = self.algorithm.prepare(self.model, shard, self.algo_config, self.family, reference=reference)
        sums: dict[str, float] = {}
        grad_norms = []
        lr = self.scheduler.get_last_lr()[0]
        iterations = int(getattr(self.algo_config, "num_iterations", 1))
        for iteration in range(iterations):
            shard.iteration = iteration
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, len(shard), cfg.micro_batch_size):
                with self._autocast():
                    per_row, metrics = self.algorithm.loss(self.model, shard.slice(start, start + cfg.micro_batch_size),
                                                           self.algo_config, self.family, reference=reference)
                (per_row.float().sum() / cfg.global_batch_size).backward()
                sums["loss"] = sums.get("loss", 0.0) + float(per_row.detach().sum())
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            grad_norms.append(self._reduce_and_step())
        self.scheduler.step()
        self.version = step + 1
        totals = self._all_reduce_sums(sums)
        denom = cfg.global_batch_size * iterations
        metrics = {k: v / denom for k, v in totals.items()}
        metrics.update(grad_norm=sum(grad_norms) / len(grad_norms), lr=lr, rows_per_worker=float(per_worker))
        return StepResult(step, metrics)

    def _reduce_and_step(self) -> float:
        """All-reduce gradients (sum), clip, optimiser step; returns the gradient norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world_size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        max_norm = self.recipe.learner.grad_clip if self.recipe.learner.grad_clip is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        return norm

    def _all_reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        if self.world_size == 1:
            return sums
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return dict(zip(keys, totals.tolist()))

    def weights(self) -> WeightsUpdate:
        """Full weights under their checkpoint names (LoRA merged in) for rollout/evaluation."""
        return WeightsUpdate({k: v.cpu() for k, v in merged_state_dict(self.model).items()}, self.version)

    def parameters_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().float().flatten().cpu() for p in self.model.parameters()])

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, folder: str, step: int) -> str:
        """Rank 0 writes an HF folder (or the LoRA adapter) plus trainer state, atomically."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.partial")
        if is_peft(self.model):
            base = base_of(self.model)
            save_model(base, tmp, tokenizer_from=self.recipe.model.path, weights=False)
            save_adapter(self.model, tmp / "adapter", self.recipe.model.path)
        else:
            save_model(self.model, tmp, tokenizer_from=self.recipe.model.path)
        state = {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, tmp / "trainer_state.pt")
        if folder.exists():
            import shutil
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return str(folder)

    def load_checkpoint(self, folder: str) -> int:
        folder = Path(folder)
        if is_peft(self.model):
            base = load_model(self.recipe.model.path, DTYPES[self.recipe.model.dtype])
            self.model = load_adapter(base, folder / "adapter", trainable=True)
            self.model.train()
            self.optimizer = self._optimizer()
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        else:
            fresh = load_model(folder, DTYPES[self.recipe.model.dtype])
            self.model.load_state_dict(fresh.state_dict(), strict=True)
        state = torch.load(folder / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.version = state["step"]
        return state["step"]


class Evaluator(_Role):
    """Held-out loss of the current weights (fixed noise, so steps are comparable) and
    benchmarks (generation with a sampler through the rollout engine, then scoring).

    Built from a training recipe, or standalone (``dare eval``) from a ``model`` section,
    an optional ``rollout`` section (engine) and a CPU count; standalone evaluators have no
    algorithm, so only ``run_benchmark`` applies.
    """

    def __init__(self, recipe: dict | None = None, model: dict | None = None, rollout: dict | None = None,
                 num_cpus: float = 1):
        if recipe is not None:
            super().__init__(recipe, Recipe.model_validate(recipe).evaluator.num_cpus)
        else:
            from dare.evaluation import load_for_eval

            self.recipe, self.algorithm, self.algo_config = None, None, None
            model_cfg = ModelConfig.model_validate(model)
            self._setup(model_cfg, RolloutConfig.model_validate(rollout or {}), num_cpus,
                        load_for_eval(model_cfg.path, DTYPES[model_cfg.dtype]))
        self._tokenizer = None

    @torch.no_grad()
    def evaluate(self, batch: TokenBatch, step: int) -> EvalResult:
        """Mean held-out loss per unit, plus the algorithm's metrics (e.g. reward margin)."""
        self.model.eval()
        rpu = self.algorithm.rows_per_unit
        rows = self.recipe.learner.micro_batch_size * rpu
        sums = {"heldout_loss": 0.0}
        for start in range(0, len(batch), rows):
            per_unit, metrics = self._loss(batch.slice(start, start + rows))
            sums["heldout_loss"] += float(per_unit.sum())
            for k, v in metrics.items():
                sums[f"heldout_{k}"] = sums.get(f"heldout_{k}", 0.0) + v
        units = len(batch) // rpu
        return EvalResult(step, {k: v / units for k, v in sums.items()})

    @torch.no_grad()
    def run_benchmark(self, name: str, rows: list[dict], sampler: str | None, sampler_args: dict,
                      batch_size: int, seed: int) -> list[dict]:
        """Generate and score this worker's shard of benchmark ``name``; one prediction per row
        (see ``dare.evaluation.generate_and_score``)."""
        from dare.checkpoint import load_tokenizer
        from dare.evaluation import generate_and_score

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_cfg.path)
        benchmark = default_manager().registry.benchmarks.get(name)
        return generate_and_score(self.engine(), self._tokenizer, self.special, benchmark, rows, sampler,
                                  sampler_args, batch_size, seed)

    def call(self, fn, **kwargs):
        """``fn(model, tokenizer, **kwargs)`` in this worker's process, on its current weights:
        how whole evaluation harnesses run on a worker (e.g. ``dare_plugins.opencompass.run.
        evaluate``, which drives OpenCompass's inferencer and evaluator in-process)."""
        from dare.checkpoint import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_cfg.path)
        self.model.eval()
        return fn(self.model, self._tokenizer, **kwargs)


class Rollout(_Role):
    """Generates completions with a registered sampler on the latest synced weights."""

    def __init__(self, recipe: dict):
        super().__init__(recipe, Recipe.model_validate(recipe).rollout.num_cpus)


class ReferencePolicy:
    """The frozen reference policy of preference/RL objectives, called like the model.

    With LoRA the reference is the same network with its adapters disabled (no second copy
    in memory); otherwise a frozen copy of the starting checkpoint, loaded on first use.
    """

    def __init__(self, role: _Role):
        self.role = role
        self.hf_config = base_of(role.model).hf_config
        self.family = role.family.name

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        model = self.role.model
        if is_peft(model):
            with model.disable_adapter():
                return model(*args, **kwargs)
        if self.role._frozen is None:
            frozen = load_model(self.role.recipe.model.path, DTYPES[self.role.recipe.model.dtype])
            self.role._frozen = frozen.requires_grad_(False).eval()
        return self.role._frozen(*args, **kwargs)


def _node_ip() -> str:
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"
