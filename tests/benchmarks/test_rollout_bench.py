"""benchmarks/rollout.py in quick mode on an untrained tiny model built in code."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "rollout.py"


@pytest.fixture(scope="module")
def rollout_bench():
    spec = importlib.util.spec_from_file_location("rollout_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dare_plugins.quickstart.task import make_base_model

    return make_base_model(tmp_path_factory.mktemp("rollout-bench") / "tiny", d_model=32, n_layers=2,
                           max_sequence_length=128)


def test_quick_run_reports_every_variant(rollout_bench, tiny_model, tmp_path):
    from dare.plugins import registry

    out = tmp_path / "rollout.json"
    report = rollout_bench.main(["--quick", "--model", str(tiny_model), "--json", str(out), "--threads", "1"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    names = [v.name for v in rollout_bench.VARIANTS if v.sampler in registry().samplers]
    if "llada_fast" not in registry().samplers:
        pytest.skip("the llada_fast sampler is not registered")
    assert [r["variant"] for r in report["results"]] == names == [v.name for v in rollout_bench.VARIANTS]
    assert {r["length"] for r in report["results"]} == {64}
    by_name = {r["variant"]: r for r in report["results"]}
    assert by_name["exact (cache none)"]["agreement"] == 1.0
    assert by_name["reference"]["nfe_per_token"] == 1.0
    for r in report["results"]:
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 and 0 <= r["accuracy"] <= 1
        assert r["model_calls_observed"] == r["nfe"]
    # the cached modes run fewer positions per call than the full forwards of the reference
    assert by_name["dual"]["flops_per_token"] < by_name["prefix"]["flops_per_token"] < \
        by_name["reference"]["flops_per_token"]
    for key in ("cpu_count", "torch_threads", "torch"):
        assert key in report["machine"]


def test_missing_model_with_no_train_fails_clearly(rollout_bench, monkeypatch, tmp_path):
    monkeypatch.setattr(rollout_bench, "DEFAULT_MODEL", tmp_path / "absent")
    with pytest.raises(SystemExit, match="--no-train"):
        rollout_bench.main(["--quick", "--no-train", "--json", str(tmp_path / "r.json")])
