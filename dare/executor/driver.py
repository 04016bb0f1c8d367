"""The driver: the single controller of a run, one readable loop.

    set-up   validate -> run dir -> data -> Ray workers -> (resume) -> weight sync
    loop     batch -> learners (data-parallel step) -> metrics
             every N steps: weights -> evaluator (held-out loss) + rollout (samples)
             checkpoint every N steps, at the end, and on SIGTERM
    cleanup  workers stopped, run dir closed
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import ray
from tqdm import tqdm

from dare.checkpoint import load_tokenizer
from dare.data import DataOrder, collate_units, encode_prompt, encode_units, left_pad
from dare.executor.actors import EvaluatorWorker, LearnerWorker, RolloutWorker
from dare.executor.rundir import RunDir
from dare.plugins import default_manager
from dare.recipe import Recipe, RecipeError, validate

EVAL_SEED = 1234


def connect_ray(recipe: Recipe) -> None:
    if ray.is_initialized():
        return
    address = recipe.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    need = (recipe.learner.workers * recipe.learner.num_cpus + recipe.rollout.workers * recipe.rollout.num_cpus
            + recipe.evaluator.workers * recipe.evaluator.num_cpus)
    ray.init(num_cpus=recipe.ray.num_cpus or max(int(need + 0.999), os.cpu_count() or 1),
             include_dashboard=False, logging_level="WARNING")


def run(recipe: Recipe, source: str = "<recipe>", manager=None, progress: bool = True) -> Path:
    """Run a supervised recipe end to end; returns the run directory."""
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

    # -- data ---------------------------------------------------------------------------
    family = reg.families.get(recipe.model.family)
    dataset = reg.datasets.get(recipe.data.dataset)
    tokenizer = load_tokenizer(recipe.model.path, reg)
    from dare.checkpoint import read_config
    special = family.special_tokens(read_config(recipe.model.path))
    algorithm = reg.algorithms.get(recipe.algorithm_name)
    L, fmt = recipe.data.max_length, algorithm.data_format
    train = encode_units(fmt, dataset.load(recipe.data.train_split, limit=recipe.data.limit, **recipe.data.options),
                         tokenizer, L, special.eos_id)
    order = DataOrder(len(train), recipe.learner.global_batch_size, recipe.run.seed)
    heldout_rows = []
    if recipe.data.eval_split is not None:
        heldout_rows = dataset.load(recipe.data.eval_split, limit=recipe.data.eval_limit, **recipe.data.options)
    heldout = encode_units(fmt, heldout_rows, tokenizer, L, special.eos_id) if heldout_rows else []
    heldout_batch = collate_units(heldout, L, special.pad_id, EVAL_SEED, 0) if heldout else None
    sample_rows = heldout_rows[: recipe.evaluator.num_samples]

    # -- workers ------------------------------------------------------------------------
    connect_ray(recipe)
    cfg = recipe.model_dump(mode="json")
    lc, rc, ec = recipe.learner, recipe.rollout, recipe.evaluator
    learners = [LearnerWorker.options(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus).remote(cfg, rank, lc.workers)
                for rank in range(lc.workers)]
    evaluators = [EvaluatorWorker.options(num_cpus=ec.num_cpus, num_gpus=ec.num_gpus).remote(cfg)
                  for _ in range(ec.workers if heldout_batch is not None else 0)]
    rollouts = [RolloutWorker.options(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus).remote(cfg)
                for _ in range(rc.workers if sample_rows else 0)]
    try:
        if lc.workers > 1:
            address = ray.get(learners[0].address.remote())
            ray.get([w.init_distributed.remote(address) for w in learners])
        start = 0
        if resume_from is not None:
            start = ray.get([w.load_checkpoint.remote(str(resume_from)) for w in learners])[0]
            run_dir.truncate_after(start)
            print(f"resumed from {resume_from} at step {start}")

        def evaluate(step: int) -> None:
            weights = ray.put(ray.get(learners[0].weights.remote()))
            ray.get([w.set_weights.remote(weights) for w in evaluators + rollouts])
            if evaluators:
                n = len(heldout)  # units; each evaluator gets an equal share (or all of it)
                parts = len(evaluators) if n % len(evaluators) == 0 else 1
                shards = heldout_batch.chunk(parts)
                results = ray.get([w.evaluate.remote(s, step) for w, s in zip(evaluators, shards)])
                metrics = {k: sum(r.metrics[k] for r in results) / len(results) for k in results[0].metrics}
                run_dir.log("eval", step, metrics)
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if rollouts:
                prompts = [encode_prompt(tokenizer, r["prompt"]) for r in sample_rows]
                gen = ray.get(rollouts[0].generate.remote(left_pad(prompts, special.pad_id)))
                width = gen.sequences.shape[1] - gen.unmask_step.shape[1]
                samples = [{"prompt": tokenizer.decode(p), "completion":
                            tokenizer.decode(gen.sequences[i, width:], skip_special_tokens=True), "nfe": gen.nfe}
                           for i, p in enumerate(prompts)]
                run_dir.log_samples(step, samples)

        def checkpoint(step: int) -> None:
            folder = run_dir.checkpoint_dir(step)
            ray.get(learners[0].save_checkpoint.remote(str(folder), step))
            run_dir.mark_latest(folder, recipe.run.keep_checkpoints)

        stop = {"signal": None}
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:  # checkpoint and stop cleanly on SIGTERM
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
        if start == 0:
            evaluate(0)
        bar = tqdm(range(start, lc.steps), initial=start, total=lc.steps, desc=recipe.run.name,
                   disable=not progress, dynamic_ncols=True)
        for step in bar:
            batch = collate_units([train[i] for i in order.indices(step)], L, special.pad_id, recipe.run.seed, step)
            t0 = time.perf_counter()
            results = ray.get([w.train_step.remote(s, step) for w, s in zip(learners, batch.chunk(lc.workers))])
            elapsed = time.perf_counter() - t0
            metrics = dict(results[0].metrics, step_time=elapsed, tokens_per_s=results[0].metrics["tokens"] / elapsed)
            run_dir.log("train", step + 1, metrics)
            manager.hook.on_step_end(step=step + 1, metrics=metrics, run_dir=run_dir.root)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
            done = step + 1
            if done % ec.every == 0 or done == lc.steps:
                evaluate(done)
            if (recipe.run.checkpoint_every and done % recipe.run.checkpoint_every == 0) or done == lc.steps \
                    or stop["signal"] is not None:
                checkpoint(done)
            if stop["signal"] is not None:
                tqdm.write(f"stopped by signal {stop['signal']} after step {done}; checkpoint saved")
                break
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    finally:
        for w in learners + evaluators + rollouts:
            ray.kill(w)
        run_dir.close()
    return run_dir.root
