"""The RL loop: 2 rollout + 2 learner workers, weight sync, rewards that fail or time out."""
import json
import time

import pytest
import torch

import dare
from dare import recipe as recipes
from dare.data import encode_prompt, left_pad
from dare.executor.rollouts import merge_generations, rollout_batch
from dare.plugins import PluginManager
from dare.registry import Reward
from dare.rewards import score
from dare.rl import group_advantages, token_norm


def rl_recipe(model, tmp_path, **over):
    raw = recipes.load_raw("recipes/quickstart/d1.yaml")
    raw["model"]["path"] = str(model)
    raw["run"].update(output_dir=str(tmp_path), name="rl")
    rec = recipes.parse(raw)
    overrides = {"learner.workers": 2, "rollout.workers": 2, "learner.global_batch_size": 8,
                 "learner.micro_batch_size": 2, "rollout.group_size": 2, "learner.steps": 2,
                 "algorithm.num_iterations": 2, "data.eval_limit": 4, "evaluator.every": 2,
                 "learner.num_cpus": 0.5, "rollout.num_cpus": 0.5, "evaluator.num_cpus": 0.5, **over}
    data = rec.model_dump(mode="json")
    for k, v in overrides.items():
        recipes.apply_override(data, f"{k}={json.dumps(v)}", "test")
    return recipes.parse(data)


def test_two_rollout_and_two_learner_workers_stay_in_sync(quickstart_model, tmp_path, ray_cluster):
    from dare.executor.actors import LearnerWorker, RolloutWorker
    rec = rl_recipe(quickstart_model, tmp_path)
    cfg = rec.model_dump(mode="json")
    learners = [LearnerWorker.options(num_cpus=1).remote(cfg, r, 2) for r in range(2)]
    rollouts = [RolloutWorker.options(num_cpus=1).remote(cfg) for _ in range(2)]
    address = ray_cluster.get(learners[0].address.remote())
    ray_cluster.get([w.init_distributed.remote(address) for w in learners])
    tok = dare.load_tokenizer(quickstart_model)
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in ("3141", "2718", "1618", "5772")]
    halves = [left_pad(prompts[:2] * 1 + prompts[:2], 2), left_pad(prompts[2:] + prompts[2:], 2)]
    outs = ray_cluster.get([w.generate.remote(p, 7 + i) for i, (w, p) in enumerate(zip(rollouts, halves))])
    ids, mask, comps, steps, nfe = merge_generations(halves, outs, 2)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.25])
    groups = torch.arange(8) // 2
    batch = rollout_batch(ids, mask, comps, steps, 2, rewards, group_advantages(rewards, groups, "mean"),
                          groups, list(range(8)))
    batch.extras["token_norm"] = token_norm(batch.completion_mask)
    before = ray_cluster.get(rollouts[0].weights_checksum.remote())
    results = ray_cluster.get([w.train_rl.remote(s, 0) for w, s in zip(learners, batch.chunk(2))])
    assert results[0].metrics["loss"] == results[1].metrics["loss"]
    l0, l1 = ray_cluster.get([w.weights_checksum.remote() for w in learners])
    assert l0 == l1 and l0 != before  # learners updated, identically
    weights = ray_cluster.put(ray_cluster.get(learners[0].weights.remote()))
    ray_cluster.get([w.set_weights.remote(weights) for w in rollouts])
    r0, r1 = ray_cluster.get([w.weights_checksum.remote() for w in rollouts])
    assert r0 == r1 == l0
    for w in learners + rollouts:
        ray_cluster.kill(w)


def test_failing_and_slow_rewards_score_zero_and_are_reported(ray_cluster):
    def flaky(prompts, completions, **kw):
        if any("boom" in c for c in completions):
            raise RuntimeError("cannot parse boom")
        return [1.0] * len(completions)

    def slow(prompts, completions, **kw):
        if any("slow" in c for c in completions):
            time.sleep(60)
        return [0.5] * len(completions)

    completions = ["ok", "boom", "ok", "slow"]
    t0 = time.perf_counter()
    scored = score([(Reward("flaky", flaky), 1.0), (Reward("slow", slow), 2.0)], ["p"] * 4, completions,
                   [{"prompt": "p", "ground_truth": "x"}] * 4, timeout_s=3, workers=2)
    assert time.perf_counter() - t0 < 45
    assert scored.per_function["flaky"] == [1.0, 0.0, 1.0, 1.0]
    assert scored.per_function["slow"] == [0.5, 0.5, 0.5, 0.0]
    assert scored.total == [2.0, 1.0, 2.0, 1.0]
    reasons = {(f["reward"], f["index"]): f["error"] for f in scored.failures}
    assert "cannot parse boom" in reasons[("flaky", 1)] and "timed out" in reasons[("slow", 3)]


def test_rl_run_with_two_and_two_workers_continues_past_a_failing_reward(quickstart_model, tmp_path, ray_cluster):
    from dare.executor.driver import run

    def sometimes_fails(prompts, completions, ground_truth, **kw):
        if completions and completions[0].startswith("0"):
            raise ValueError("a reward bug")
        return [float(c.strip() == t) for c, t in zip(completions, ground_truth)]

    class FlakyReward:
        __name__ = "flaky_reward"

        @dare.hookimpl
        def register_rewards(self, register):
            register(Reward("sometimes_fails", sometimes_fails))

    rec = rl_recipe(quickstart_model, tmp_path)
    rec.reward.functions.append(recipes.RewardTerm(name="sometimes_fails", weight=1.0))
    run_dir = run(rec, "test", manager=PluginManager(plugins=[FlakyReward()]), progress=False)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    for key in ("reward", "reward_exact_match", "zero_std_groups", "time_generate", "time_reward",
                "time_update", "time_sync", "kl", "clip_ratio", "reward_failures"):
        assert key in train[0], key
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 2]


def test_a_recipe_needing_more_cpus_than_the_cluster_fails_before_starting(quickstart_model, tmp_path, ray_cluster):
    from dare.executor.driver import run
    rec = rl_recipe(quickstart_model, tmp_path, **{"learner.num_cpus": 2, "rollout.num_cpus": 2})
    with pytest.raises(recipes.RecipeError, match=r"the workers need 8.75 CPUs .* the Ray cluster has 4"):
        run(rec, "test.yaml", progress=False)
