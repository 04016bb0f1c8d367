"""Every hook a dare plugin can implement, grouped by phase.

A plugin is a module (or object) with functions decorated by ``dare.hookimpl`` whose
names match these specs, registered through the ``dare`` entry-point group. Registration
hooks receive a ``register`` callback: call it once per thing you provide.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("dare")
hookimpl = pluggy.HookimplMarker("dare")


# --- Phase 1: registration (run once, when the plugin manager loads) ------------------


@hookspec
def register_model_families(register):
    """Register model families: call ``register(dare.registry.ModelFamily(...))``."""


@hookspec
def register_samplers(register):
    """Register dLLM samplers: call ``register(dare.registry.Sampler(...))``."""


@hookspec
def register_algorithms(register):
    """Register post-training algorithms: call ``register(dare.registry.Algorithm(...))``."""


@hookspec
def register_rewards(register):
    """Register reward functions: call ``register(dare.registry.Reward(...))``."""


@hookspec
def register_datasets(register):
    """Register datasets and benchmarks: call ``register(dare.registry.Dataset(...))``."""


@hookspec
def register_benchmarks(register):
    """Register evaluation benchmarks: call ``register(dare.registry.Benchmark(...))``."""


@hookspec
def register_rollout_engines(register):
    """Register generation backends for rollout/evaluator workers: call
    ``register(dare.registry.RolloutEngine(...))``. dare's own is ``torch`` (the samplers
    run in the worker's process); an external engine (SGLang, vLLM, lmdeploy) is a package
    with an entry point in the ``dare`` group that registers one."""


@hookspec
def register_commands(subparsers):
    """Add ``dare`` sub-commands: ``subparsers`` is argparse's; set ``func=callable(args)``
    with ``parser.set_defaults(func=...)`` on the parser you add."""


# --- Phase 2: recipe validation (before any worker starts) ----------------------------


@hookspec
def validate_recipe(recipe, registry):
    """Check a parsed ``dare.recipe.Recipe`` against what the plugin knows.

    Return a list of error strings (empty or None when the recipe is fine). Errors are
    reported together with the recipe's file name and stop the run before it starts.
    """


# --- Phase 3: runtime (called by the driver during a run) -----------------------------


@hookspec
def on_step_end(step, metrics, run_dir):
    """Called by the driver after every learner step with the step's scalar metrics
    (a dict of floats) and the run directory (a ``pathlib.Path``). Use it for loggers:
    write to a tracking service, a file, the console."""
