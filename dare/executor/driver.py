"""The driver: the single controller of a run.

    set-up     validate -> run dir -> data -> Ray workers -> (resume)
    loop       supervised: batch -> learners (data-parallel step) -> metrics
               rl:         prompts -> rollout workers (G samples each) -> rewards (parallel)
                           -> group advantages -> learners (prepare + num_iterations steps)
                           -> weight sync to rollout workers
               every evaluator.every steps: weights -> evaluators (held-out loss / reward)
               checkpoints every run.checkpoint_every steps, at the end, and on SIGTERM
    cleanup    workers stopped, run dir closed
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from dare.checkpoint import load_tokenizer, read_config
from dare.data import DataOrder, collate_units, encode_prompt, encode_units, left_pad, row_seed
from dare.executor.actors import EvaluatorWorker, LearnerWorker, RolloutWorker
from dare.executor.rollouts import completion_mask, merge_generations, rollout_batch, split
from dare.executor.rundir import RunDir
from dare.plugins import default_manager
from dare.recipe import Recipe, RecipeError, validate
from dare.rewards import score

EVAL_SEED = 1234


REWARD_CPUS = 0.25  # what one reward task needs (dare.rewards)


def cpus_needed(recipe: Recipe) -> float:
    """CPUs the recipe's actors reserve, plus room for one reward task."""
    return (recipe.learner.workers * recipe.learner.num_cpus + recipe.rollout.workers * recipe.rollout.num_cpus
            + recipe.evaluator.workers * recipe.evaluator.num_cpus + REWARD_CPUS)


def connect_ray(recipe: Recipe, source: str) -> None:
    """Start (or join) Ray, and refuse a recipe whose workers cannot all be placed: Ray
    would otherwise wait forever for the missing resources."""
    if not ray.is_initialized():
        address = recipe.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=recipe.ray.num_cpus or max(int(cpus_needed(recipe) + 0.999), os.cpu_count() or 1),
                     include_dashboard=False, logging_level="WARNING")
    have = ray.cluster_resources().get("CPU", 0.0)
    if cpus_needed(recipe) > have + 1e-9:
        raise RecipeError(
            f"{source}: the workers need {cpus_needed(recipe):g} CPUs (learner, rollout and evaluator "
            f"workers x num_cpus, plus {REWARD_CPUS} for reward tasks) but the Ray cluster has {have:g}; "
            "lower the *.num_cpus / *.workers settings or set ray.num_cpus")


@dataclass
class Run:
    """What the loops share."""

    recipe: Recipe
    manager: object
    run_dir: RunDir
    tokenizer: object
    special: object
    algorithm: object
    learners: list = field(default_factory=list)
    evaluators: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)
    stop_signal: int | None = None

    def sync_weights(self, workers: list) -> None:
        weights = ray.put(ray.get(self.learners[0].weights.remote()))
        ray.get([w.set_weights.remote(weights) for w in workers])

    def checkpoint(self, step: int) -> None:
        folder = self.run_dir.checkpoint_dir(step)
        ray.get(self.learners[0].save_checkpoint.remote(str(folder), step))
        self.run_dir.mark_latest(folder, self.recipe.run.keep_checkpoints)

    def evaluate(self, step: int, evaluate) -> None:
        """The loop's own evaluation (held-out loss or reward, after syncing the evaluators'
        weights), then the benchmarks; one ``eval`` record in metrics.jsonl."""
        metrics = evaluate(step)
        metrics.update(self.run_benchmarks(step))
        if metrics:
            self.run_dir.log("eval", step, metrics)
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def run_benchmarks(self, step: int) -> dict:
        """The recipe's benchmarks on the evaluators' (already synced) weights: metrics
        ``bench_<name>``; records in the run's eval_results.jsonl."""
        ec, rc = self.recipe.evaluator, self.recipe.rollout
        if not ec.benchmarks or not self.evaluators:
            return {}
        from dare.evaluation import Checkpoint
        from dare.executor.benchmarks import run_benchmarks

        sampler = ec.sampler or rc.sampler or self.manager.registry.families.get(self.recipe.model.family).default_sampler
        args = ec.sampler_args if ec.sampler_args is not None else (
            rc.eval_sampler_args if rc.eval_sampler_args is not None else rc.sampler_args)
        recipe_file = self.run_dir.root / "recipe.yaml"
        where = Checkpoint(self.run_dir.root, self.recipe.run.name, step, str(recipe_file), self.recipe.model.path)
        records = run_benchmarks(self.evaluators, self.manager.registry, ec.benchmarks, sampler, dict(args),
                                 ec.batch_size, EVAL_SEED, where, self.run_dir.root)
        return {f"bench_{r['benchmark']}": r["score"] for r in records}

    def end_of_step(self, step: int, metrics: dict, bar, evaluate) -> bool:
        """Log, hooks, evaluation, checkpoints; returns True when the run must stop."""
        self.run_dir.log("train", step, metrics)
        self.manager.hook.on_step_end(step=step, metrics=metrics, run_dir=self.run_dir.root)
        bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("loss", "reward") if k in metrics})
        last = step == self.recipe.learner.steps
        if step % self.recipe.evaluator.every == 0 or last:
            self.evaluate(step, evaluate)
        every = self.recipe.run.checkpoint_every
        if (every and step % every == 0) or last or self.stop_signal is not None:
            self.checkpoint(step)
        if self.stop_signal is not None:
            tqdm.write(f"stopped by signal {self.stop_signal} after step {step}; checkpoint saved")
            return True
        return False


