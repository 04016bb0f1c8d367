"""YAML recipes -> typed config, with dotted ``key.path=value`` overrides and validation.

Validation happens before any worker starts. Errors name the recipe file and the key
path: an unknown key also names the closest valid key, a wrong type names the expected
type, an unknown family/algorithm/sampler/dataset names the installed ones.

Strings may reference environment variables as ``${NAME}`` or ``${NAME:-default}``;
``DARE_SHARED`` defaults to ``../shared`` (the shared fixtures beside the project root).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

ENV_DEFAULTS = {"DARE_SHARED": "../shared"}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and every bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="default: the family's lora_target_modules")


class ModelConfig(Section):
    family: str = Field(description="registered model family, e.g. llada")
    path: str = Field(description="HF checkpoint folder (config.json + safetensors + tokenizer)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoraConfig | None = None


class DataConfig(Section):
    dataset: str = Field(description="registered dataset name")
    train_split: str = "train"
    eval_split: str | None = Field("heldout", description="split for held-out loss; null disables")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the dataset's load()")
    max_length: int = Field(256, gt=0, description="tokens per row; longer rows are truncated")
    limit: int | None = Field(None, gt=0, description="use only the first N training rows")
    eval_limit: int = Field(16, gt=0, description="held-out rows used for evaluation")


class OptimizerConfig(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)


class LearnerConfig(Section):
    workers: int = Field(1, gt=0, description="data-parallel learner workers")
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    global_batch_size: int = Field(4, gt=0, description="units per optimiser step, all workers (a unit is a row for SFT, a chosen/rejected pair for preference algorithms)")
    micro_batch_size: int = Field(2, gt=0, description="units per forward/backward on one worker")
    steps: int = Field(10, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    precision: Literal["fp32", "bf16-autocast"] = Field(
        "fp32", description="bf16-autocast: float32 master weights, bfloat16 matmuls in forward/backward")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")


class RolloutConfig(Section):
    workers: int = Field(1, ge=0)
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    sampler: str | None = Field(None, description="registered sampler; default: the family's")
    sampler_args: dict[str, Any] = Field(default_factory=dict, description="the sampler's own kwargs")
    eval_sampler_args: dict[str, Any] | None = Field(
        None, description="sampler kwargs for evaluation generations (default: sampler_args)")
    group_size: int = Field(4, gt=0, description="RL: completions sampled per prompt (G)")
    engine: str = Field("torch", description="registered rollout engine (generation backend)")
    engine_options: dict[str, Any] = Field(default_factory=dict, description="the engine's own options")


class RewardTerm(Section):
    name: str = Field(description="registered reward")
    weight: float = 1.0


class RewardConfig(Section):
    functions: list[RewardTerm] = Field(default_factory=list, description="summed with their weights")
    timeout_s: float = Field(30.0, gt=0, description="per call; a sample that fails or times out scores 0")
    advantage: Literal["mean_std", "mean"] = Field(
        "mean_std", description="group-relative advantage: (r - mean) / (std + eps), or r - mean")
    workers: int = Field(2, gt=0, description="parallel Ray tasks per reward function")


class BenchmarkSpec(Section):
    name: str = Field(description="registered benchmark")
    limit: int | None = Field(None, gt=0, description="first N problems only")
    few_shot: int = Field(0, ge=0, description="solved examples prepended to each prompt")
    options: dict[str, Any] = Field(default_factory=dict, description="passed to the benchmark's load()")


class EvaluatorConfig(Section):
    workers: int = Field(1, ge=0)
    num_cpus: float = Field(1, ge=0)
    num_gpus: float = Field(0, ge=0)
    every: int = Field(10, gt=0, description="evaluate every N learner steps (and at the end)")
    num_samples: int = Field(2, ge=0, description="held-out prompts generated by rollout workers")
    benchmarks: list[BenchmarkSpec] = Field(
        default_factory=list, description="benchmarks run by the evaluator workers at every evaluation")
    sampler: str | None = Field(None, description="sampler for benchmarks; default: rollout.sampler")
    sampler_args: dict[str, Any] | None = Field(
        None, description="sampler kwargs for benchmarks; default: rollout.eval_sampler_args, else sampler_args")
    batch_size: int = Field(8, gt=0, description="prompts per generate call on one evaluator worker")


class RunConfig(Section):
    name: str = Field(description="run directory name under output_dir")
    output_dir: str = "runs"
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, gt=0)
    resume: bool = Field(False, description="continue from the latest checkpoint in the run directory")
    tensorboard: bool = True


class RayConfig(Section):
    address: str | None = Field(None, description="join this cluster; default: RAY_ADDRESS or a local one")
    num_cpus: int | None = Field(None, description="CPUs of a local cluster; default: what the workers need")


class Recipe(Section):
    model: ModelConfig
    algorithm: dict[str, Any]
    data: DataConfig
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    run: RunConfig
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def algorithm_name(self) -> str:
        return self.algorithm["name"]

    def algorithm_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.algorithm.items() if k != "name"}


# --- loading ---------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            fallback = default if default is not None else ENV_DEFAULTS.get(name)
            got = os.environ.get(name, fallback)
            if got is None:
                raise RecipeError(f"environment variable {name} is not set and has no default")
            return got
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    return value


def apply_override(data: dict, dotted: str, source: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the nested dict ``data``."""
    if "=" not in dotted:
        raise RecipeError(f"{source}: override {dotted!r} is not of the form key.path=value")
    key, raw = dotted.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                raise RecipeError(f"{source}: override {key!r}: {part!r} is not a section")
        node = node[part]
    node[parts[-1]] = value


