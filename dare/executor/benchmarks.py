"""Benchmarks over evaluator workers: shard, gather, record.

Used by the training driver (every ``evaluator.every`` steps, on the live weights) and by
``dare eval`` (standalone, on checkpoints). Every benchmark's rows are split into contiguous
shards, one per evaluator worker; all shards of all benchmarks are in flight at once.
"""
from __future__ import annotations

from pathlib import Path

import ray

from dare.evaluation import RESULTS_FILE, Checkpoint, Timer, append_jsonl, make_record
from dare.executor.rollouts import split


def run_benchmarks(workers: list, registry, specs: list, sampler: str, sampler_args: dict, batch_size: int,
                   seed: int, checkpoint: Checkpoint, out_dir: Path) -> list[dict]:
    """Run ``specs`` (``dare.recipe.BenchmarkSpec``) on ``workers``; append one result record
    per benchmark to ``out_dir/eval_results.jsonl`` and the predictions to
    ``out_dir/predictions/<run>/<step>/<benchmark>.jsonl``; return the records."""
    pending = []
    with Timer() as total:
        for spec in specs:
            rows = registry.benchmarks.get(spec.name).load(limit=spec.limit, few_shot=spec.few_shot, **spec.options)
            if not rows:
                raise ValueError(f"benchmark {spec.name!r} returned no rows")
            futures = [w.run_benchmark.remote(spec.name, rows[a:b], sampler, sampler_args, batch_size, seed + a)
                       for w, (a, b) in zip(workers, split(len(rows), len(workers)))]
            pending.append((spec, futures))
        results = [(spec, [p for part in ray.get(futures) for p in part]) for spec, futures in pending]
    records = []
    step = "final" if checkpoint.step is None else f"step_{checkpoint.step:08d}"
    for spec, predictions in results:
        record = make_record(checkpoint, spec.name, predictions, sampler, sampler_args, spec.few_shot,
                             total.seconds)
        records.append(record)
        append_jsonl(out_dir / "predictions" / checkpoint.run / step / f"{spec.name}.jsonl", predictions)
    append_jsonl(out_dir / RESULTS_FILE, records)
    return records


def format_table(records: list[dict]) -> str:
    lines = ["| run | step | benchmark | score | n | time (s) |", "|---|---|---|---|---|---|"]
    for r in records:
        step = "-" if r["step"] is None else r["step"]
        lines.append(f"| {r['run']} | {step} | {r['benchmark']} | {100 * r['score']:.1f} | {r['n']} | {r['time_s']:.1f} |")
    return "\n".join(lines)