def run(recipe: Recipe, source: str = "<recipe>", manager=None, progress: bool = True) -> Path:
    """Run a recipe end to end; returns the run directory."""
    manager = manager or default_manager()
    validate(recipe, source, manager)
    recipe = recipe.model_copy(deep=True)
    recipe.model.path = str(Path(recipe.model.path).resolve())  # workers may run elsewhere
    reg = manager.registry
    run_dir = RunDir(Path(recipe.run.output_dir) / recipe.run.name, recipe.run.tensorboard)
    resume_from = run_dir.latest_checkpoint() if recipe.run.resume else None
    if not recipe.run.resume and run_dir.latest_checkpoint() is not None:
        raise RecipeError(f"{source}: run directory {run_dir.root} already holds checkpoints; "
                          "pass run.resume=true to continue it, or choose another run.name")
    run_dir.write_recipe(recipe.model_dump(mode="json"))
    family = reg.families.get(recipe.model.family)
    state = Run(recipe, manager, run_dir, load_tokenizer(recipe.model.path, reg),
                family.special_tokens(read_config(recipe.model.path)), reg.algorithms.get(recipe.algorithm_name))
    rl = state.algorithm.kind == "rl"
    dataset = reg.datasets.get(recipe.data.dataset)
    train_rows = dataset.load(recipe.data.train_split, limit=recipe.data.limit, **recipe.data.options)
    eval_rows = dataset.load(recipe.data.eval_split, limit=recipe.data.eval_limit, **recipe.data.options) \
        if recipe.data.eval_split is not None else []

    connect_ray(recipe, source)
    cfg = recipe.model_dump(mode="json")
    lc, rc, ec = recipe.learner, recipe.rollout, recipe.evaluator
    state.learners = [LearnerWorker.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus).remote(cfg, rank, lc.workers)
                      for rank in range(lc.workers)]
    state.evaluators = [EvaluatorWorker.options(num_cpus=ec.num_cpus, num_gpus=ec.num_gpus).remote(cfg)
                        for _ in range(ec.workers if (eval_rows or ec.benchmarks) else 0)]
    want_rollouts = rc.workers if (rl or (eval_rows and ec.num_samples)) else 0
    state.rollouts = [RolloutWorker.options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus).remote(cfg)
                      for _ in range(want_rollouts)]
    main_thread = threading.current_thread() is threading.main_thread()
    previous = None
    if main_thread:  # finish the step, checkpoint and stop cleanly on SIGTERM
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(state, "stop_signal", signum))
    try:
        if lc.workers > 1:
            address = ray.get(state.learners[0].address.remote())
            ray.get([w.init_distributed.remote(address) for w in state.learners])
        start = 0
        if resume_from is not None:
            start = ray.get([w.load_checkpoint.remote(str(resume_from)) for w in state.learners])[0]
            run_dir.truncate_after(start)
            print(f"resumed from {resume_from} at step {start}")
        loop = rl_loop if rl else supervised_loop
        loop(state, train_rows, eval_rows, start, progress)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        for w in state.learners + state.evaluators + state.rollouts:
            ray.kill(w)
        run_dir.close()
    return run_dir.root


