"""The ``gsm8k`` dataset: GSM8K from the local parquet files of the shared data folder.

Splits:
  train    SFT layout (``sft/train/gsm8k.parquet``) minus its last 256 rows: prompt + solution.
  heldout  the last 256 rows of the SFT file (never trained on): held-out loss.
  test     the official test split in RL layout (``rl/test/gsm8k.parquet``): prompt +
           ground truth only (``response`` is absent).

Options: ``root`` (default ``${DARE_SHARED:-../shared}/data``), ``limit``.
Rows: ``{"prompt": [chat messages], "response": str | None, "ground_truth": str}``.
"""
from __future__ import annotations

import os
from pathlib import Path

import dare
from dare.registry import Dataset

HELDOUT = 256


def default_root() -> Path:
    return Path(os.environ.get("DARE_SHARED", "../shared")) / "data"


def load(split: str, root: str | None = None, limit: int | None = None) -> list[dict]:
    import pyarrow.parquet as pq

    root_path = Path(root) if root else default_root()
    file = root_path / ("rl/test/gsm8k.parquet" if split == "test" else "sft/train/gsm8k.parquet")
    if not file.is_file():
        raise FileNotFoundError(f"gsm8k: {file} not found (set data.options.root or DARE_SHARED)")
    table = pq.read_table(file)
    if split == "train":
        table = table.slice(0, table.num_rows - HELDOUT)
    elif split == "heldout":
        table = table.slice(table.num_rows - HELDOUT, HELDOUT)
    elif split != "test":
        raise ValueError(f"gsm8k: unknown split {split!r} (train, heldout, test)")
    if limit is not None:
        table = table.slice(0, limit)
    rows = []
    for r in table.to_pylist():
        extra = r.get("extra_info") or {}
        rows.append({
            "prompt": [{"role": m["role"], "content": m["content"]} for m in r["prompt"]],
            "response": extra.get("answer"),
            "ground_truth": r["reward_model"]["ground_truth"],
        })
    return rows


@dare.hookimpl
def register_datasets(register):
    register(Dataset(name="gsm8k", load=load, splits=("train", "heldout", "test"),
                     description="GSM8K grade-school math (local parquet, SFT and RL layouts)"))
