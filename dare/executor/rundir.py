"""The run directory: resolved recipe, metrics JSONL, samples, TensorBoard, checkpoints.

    runs/<name>/
      recipe.yaml            the resolved recipe (after overrides and env expansion)
      metrics.jsonl          one JSON object per line: {"kind": "train"|"eval", "step", ...}
      samples.jsonl          generations of held-out prompts at each evaluation
      tensorboard/           event files, when tensorboard is installed
      checkpoints/step_00000010/   HF folder (+ adapter/ for LoRA) + trainer_state.pt
      checkpoints/latest     name of the newest complete checkpoint
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml


class RunDir:
    def __init__(self, root: Path, tensorboard: bool = True):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.root.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(root / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    def write_recipe(self, data: dict) -> None:
        (self.root / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def log(self, kind: str, step: int, metrics: dict) -> None:
        record = {"kind": kind, "step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{kind}/{k}", float(v), step)
            self._tb.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        with open(self.root / "samples.jsonl", "a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")

    def metrics(self) -> list[dict]:
        path = self.root / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` (left by a run killed after its last checkpoint)."""
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = self.root / name
            if path.is_file():
                keep = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in keep))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        folder = self.checkpoints / pointer.read_text().strip()
        return folder if (folder / "trainer_state.pt").is_file() else None

    def mark_latest(self, folder: Path, keep: int) -> None:
        tmp = self.checkpoints / ".latest.tmp"
        tmp.write_text(folder.name + "\n")
        os.replace(tmp, self.checkpoints / "latest")
        done = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
