"""Benchmarks on evaluator workers: checkpoint resolution, generation + scoring, `dare eval`,
benchmarks during training, result records."""
import json
from pathlib import Path

import pytest
import torch

import dare
from dare import recipe as recipes
from dare.cli import main
from dare.evaluation import RECORD_KEYS, Checkpoint, generate_and_score, make_record, resolve
from dare.plugins import registry
from dare.registry import Benchmark
from dare_plugins.torch_engine import TorchEngine

SAMPLER_ARGS = {"steps": 8, "gen_length": 8, "block_length": 8, "temperature": 0.0}


def fake_run(tmp_path, model_dir, steps=(10, 20)):
    """A run directory whose checkpoints are copies of ``model_dir``."""
    import shutil

    ckpts = tmp_path / "run1" / "checkpoints"
    for s in steps:
        shutil.copytree(model_dir, ckpts / f"step_{s:08d}")
    (ckpts / "latest").write_text(f"step_{steps[-1]:08d}\n")
    (tmp_path / "run1" / "recipe.yaml").write_text("model: {}\n")
    return tmp_path / "run1"


def test_resolve_model_folder_run_dir_and_all_checkpoints(tmp_path, quickstart_model):
    [one] = resolve(quickstart_model)
    assert one.path == quickstart_model.resolve() and one.step is None and one.run == quickstart_model.name
    run = fake_run(tmp_path, quickstart_model)
    [latest] = resolve(run)
    assert latest.step == 20 and latest.run == "run1" and latest.recipe.endswith("recipe.yaml")
    assert [c.step for c in resolve(run, all_checkpoints=True)] == [10, 20]
    [ckpt] = resolve(run / "checkpoints" / "step_00000010")
    assert ckpt.step == 10 and ckpt.run == "run1"
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        resolve(tmp_path)


def test_generate_and_score_matches_a_hand_check(quickstart_model):
    """Each prediction's score is the benchmark's scorer applied to the decoded completion
    (cut at EOS), and completions equal a direct greedy dare.generate call."""
    from dare.data import encode_prompt, left_pad

    model, tok = dare.load_model(quickstart_model), dare.load_tokenizer(quickstart_model)
    special = registry().families.get("llada").special_tokens(model.hf_config)
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": q}], "ground_truth": a}
            for i, (q, a) in enumerate([("321", "123"), ("9", "9"), ("5510", "0155")])]
    seen = []

    def score(completion, row):  # a scorer whose result we can recompute by hand
        seen.append(completion)
        return float(len(completion) % 2 == 0), completion[:1] or None

    bench = Benchmark("toy", load=lambda **kw: rows, score=score)
    preds = generate_and_score(TorchEngine(model), tok, special, bench, rows, None, SAMPLER_ARGS,
                               batch_size=2, seed=0)
    assert [p["id"] for p in preds] == ["r0", "r1", "r2"]
    batch = left_pad([encode_prompt(tok, r["prompt"]) for r in rows[:2]], special.pad_id)
    out = dare.generate(model, batch.input_ids, attention_mask=batch.attention_mask, **SAMPLER_ARGS)
    first = out.sequences[0, batch.input_ids.shape[1]:]
    first = first[: (first == special.eos_id).nonzero()[0, 0]] if (first == special.eos_id).any() else first
    assert preds[0]["completion"] == tok.decode(first, skip_special_tokens=True)
    for p, completion in zip(preds, seen):
        assert p["completion"] == completion
        assert p["score"] == float(len(completion) % 2 == 0)
        assert p["prediction"] == (completion[:1] or None)
    assert preds[0]["nfe"] == 4.0 and preds[2]["nfe"] == 8.0  # 8 steps shared by a batch of 2, then 1


def test_record_has_every_key(quickstart_model):
    rec = make_record(Checkpoint(quickstart_model, "x", 3), "toy", [{"score": 1.0}, {"score": 0.0}], "llada",
                      {"steps": 8, "generator": torch.Generator()}, 0, 1.5)
    assert tuple(rec) == RECORD_KEYS
    assert rec["score"] == 0.5 and rec["n"] == 2 and rec["step"] == 3 and "generator" not in rec["sampler_args"]
    assert rec["checkpoint"] == str(quickstart_model)


def test_dare_eval_sharded_over_two_workers(tmp_path, quickstart_model, ray_cluster, capsys):
    run = fake_run(tmp_path, quickstart_model)
    out = tmp_path / "results"
    code = main(["eval", "--model", str(run), "--all-checkpoints", "--benchmarks", "synthetic", "--limit", "6",
                 "--workers", "2", "--num-cpus", "0.5", "--batch-size", "2", "--steps", "8", "--gen-length", "8",
                 "--block-length", "8", "--temperature", "0", "--output", str(out)])
    assert code == 0
    assert "| run1 | 20 | synthetic |" in capsys.readouterr().out
    records = [json.loads(x) for x in (out / "eval_results.jsonl").read_text().splitlines()]
    assert [(r["step"], r["benchmark"], r["n"]) for r in records] == [(10, "synthetic", 6), (20, "synthetic", 6)]
    preds = [json.loads(x) for x in (out / "predictions" / "run1" / "step_00000020" / "synthetic.jsonl")
             .read_text().splitlines()]
    assert [p["id"] for p in preds] == [f"sort-{i}" for i in range(6)]  # shards gathered in order
    for p in preds:  # hand check: exact match of the stripped completion
        assert p["score"] == float(p["completion"].strip() == p["ground_truth"])
    assert records[1]["score"] == pytest.approx(sum(p["score"] for p in preds) / 6)
    assert records[1]["sampler"] == "llada" and records[1]["sampler_args"]["steps"] == 8


def test_dare_eval_rejects_unknown_benchmark(quickstart_model, capsys):
    assert main(["eval", "--model", str(quickstart_model), "--benchmarks", "synthetc"]) == 1
    assert "unknown benchmark 'synthetc'" in capsys.readouterr().err


def test_benchmarks_run_during_training(tmp_path, quickstart_model, ray_cluster):
    rec = recipes.load(Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "sft.yaml", [
        f"model.path={quickstart_model}", f"run.output_dir={tmp_path}", "learner.steps=2", "evaluator.every=1",
        "learner.global_batch_size=8", "learner.micro_batch_size=8", "learner.num_cpus=0.5",
        "rollout.num_cpus=0.5", "evaluator.num_cpus=0.5", "evaluator.workers=2", "data.eval_limit=8",
        "evaluator.benchmarks=[{name: synthetic, limit: 4}]"])
    from dare.executor.driver import run

    run_dir = run(rec, "sft.yaml", progress=False)
    records = [json.loads(x) for x in (run_dir / "eval_results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["benchmark"] == "synthetic" and r["n"] == 4 and r["checkpoint"] is None for r in records)
    assert records[0]["model"] == str(quickstart_model.resolve())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "bench_synthetic" in m] == [0, 1, 2]
