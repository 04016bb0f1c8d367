"""Scoring completions with reward plugins, in parallel Ray tasks, tolerating failures.

Each reward function is called on chunks of the batch as ``fn(prompts, completions,
**columns)`` in Ray tasks. A chunk that raises or exceeds ``timeout_s`` is retried one
sample at a time; a sample that still raises or times out scores 0.0, is counted in
``reward_failures`` and reported back (the run continues).
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field

import ray

from dare.registry import Reward


@ray.remote(num_cpus=0.25, max_retries=0)
def _call(fn, prompts, completions, columns):
    scores = fn(prompts, completions, **columns)
    if len(scores) != len(completions):
        raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
    return [float(s) for s in scores]


@dataclass
class Scored:
    """total: (N,) weighted sum per sample; per_function: name -> N scores; failures: logs."""

    total: list[float]
    per_function: dict[str, list[float]]
    failures: list[dict] = field(default_factory=list)


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = [k for k in rows[0] if k not in ("prompt", "response", "chosen", "rejected")]
    return {k: [r.get(k) for r in rows] for k in keys}


def _run(fn, prompts, completions, columns, timeout_s):
    ref = _call.remote(fn, prompts, completions, columns)
    try:
        return ray.get(ref, timeout=timeout_s), None
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        return None, f"timed out after {timeout_s}s"
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return None, f"{type(cause).__name__}: {cause}"


def score(rewards: list[tuple[Reward, float]], prompts: list[str], completions: list[str], rows: list[dict],
          timeout_s: float = 30.0, workers: int = 2) -> Scored:
    n = len(completions)
    columns = _columns(rows)
    total = [0.0] * n
    per_function: dict[str, list[float]] = {}
    failures: list[dict] = []
    size = max(1, math.ceil(n / workers))
    for reward, weight in rewards:
        chunks = [(i, min(n, i + size)) for i in range(0, n, size)]
        refs = [_call.remote(reward.fn, prompts[a:b], completions[a:b], {k: v[a:b] for k, v in columns.items()})
                for a, b in chunks]
        scores: list[float] = [0.0] * n
        for (a, b), ref in zip(chunks, refs):
            try:
                scores[a:b] = ray.get(ref, timeout=timeout_s)
                continue
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref, force=True)
            except Exception:
                pass
            for i in range(a, b):  # find the failing samples one by one
                got, error = _run(reward.fn, prompts[i:i + 1], completions[i:i + 1],
                                  {k: v[i:i + 1] for k, v in columns.items()}, timeout_s)
                if got is None or not math.isfinite(got[0]):
                    failures.append({"reward": reward.name, "index": i, "error": error or f"non-finite {got}",
                                     "completion": completions[i][:500]})
                    scores[i] = 0.0
                else:
                    scores[i] = got[0]
        per_function[reward.name] = scores
        total = [t + weight * s for t, s in zip(total, scores)]
    return Scored(total, per_function, failures)


def score_local(rewards: list[tuple[Reward, float]], prompts, completions, rows) -> Scored:
    """In-process scoring (no Ray), with the same failure rule but no timeout."""
    columns = _columns(rows)
    total = [0.0] * len(completions)
    per_function, failures = {}, []
    for reward, weight in rewards:
        scores = []
        for i in range(len(completions)):
            try:
                scores.append(float(reward.fn(prompts[i:i + 1], completions[i:i + 1],
                                              **{k: v[i:i + 1] for k, v in columns.items()})[0]))
            except Exception as exc:
                failures.append({"reward": reward.name, "index": i, "error": f"{type(exc).__name__}: {exc}",
                                 "trace": traceback.format_exc(limit=2)})
                scores.append(0.0)
        per_function[reward.name] = scores
        total = [t + weight * s for t, s in zip(total, scores)]
    return Scored(total, per_function, failures)