# --- supervised (SFT, DPO, VRPO, ...) ----------------------------------------------------


def supervised_loop(state: Run, train_rows: list[dict], eval_rows: list[dict], start: int, progress: bool) -> None:
    recipe, tok, special = state.recipe, state.tokenizer, state.special
    L, fmt = recipe.data.max_length, state.algorithm.data_format
    train = encode_units(fmt, train_rows, tok, L, special.eos_id)
    order = DataOrder(len(train), recipe.learner.global_batch_size, recipe.run.seed)
    heldout = encode_units(fmt, eval_rows, tok, L, special.eos_id) if eval_rows else []
    heldout_batch = collate_units(heldout, L, special.pad_id, EVAL_SEED, 0) if heldout else None
    sample_rows = eval_rows[: recipe.evaluator.num_samples]

    def evaluate(step: int) -> dict:
        state.sync_weights(state.evaluators + state.rollouts)
        metrics = {}
        if state.evaluators and heldout_batch is not None:
            parts = len(state.evaluators) if len(heldout) % len(state.evaluators) == 0 else 1
            results = ray.get([w.evaluate.remote(s, step) for w, s in zip(state.evaluators, heldout_batch.chunk(parts))])
            metrics = {k: sum(r.metrics[k] for r in results) / len(results) for k in results[0].metrics}
        if state.rollouts and sample_rows:
            prompts = [encode_prompt(tok, r["prompt"]) for r in sample_rows]
            gen = ray.get(state.rollouts[0].generate.remote(left_pad(prompts, special.pad_id)))
            width = gen.sequences.shape[1] - gen.unmask_step.shape[1]
            state.run_dir.log_samples(step, [
                {"prompt": tok.decode(p), "completion": tok.decode(gen.sequences[i, width:], skip_special_tokens=True),
                 "nfe": gen.nfe} for i, p in enumerate(prompts)])
        return metrics

    if start == 0:
        state.evaluate(0, evaluate)
    lc = recipe.learner
    bar = tqdm(range(start, lc.steps), initial=start, total=lc.steps, desc=recipe.run.name,
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = collate_units([train[i] for i in order.indices(step)], L, special.pad_id, recipe.run.seed, step)
        t0 = time.perf_counter()
        results = ray.get([w.train_step.remote(s, step) for w, s in zip(state.learners, batch.chunk(lc.workers))])
        elapsed = time.perf_counter() - t0
        metrics = dict(results[0].metrics, step_time=elapsed, tokens_per_s=results[0].metrics["tokens"] / elapsed)
        if state.end_of_step(step + 1, metrics, bar, evaluate):
            break


# --- reinforcement learning (d1, coupled_grpo, spg, ...) ---------------------------------


def rl_loop(state: Run, train_rows: list[dict], eval_rows: list[dict], start: int, progress: bool) -> None:
    from dare.rl import group_advantages, token_norm

    recipe, tok, special, reg = state.recipe, state.tokenizer, state.special, state.manager.registry
    G, lc = recipe.rollout.group_size, recipe.learner
    rewards = [(reg.rewards.get(t.name), t.weight) for t in recipe.reward.functions]
    order = DataOrder(len(train_rows), lc.global_batch_size // G, recipe.run.seed)
    prompt_ids = {}

    def encoded(row_index: int, rows: list[dict]) -> list[int]:
        key = (id(rows), row_index)
        if key not in prompt_ids:
            prompt_ids[key] = encode_prompt(tok, rows[row_index]["prompt"])
        return prompt_ids[key]

    def sample(rows: list[dict], indices: list[int], repeats: int, seed: int, workers: list, sampler_args=None):
        """Generate ``repeats`` completions per prompt, sharded over ``workers``."""
        flat = [i for i in indices for _ in range(repeats)]
        ranges = split(len(flat), len(workers))
        batches = [left_pad([encoded(i, rows) for i in flat[a:b]], special.pad_id) for a, b in ranges]
        outs = ray.get([w.generate.remote(p, row_seed(seed, k, 0), sampler_args)
                        for k, (w, p) in enumerate(zip(workers, batches))])
        ids, mask, comps, steps, nfe = merge_generations(batches, outs, special.pad_id)
        texts = [tok.decode(c[completion_mask(c[None], special.eos_id)[0]], skip_special_tokens=True) for c in comps]
        prompts = [tok.decode(encoded(i, rows), skip_special_tokens=False) for i in flat]
        return flat, ids, mask, comps, steps, nfe, texts, prompts

    def log_failures(step: int, failures: list[dict]) -> None:
        for f in failures:
            tqdm.write(f"step {step}: reward {f['reward']} failed on sample {f['index']}: {f['error']}")
        state.run_dir.log_samples(step, [dict(kind="reward_failure", **f) for f in failures])

    def evaluate(step: int) -> dict:
        workers = state.evaluators or state.rollouts
        state.sync_weights(state.evaluators)
        if not eval_rows:
            return {}
        eval_args = recipe.rollout.eval_sampler_args
        flat, _, _, _, _, nfe, texts, prompts = sample(eval_rows, list(range(len(eval_rows))), 1, EVAL_SEED,
                                                       workers, eval_args)
        scored = score(rewards, prompts, texts, [eval_rows[i] for i in flat], recipe.reward.timeout_s,
                       recipe.reward.workers)
        log_failures(step, scored.failures)
        metrics = {"heldout_reward": sum(scored.total) / len(texts)}
        metrics.update({f"heldout_{k}": sum(v) / len(v) for k, v in scored.per_function.items()})
        state.run_dir.log_samples(step, [{"prompt": prompts[i], "completion": texts[i], "reward": scored.total[i]}
                                         for i in range(min(len(texts), recipe.evaluator.num_samples))])
        return metrics

    if start == 0:
        state.sync_weights(state.rollouts)
        state.evaluate(0, evaluate)
    else:
        state.sync_weights(state.rollouts)
    bar = tqdm(range(start, lc.steps), initial=start, total=lc.steps, desc=recipe.run.name,
               disable=not progress, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        flat, ids, mask, comps, steps, nfe, texts, prompts = sample(
            train_rows, order.indices(step), G, row_seed(recipe.run.seed, step, 7), state.rollouts)
        t1 = time.perf_counter()
        scored = score(rewards, prompts, texts, [train_rows[i] for i in flat], recipe.reward.timeout_s,
                       recipe.reward.workers)
        log_failures(step + 1, scored.failures)
        reward_t = torch.tensor(scored.total)
        group_ids = torch.arange(len(flat)) // G
        advantages = group_advantages(reward_t, group_ids, scale=recipe.reward.advantage)
        batch = rollout_batch(ids, mask, comps, steps, special.eos_id, reward_t, advantages, group_ids,
                              [row_seed(recipe.run.seed, step, k) for k in range(len(flat))])
        batch.extras["token_norm"] = token_norm(batch.completion_mask)  # global, before sharding
        t2 = time.perf_counter()
        results = ray.get([w.train_rl.remote(s, step) for w, s in zip(state.learners, batch.chunk(lc.workers))])
        t3 = time.perf_counter()
        state.sync_weights(state.rollouts)
        t4 = time.perf_counter()
        groups = reward_t.view(-1, G)
        metrics = dict(results[0].metrics)
        metrics.update(
            reward=float(reward_t.mean()), reward_std=float(reward_t.std()) if len(reward_t) > 1 else 0.0,
            zero_std_groups=float((groups.std(dim=1) == 0).float().mean()) if G > 1 else 1.0,
            completion_tokens=float(batch.completion_mask.sum(1).float().mean()), nfe=float(nfe),
            reward_failures=float(len(scored.failures)),
            time_generate=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2, time_sync=t4 - t3, step_time=t4 - t0,
            **{f"reward_{k}": sum(v) / len(v) for k, v in scored.per_function.items()},
        )
        if state.end_of_step(step + 1, metrics, bar, evaluate):
            break
