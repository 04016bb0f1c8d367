"""An example dare plugin, written as a third-party package would be.

It registers:
  * dataset ``arithmetic``: synthetic two-operand sums and differences with worked
    answers ending in ``#### N``; splits train / heldout / test, generated from a seed.
  * reward ``exact_answer``: 1.0 when the number after the last ``####`` of a completion
    equals the row's ``ground_truth``, else 0.0.
"""
from __future__ import annotations

import random
import re

import dare
from dare.registry import Dataset, Reward

SPLIT_SEEDS = {"train": 0, "heldout": 1, "test": 2}


def load(split: str, size: int = 2000, max_operand: int = 50, limit: int | None = None) -> list[dict]:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"arithmetic: unknown split {split!r} (train, heldout, test)")
    rng = random.Random(SPLIT_SEEDS[split])
    rows = []
    for _ in range(limit or size):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        value = a + b if op == "+" else a - b
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {a} {op} {b}?"}],
            "response": f"{a} {op} {b} = {value}\n#### {value}",
            "ground_truth": str(value),
        })
    return rows


_ANSWER = re.compile(r"####\s*(-?\d+)")


def exact_answer(prompts, completions, ground_truth, **row) -> list[float]:
    scores = []
    for completion, truth in zip(completions, ground_truth):
        found = _ANSWER.findall(completion)
        scores.append(1.0 if found and found[-1] == str(truth).strip() else 0.0)
    return scores


@dare.hookimpl
def register_datasets(register):
    register(Dataset(name="arithmetic", load=load, splits=("train", "heldout", "test"),
                     description="synthetic +/- problems with '#### N' answers (example plugin)"))


@dare.hookimpl
def register_rewards(register):
    register(Reward(name="exact_answer", fn=exact_answer,
                    description="1.0 if the '#### N' answer equals ground_truth (example plugin)"))
