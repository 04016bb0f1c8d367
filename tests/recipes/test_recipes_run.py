"""Every recipe in recipes/ gets a tiny smoke run on the fixtures (a few steps, small data)."""
import json
from pathlib import Path

import pytest

from dare import recipe as recipes

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
SMOKE = ["learner.steps=2", "learner.workers=1", "learner.global_batch_size=2", "learner.micro_batch_size=1",
         "data.limit=16", "data.eval_limit=2", "evaluator.every=2", "evaluator.num_samples=1",
         "run.checkpoint_every=0", "run.tensorboard=false"]
# the smallest Monte-Carlo budget of each algorithm, to keep the smoke runs short
BUDGET = {"dpo": ["algorithm.n_mc=1"], "vrpo": ["algorithm.n_t=1"], "spg": ["algorithm.block_length=4"]}
RL = ["learner.global_batch_size=4", "rollout.group_size=2", "algorithm.num_iterations=1"]
# short generations (the samplers' own argument names)
GENERATION = {
    "llada": {"steps": 4, "gen_length": 8, "block_length": 8},
    "dream": {"steps": 4, "max_new_tokens": 8},
    "sdar": {"gen_length": 8, "block_length": 4, "denoising_steps": 4},
}


def short_generation(rec) -> list[str]:
    out = []
    for key in ("sampler_args", "eval_sampler_args"):
        if getattr(rec.rollout, key) is not None:
            out += [f"rollout.{key}.{k}={v}" for k, v in GENERATION[rec.model.family].items()]
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_smoke_run(path, shared, tmp_path, ray_cluster, monkeypatch, recipe_overrides):
    from dare.executor.driver import run
    from dare.plugins import registry
    monkeypatch.setenv("DARE_SHARED", str(shared("")))
    model = recipe_overrides(path)
    algorithm = registry().algorithms.get(recipes.load(path, model).algorithm_name)
    extra = BUDGET.get(algorithm.name, []) + (RL if algorithm.kind == "rl" else [])
    overrides = SMOKE + extra + model + [f"run.output_dir={tmp_path}", "data.eval_limit=2"]
    first = recipes.load(path, overrides)
    benchmarks = [f"evaluator.benchmarks=[{', '.join(f'{{name: {b.name}, limit: 2}}' for b in first.evaluator.benchmarks)}]"]
    rec = recipes.load(path, overrides + short_generation(first) + (benchmarks if first.evaluator.benchmarks else []))
    run_dir = run(rec, str(path), progress=False)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in train] == [1, 2] and all(m["loss"] == m["loss"] for m in train)
    assert [m["step"] for m in evals] == [0, 2]
    if rec.evaluator.benchmarks:  # benchmarks ran on the live weights at every evaluation
        records = [json.loads(x) for x in (run_dir / "eval_results.jsonl").read_text().splitlines()]
        k = len(rec.evaluator.benchmarks)
        assert [r["step"] for r in records] == [0] * k + [2] * k and all(r["n"] == 2 for r in records)
    assert (run_dir / "checkpoints" / "step_00000002" / "trainer_state.pt").is_file()
    assert (run_dir / "samples.jsonl").read_text().strip()
