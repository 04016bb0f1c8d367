"""Benchmarks on a model: generation, scoring, result records (no Ray here).

Evaluator workers call ``generate_and_score`` on their shard of a benchmark; the driver
(``dare.executor.benchmarks``) shards, gathers and writes the records. A result record is
one JSON line of ``eval_results.jsonl`` (the format ``dare leaderboard`` reads)::

    {"run", "model", "checkpoint", "step", "recipe", "benchmark", "score", "n", "sampler",
     "sampler_args", "few_shot", "time_s", "dare_version", "created"}
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_FILE = "eval_results.jsonl"
RECORD_KEYS = ("run", "model", "checkpoint", "step", "recipe", "benchmark", "score", "n", "sampler",
               "sampler_args", "few_shot", "time_s", "dare_version", "created")


@dataclass
class Checkpoint:
    """A model folder to evaluate, and where it came from. During training ``path`` is the
    run directory (live weights, no checkpoint folder) and ``model`` the starting model."""

    path: Path
    run: str
    step: int | None = None
    recipe: str | None = None
    model: str | None = None


def resolve(path: str | Path, all_checkpoints: bool = False) -> list[Checkpoint]:
    """A model folder, a checkpoint of a run, or a run directory (its latest checkpoint, or
    every checkpoint with ``all_checkpoints``) -> the folders to evaluate."""
    path = Path(path).resolve()
    if (path / "config.json").is_file():
        step = int(path.name.split("_")[1]) if path.name.startswith("step_") else None
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        name = run_dir.name if run_dir is not None else path.name
        recipe = run_dir / "recipe.yaml" if run_dir is not None else None
        return [Checkpoint(path, name, step, str(recipe) if recipe and recipe.is_file() else None)]
    checkpoints = path / "checkpoints"
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"{path} is neither a model folder (config.json) nor a run directory "
                                "(checkpoints/)")
    folders = sorted(p for p in checkpoints.glob("step_*") if (p / "config.json").is_file())
    if not all_checkpoints:
        latest = checkpoints / "latest"
        if latest.is_file():
            folders = [checkpoints / latest.read_text().strip()]
        folders = folders[-1:]
    if not folders:
        raise FileNotFoundError(f"run directory {path} has no complete checkpoint")
    recipe = path / "recipe.yaml"
    return [Checkpoint(f, path.name, int(f.name.split("_")[1]), str(recipe) if recipe.is_file() else None)
            for f in folders]


def load_for_eval(path: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A checkpoint's model for inference; a LoRA checkpoint (``adapter/``) is merged into its base."""
    from dare.checkpoint import load_model
    from dare.lora import load_adapter, merged_state_dict

    path = Path(path)
    adapter = path / "adapter"
    if not adapter.is_dir():
        return load_model(path, dtype)
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = merged_state_dict(load_adapter(load_model(base_path, dtype), adapter, trainable=False))
    model = load_model(base_path, dtype)
    model.load_state_dict(merged, strict=True)
    return model


def generate_and_score(engine, tokenizer, special, benchmark, rows: list[dict], sampler: str | None,
                       sampler_args: dict, batch_size: int, seed: int) -> list[dict]:
    """Generate one completion per row (left-padded batches) and score it.

    Returns one prediction per row: ``{id, completion, prediction, score, ground_truth, nfe}``
    where ``nfe`` is the model calls of the row's batch divided by the batch's rows.
    ``seed`` + the batch's first row index seed each batch's draws.
    """
    from dare.data import encode_prompt, left_pad
    from dare.executor.rollouts import completion_mask

    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, r["prompt"]) for r in chunk]
        batch = left_pad(prompts, special.pad_id)
        gen = engine.generate(batch.input_ids, batch.attention_mask, sampler, sampler_args, seed + start)
        comps = gen.sequences[:, batch.input_ids.shape[1]:]
        keep = completion_mask(comps, special.eos_id)
        for row, comp, k in zip(chunk, comps, keep):
            text = tokenizer.decode(comp[k], skip_special_tokens=True)
            value, prediction = benchmark.score(text, row)
            out.append({"id": row["id"], "completion": text, "prediction": prediction, "score": float(value),
                        "ground_truth": row.get("ground_truth"), "nfe": gen.nfe / len(chunk)})
    return out


def make_record(checkpoint: Checkpoint, benchmark: str, predictions: list[dict], sampler: str,
                sampler_args: dict, few_shot: int | None, time_s: float) -> dict:
    import dare

    n = len(predictions)
    return {
        "run": checkpoint.run, "model": checkpoint.model or str(checkpoint.path),
        "checkpoint": str(checkpoint.path) if (Path(checkpoint.path) / "config.json").is_file() else None,
        "step": checkpoint.step, "recipe": checkpoint.recipe, "benchmark": benchmark,
        "score": sum(p["score"] for p in predictions) / n if n else 0.0, "n": n,
        "sampler": sampler, "sampler_args": {k: v for k, v in sampler_args.items() if k != "generator"},
        "few_shot": few_shot, "time_s": round(time_s, 3), "dare_version": dare.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def append_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
