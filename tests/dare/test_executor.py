"""Workers (plain and on Ray), data-parallel equivalence, weight sync, run + resume."""
import json

import pytest
import torch

import dare
from dare import recipe as recipes
from dare.data import collate, encode_pairs, row_seed
from dare.executor.roles import Evaluator, Learner, Rollout
from dare.plugins import PluginManager, default_manager
from dare.protocol import PromptBatch


def small_recipe(shared, tmp_path, **over) -> recipes.Recipe:
    raw = {
        "model": {"family": "llada", "path": str(shared("fixtures", "llada-tiny"))},
        "algorithm": {"name": "sft"},
        "data": {"dataset": "gsm8k", "max_length": 128, "limit": 64, "eval_limit": 4,
                 "options": {"root": str(shared("data"))}},
        "learner": {"workers": 1, "global_batch_size": 4, "micro_batch_size": 2, "steps": 4,
                    "optimizer": {"lr": 3e-3}},
        "rollout": {"workers": 1, "sampler_args": {"steps": 4, "gen_length": 8, "block_length": 4}},
        "evaluator": {"workers": 1, "every": 2, "num_samples": 1},
        "run": {"name": "t", "output_dir": str(tmp_path), "checkpoint_every": 2, "tensorboard": False},
    }
    for key, value in over.items():
        recipes.apply_override(raw, f"{key}={json.dumps(value)}", "test")
    return recipes.parse(raw)


def global_batch(shared, rec, step=0):
    tok = dare.load_tokenizer(rec.model.path)
    rows = default_manager().registry.datasets.get("gsm8k").load("train", limit=16, root=str(shared("data")))
    items = encode_pairs(rows, tok, rec.data.max_length, 126081)[: rec.learner.global_batch_size]
    assert len(items) == rec.learner.global_batch_size
    return collate(items, rec.data.max_length, 126081, [row_seed(0, step, i) for i in range(len(items))])


def test_two_learner_workers_match_one_worker(shared, tmp_path, ray_cluster):
    from dare.executor.actors import LearnerWorker
    rec = small_recipe(shared, tmp_path, **{"learner.workers": 2})
    cfg = rec.model_dump(mode="json")
    workers = [LearnerWorker.options(num_cpus=1).remote(cfg, r, 2) for r in range(2)]
    address = ray_cluster.get(workers[0].address.remote())
    ray_cluster.get([w.init_distributed.remote(address) for w in workers])
    single = Learner(small_recipe(shared, tmp_path).model_dump(mode="json"))
    for step in range(2):
        batch = global_batch(shared, rec, step)
        results = ray_cluster.get([w.train_step.remote(s, step) for w, s in zip(workers, batch.chunk(2))])
        one = single.train_step(batch, step)
        assert results[0].metrics["loss"] == pytest.approx(one.metrics["loss"], rel=1e-5)
        assert results[0].metrics["loss"] == results[1].metrics["loss"]
    p0, p1 = ray_cluster.get([w.parameters_vector.remote() for w in workers])
    assert torch.equal(p0, p1), "data-parallel workers diverged"
    ref = single.parameters_vector()
    assert not torch.equal(ref, Learner(cfg).parameters_vector())  # training moved the weights
    torch.testing.assert_close(p0, ref, atol=2e-5, rtol=1e-4)
    for w in workers:
        ray_cluster.kill(w)


def test_weight_sync_reaches_rollout_and_evaluator(shared, tmp_path):
    rec = small_recipe(shared, tmp_path)
    cfg = rec.model_dump(mode="json")
    learner, rollout, evaluator = Learner(cfg), Rollout(cfg), Evaluator(cfg)
    batch = global_batch(shared, rec)
    before = evaluator.evaluate(batch, 0).metrics["heldout_loss"]
    learner.train_step(batch, 0)
    update = learner.weights()
    assert update.version == 1 and set(update.state_dict) == set(rollout.model.state_dict())
    rollout.set_weights(update), evaluator.set_weights(update)
    x = batch.input_ids[:1]
    learner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(rollout.model(x).logits, learner.model(x).logits, atol=0, rtol=0)
    assert evaluator.evaluate(batch, 1).metrics["heldout_loss"] != before
    out = rollout.generate(PromptBatch(batch.input_ids[:2, :20]))
    assert out.sequences.shape == (2, 28) and out.nfe == 4


def test_checkpoint_reloads_with_identical_logits(shared, tmp_path):
    rec = small_recipe(shared, tmp_path)
    learner = Learner(rec.model_dump(mode="json"))
    learner.train_step(global_batch(shared, rec), 0)
    folder = learner.save_checkpoint(str(tmp_path / "ckpt"), 1)
    reloaded = dare.load_model(folder)
    learner.model.eval()
    x = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, learner.model(x).logits)
    assert dare.load_tokenizer(folder).mask_token_id is not None or True


def test_lora_trains_only_adapters_and_exports_merged(shared, tmp_path):
    from dare.cli import main
    rec = small_recipe(shared, tmp_path, **{"model.lora": {"r": 4, "alpha": 8}})
    learner = Learner(rec.model_dump(mode="json"))
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.train_step(global_batch(shared, rec), 0)
    after = learner.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed), changed
    folder = learner.save_checkpoint(str(tmp_path / "ckpt"), 1)
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["export", folder, str(tmp_path / "merged")]) == 0
    merged = dare.load_model(tmp_path / "merged")
    learner.model.eval()
    x = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, learner.model(x).logits, atol=1e-4, rtol=1e-4)


class Crash(Exception):
    pass


class CrashAfter:
    """An in-test plugin that kills the run after step 3 (the checkpoint of step 2 exists)."""
    __name__ = "crash_after"

    @dare.hookimpl
    def on_step_end(self, step, metrics, run_dir):
        if step == 3:
            raise Crash()


def test_run_writes_run_dir_and_resume_matches_uninterrupted(shared, tmp_path, ray_cluster):
    from dare.executor.driver import run
    full = run(small_recipe(shared, tmp_path, **{"run.name": "full"}), progress=False)
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    train = {m["step"]: m["loss"] for m in metrics if m["kind"] == "train"}
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert sorted(train) == [1, 2, 3, 4] and [e["step"] for e in evals] == [0, 2, 4]
    assert evals[-1]["heldout_loss"] < evals[0]["heldout_loss"]
    assert (full / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert (full / "recipe.yaml").is_file() and (full / "samples.jsonl").is_file()

    crashing = PluginManager(plugins=[CrashAfter()])
    with pytest.raises(Crash):
        run(small_recipe(shared, tmp_path, **{"run.name": "killed"}), manager=crashing, progress=False)
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    with pytest.raises(recipes.RecipeError, match="already holds checkpoints"):
        run(small_recipe(shared, tmp_path, **{"run.name": "killed"}), progress=False)
    run(small_recipe(shared, tmp_path, **{"run.name": "killed", "run.resume": True}), progress=False)
    resumed = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    resumed_train = {m["step"]: m["loss"] for m in resumed if m["kind"] == "train"}
    assert sorted(resumed_train) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed_train[step] == pytest.approx(train[step], rel=1e-6, abs=1e-6)
