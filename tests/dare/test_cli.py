import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dare import recipe as recipes
from dare.cli import main, sampler_kwargs

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "dare.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("run", "validate", "plugins", "generate", "export"):
        assert cmd in out.stdout


def test_generate_prints_one_line_per_prompt(shared, capsys):
    model = str(shared("fixtures", "llada-tiny"))
    assert main(["generate", "--model", model, "--prompt", "What is 2 + 3?", "--prompt", "Hi",
                 "--steps", "4", "--gen-length", "8", "--block-length", "4"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) >= 2 and "nfe=4" in captured.err


def test_generate_rejects_arguments_the_sampler_does_not_take(shared, capsys):
    model = str(shared("fixtures", "dream-tiny"))
    assert main(["generate", "--model", model, "--prompt", "x", "--block-length", "4"]) == 1
    assert "'block_length' is not accepted" in capsys.readouterr().err


def test_sampler_kwargs_maps_generic_names():
    def dream_like(model, prompt_ids, attention_mask=None, max_new_tokens=None, steps=1):
        pass
    assert sampler_kwargs(dream_like, {"gen_length": 8, "steps": 4}) == {"max_new_tokens": 8, "steps": 4}


def test_missing_checkpoint_file_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "config.json: missing" in capsys.readouterr().err


def test_example_plugin_recipe_runs(shared, tmp_path, ray_cluster, monkeypatch):
    if "example" not in {ep.name for ep in md.entry_points(group="dare")}:
        pytest.skip("the example plugin is not installed (pip install -e docs/examples/dare-example-plugin)")
    from dare.executor.driver import run
    monkeypatch.setenv("DARE_SHARED", str(shared("")))
    path = ROOT / "docs/examples/dare-example-plugin/recipe.yaml"
    rec = recipes.load(path, ["learner.steps=2", "evaluator.every=2", f"run.output_dir={tmp_path}",
                              "run.tensorboard=false"])
    run_dir = run(rec, str(path), progress=False)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2]
    sample = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[0])
    assert "What is" in sample["prompt"]
