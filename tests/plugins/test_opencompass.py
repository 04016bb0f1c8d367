"""The opencompass plugin: OpenCompass 0.5.4 GSM8K runs in-process on dare models, offline.

GSM8K data comes from the shared parquet files, written in the layout OpenCompass's loader
reads (``$COMPASS_DATA_CACHE/data/gsm8k/{train,test}.jsonl``). Tests that need OpenCompass
skip when it is not installed (it is optional: docs/opencompass.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime

import pytest
import torch

import dare
import dare_plugins.opencompass as plugin
from dare.plugins import PluginManager
from dare.protocol import GenerationOutput

N_TEST = 6  # problems written to the local test split; the runs keep the first 4 (--limit)
RECORD_KEYS = {"run", "model", "checkpoint", "step", "recipe", "benchmark", "score", "n", "sampler",
               "sampler_args", "few_shot", "time_s", "dare_version", "created"}


@pytest.fixture(scope="module")
def oc():
    return pytest.importorskip(
        "opencompass", reason="OpenCompass is not installed (optional: see docs/opencompass.md)")


@pytest.fixture
def gsm8k_cache(oc, shared, tmp_path, monkeypatch):
    """A COMPASS_DATA_CACHE with data/gsm8k/{train,test}.jsonl made from the shared parquet
    files; returns the test rows written."""
    import pyarrow.parquet as pq

    folder = tmp_path / "compass" / "data" / "gsm8k"
    folder.mkdir(parents=True)
    train = pq.read_table(shared("data", "sft", "train", "gsm8k.parquet")).slice(0, 8).to_pylist()
    test = pq.read_table(shared("data", "rl", "test", "gsm8k.parquet")).slice(0, N_TEST).to_pylist()
    train_rows = [{"question": r["extra_info"]["question"], "answer": r["extra_info"]["answer"]} for r in train]
    test_rows = [{"question": r["prompt"][-1]["content"],
                  "answer": f"The answer is {r['reward_model']['ground_truth']}.\n"
                            f"#### {r['reward_model']['ground_truth']}"} for r in test]
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("COMPASS_DATA_CACHE", str(tmp_path / "compass"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return test_rows


def hand_accuracy(predictions: list[dict]) -> float:
    """OpenCompass's GSM8K score recomputed from the predictions file: its postprocessors
    on the completion and the gold solution, its equality test, in percent."""
    from opencompass.datasets.gsm8k import Gsm8kEvaluator, gsm8k_dataset_postprocess, gsm8k_postprocess

    same = Gsm8kEvaluator().is_equal
    right = [same(gsm8k_postprocess(p["prediction"]), gsm8k_dataset_postprocess(p["gold"])) for p in predictions]
    return 100 * sum(right) / len(right)


def test_plugin_imports_without_opencompass():
    code = ("import sys; sys.modules['opencompass'] = None\n"
            "import dare_plugins.opencompass, dare_plugins.opencompass.model, dare_plugins.opencompass.run\n"
            "from dare_plugins.opencompass.model import require_opencompass\n"
            "try:\n    require_opencompass()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install --no-deps opencompass==0.5.4" in out.stdout


def test_cli_tiny_llada_gsm8k(gsm8k_cache, shared, tmp_path, capsys):
    """`dare opencompass` on the random tiny LLaDA: the pipeline, not the score."""
    from dare_plugins.opencompass import run

    model = shared("fixtures", "llada-tiny")
    parser = argparse.ArgumentParser(prog="dare")
    sub = parser.add_subparsers(dest="command")
    PluginManager(plugins=[plugin], entry_points=False).hook.register_commands(subparsers=sub)
    root = tmp_path / "oc"
    args = parser.parse_args([
        "opencompass", "--model", str(model), "--datasets", "gsm8k_0shot_gen_a58960", "--limit", "4",
        "--set", "gen_length=16", "--set", "steps=4", "--set", "block_length=8", "--batch-size", "3",
        "--work-dir", str(root)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "gsm8k" in table and "accuracy" in table

    (work,) = [p for p in root.iterdir() if p.is_dir()]
    preds = run.read_predictions(work, "llada-tiny", "gsm8k")
    assert len(preds) == 4  # two sampler batches (3 + 1): left padding and batching exercised
    for p, row in zip(preds, gsm8k_cache):
        assert [m["role"] for m in p["origin_prompt"]] == ["HUMAN"]  # OpenCompass's rounds, before the chat template
        assert row["question"] in p["origin_prompt"][0]["prompt"]
        assert p["gold"] == row["answer"]
        assert isinstance(p["prediction"], str)
    results = json.loads(run.output_paths(work, "llada-tiny", "gsm8k")["results"].read_text())
    assert results["accuracy"] == pytest.approx(hand_accuracy(preds))

    (rec,) = [json.loads(x) for x in (root / "eval_results.jsonl").read_text().splitlines()]
    assert set(rec) == RECORD_KEYS
    assert rec["run"] == "llada-tiny" and rec["model"] == rec["checkpoint"] == str(model)
    assert rec["benchmark"] == "opencompass/gsm8k" and rec["n"] == 4
    assert rec["score"] == pytest.approx(results["accuracy"] / 100) and 0 <= rec["score"] <= 1
    assert rec["sampler"] == "llada"
    assert rec["sampler_args"] == {"gen_length": 16, "steps": 4, "block_length": 8}
    assert rec["step"] is None and rec["recipe"] is None and rec["few_shot"] is None
    assert rec["time_s"] > 0 and rec["dare_version"] == dare.__version__
    assert datetime.fromisoformat(rec["created"]).utcoffset().total_seconds() == 0


def test_known_answers_score_50(gsm8k_cache, shared, tmp_path, monkeypatch):
    """A sampler that answers 2 of 4 problems right gets accuracy 50.0 from OpenCompass's own
    GSM8K evaluator (4-shot gsm8k_gen_1d7fe4, chat template, EOS cut)."""
    from dare_plugins.opencompass import run

    path = shared("fixtures", "llada-tiny")
    model, tok = dare.load_model(path), dare.load_tokenizer(path)
    eos = model.hf_config["eos_token_id"]
    answers = {row["question"]: row["answer"].split("#### ")[1] for row in gsm8k_cache}
    right = set(list(answers)[:2])
    seen = []

    def fake_generate(model, prompt_ids, attention_mask=None, sampler=None, registry=None, gen_length=None, **kw):
        rows = []
        for i in range(prompt_ids.shape[0]):
            keep = prompt_ids[i] if attention_mask is None else prompt_ids[i][attention_mask[i].bool()]
            text = tok.decode(keep.tolist())
            seen.append(text)
            (question,) = [q for q in answers if q in text]
            value = answers[question] if question in right else str(int(answers[question]) + 1)
            completion = tok(f"Let's see.\n#### {value}", add_special_tokens=False).input_ids
            after_eos = tok(f" #### {int(value) + 7}", add_special_tokens=False).input_ids  # must be cut
            ids = (completion + [eos] + after_eos + [eos] * gen_length)[:gen_length]
            rows.append(torch.cat([prompt_ids[i], torch.tensor(ids)]))
        seqs = torch.stack(rows)
        return GenerationOutput(seqs, torch.zeros(seqs.shape[0], gen_length, dtype=torch.long), 1)

    monkeypatch.setattr(dare, "generate", fake_generate)
    results = run.evaluate(model, tok, run.gsm8k_datasets(limit=4), tmp_path / "work", batch_size=4)
    assert results["gsm8k"]["accuracy"] == 50.0
    assert len(seen) == 4
    # the 4-shot rounds arrive as a multi-turn chat: 5 user turns, 4 assistant turns
    assert seen[0].count("<|start_header_id|>user<|end_header_id|>") == 5
    assert seen[0].count("<|start_header_id|>assistant<|end_header_id|>") == 5  # + the generation prompt
    preds = run.read_predictions(tmp_path / "work", "dare", "gsm8k")
    assert hand_accuracy(preds) == 50.0
    assert all(p["prediction"].startswith("Let's see.") and p["prediction"].count("####") == 1 for p in preds)

    with pytest.raises(ValueError, match="fresh work_dir"):  # OpenCompass would silently reuse outputs
        run.evaluate(model, tok, run.gsm8k_datasets(limit=4), tmp_path / "work")

    wrapper = run.as_model(model, tok)
    with pytest.raises(NotImplementedError, match="by generation"):
        wrapper.get_ppl(["x"])
    assert wrapper.get_token_len("hello") == len(wrapper.prompt_ids("hello")) > 0


def test_runs_in_process_on_an_evaluator_worker(gsm8k_cache, shared, tmp_path, ray_cluster):
    """OpenCompass GSM8K driven inside a Ray evaluator worker (its own process, its loaded
    weights): the same predictions and score as the hand recomputation."""
    import os

    from dare.executor.actors import EvaluatorWorker
    from dare_plugins.opencompass import run

    model = {"family": "llada", "path": str(shared("fixtures", "llada-tiny"))}
    env = {"env_vars": {k: os.environ[k] for k in ("COMPASS_DATA_CACHE", "HF_DATASETS_OFFLINE")}}
    worker = EvaluatorWorker.options(num_cpus=0.5, runtime_env=env).remote(None, model, None, 1)
    try:
        results = ray_cluster.get(worker.call.remote(
            run.evaluate, datasets=run.gsm8k_datasets(limit=2, config="gsm8k_0shot_gen_a58960"),
            work_dir=str(tmp_path / "work"), sampler_args={"gen_length": 8, "steps": 4, "block_length": 8},
            batch_size=2))
    finally:
        ray_cluster.kill(worker)
    preds = run.read_predictions(tmp_path / "work", "dare", "gsm8k")
    assert len(preds) == 2 and results["gsm8k"]["accuracy"] == pytest.approx(hand_accuracy(preds))
