"""A SIGTERM'd run writes a checkpoint of the step it finished, exits cleanly, and resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_checkpoints_and_exits(shared, tmp_path):
    env = dict(os.environ, DARE_SHARED=str(shared("")), RAY_ADDRESS="")
    cmd = [sys.executable, "-m", "dare.cli", "run", str(ROOT / "recipes/llada/sft_gsm8k.yaml"),
           "learner.steps=200", "learner.workers=1", "learner.global_batch_size=2", "learner.micro_batch_size=2",
           "data.limit=32", "data.max_length=128", "evaluator.workers=0", "rollout.workers=0",
           "run.checkpoint_every=0", "run.tensorboard=false", f"run.output_dir={tmp_path}", "run.name=term",
           "ray.num_cpus=2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(x)["kind"] == "train" for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    last = max(json.loads(x)["step"] for x in metrics.read_text().splitlines())
    latest = (tmp_path / "term" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{last:08d}" and last < 200
    assert (tmp_path / "term" / "checkpoints" / latest / "model.safetensors").is_file()