def load_raw(path: str | os.PathLike, overrides: list[str] = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item, f"{path} (command-line override)")
    return expand_env(data)


def parse(data: dict, source: str = "<recipe>") -> Recipe:
    """Parse a raw dict into a Recipe, raising RecipeError listing every problem."""
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as exc:
        raise RecipeError(_format_errors(exc, source)) from None
    if "name" not in recipe.algorithm:
        raise RecipeError(f"{source}: algorithm.name is required (e.g. algorithm: {{name: sft}})")
    return recipe


def load(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    return parse(load_raw(path, overrides), str(path))


def _format_errors(exc: pydantic.ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(err["loc"][:-1])
            close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(map(str, err['loc'][:-1] + (close[0],)))!r}?" if close else ""
            lines.append(f"  unknown key {loc!r}{hint} (valid keys here: {', '.join(valid)})")
        elif err["type"] == "missing":
            lines.append(f"  missing required key {loc!r}")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _valid_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _section_type(field.annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _section_type(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or (annotation,):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


# --- validation against installed plugins ----------------------------------------------


def parse_options(config_type: type, options: dict[str, Any], where: str) -> Any:
    """Parse an ``options`` dict into a plugin's config dataclass, rejecting unknown keys."""
    names = [f.name for f in dataclasses.fields(config_type)]
    errors = []
    for key in options:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{where}.{close[0]}'?" if close else ""
            errors.append(f"  unknown key '{where}.{key}'{hint} (valid keys here: {', '.join(names)})")
    if errors:
        raise RecipeError("\n".join(errors))
    try:
        return pydantic.TypeAdapter(config_type).validate_python(options)
    except pydantic.ValidationError as exc:
        raise RecipeError("\n".join(
            f"  {where}.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        )) from None


def validate(recipe: Recipe, source: str, manager=None) -> Any:
    """Check the recipe against installed plugins; returns the algorithm's parsed config."""
    from dare.plugins import default_manager

    manager = manager or default_manager()
    reg = manager.registry
    errors: list[str] = []
    checks = [
        ("model.family", recipe.model.family, reg.families),
        ("algorithm.name", recipe.algorithm_name, reg.algorithms),
        ("data.dataset", recipe.data.dataset, reg.datasets),
    ]
    if recipe.rollout.sampler is not None:
        checks.append(("rollout.sampler", recipe.rollout.sampler, reg.samplers))
    if recipe.evaluator.sampler is not None:
        checks.append(("evaluator.sampler", recipe.evaluator.sampler, reg.samplers))
    checks.append(("rollout.engine", recipe.rollout.engine, reg.engines))
    checks += [(f"evaluator.benchmarks.{i}.name", b.name, reg.benchmarks)
               for i, b in enumerate(recipe.evaluator.benchmarks)]
    for key, name, table in checks:
        if name not in table:
            errors.append(f"  {key}: {table.unknown_message(name)}")
    algo_config = None
    if recipe.algorithm_name in reg.algorithms:
        try:
            algo_config = parse_options(reg.algorithms.get(recipe.algorithm_name).config_type,
                                        recipe.algorithm_options(), "algorithm")
        except RecipeError as exc:
            errors.append(str(exc))
    if recipe.data.dataset in reg.datasets:
        splits = reg.datasets.get(recipe.data.dataset).splits
        for key in ("train_split", "eval_split"):
            split = getattr(recipe.data, key)
            if split is not None and split not in splits:
                errors.append(f"  data.{key}: dataset {recipe.data.dataset!r} has no split {split!r} "
                              f"(splits: {', '.join(splits)})")
    learner = recipe.learner
    if learner.global_batch_size % learner.workers:
        errors.append(f"  learner.global_batch_size ({learner.global_batch_size}) must divide by "
                      f"learner.workers ({learner.workers})")
    elif (learner.global_batch_size // learner.workers) % learner.micro_batch_size:
        errors.append(f"  learner.micro_batch_size ({learner.micro_batch_size}) must divide the "
                      f"per-worker batch ({learner.global_batch_size // learner.workers})")
    algorithm = reg.algorithms.get(recipe.algorithm_name) if recipe.algorithm_name in reg.algorithms else None
    if algorithm is not None and algorithm.kind == "rl":
        if not recipe.reward.functions:
            errors.append("  reward.functions: an rl algorithm needs at least one reward")
        for i, term in enumerate(recipe.reward.functions):
            if term.name not in reg.rewards:
                errors.append(f"  reward.functions.{i}.name: {reg.rewards.unknown_message(term.name)}")
        if learner.global_batch_size % recipe.rollout.group_size:
            errors.append(f"  learner.global_batch_size ({learner.global_batch_size} completions) must divide by "
                          f"rollout.group_size ({recipe.rollout.group_size})")
        if recipe.rollout.workers < 1:
            errors.append("  rollout.workers: an rl algorithm needs at least one rollout worker")
    if not Path(recipe.model.path).is_dir():
        errors.append(f"  model.path: {recipe.model.path!r} is not a directory")
    for plugin_errors in manager.hook.validate_recipe(recipe=recipe, registry=reg):
        errors.extend(f"  {e}" for e in plugin_errors or [])
    if errors:
        raise RecipeError(f"{source}: invalid recipe\n" + "\n".join(errors))
    return algo_config
