"""Shared test fixtures.

``shared``: the folder of provided fixtures and data (env ``DARE_SHARED``, default
``../shared`` beside the project root); tests that need it skip with a reason when it
is absent (a user's clone), while CI always has it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DARE_SHARED", ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set DARE_SHARED to the shared fixtures folder")
    return path


@pytest.fixture
def shared():
    """Callable: ``shared('fixtures', 'llada-tiny')`` -> Path, or skip when absent."""
    return shared_path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart_model(tmp_path_factory):
    """The quickstart's small LLaDA-architecture model + char tokenizer, built in code."""
    from dare_plugins.quickstart.task import make_base_model

    return make_base_model(tmp_path_factory.mktemp("quickstart") / "base")


@pytest.fixture
def recipe_overrides(quickstart_model):
    """``recipe_overrides(path)``: recipes whose model is made by a command (the quickstart)
    get a model built in code."""
    return lambda path: [f"model.path={quickstart_model}"] if "quickstart" in Path(path).parts else []


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests' tensors are tiny: one intra-op thread avoids OpenMP barriers, which cost
    ~10x on a busy 2-core machine (e.g. while Ray workers run beside the tests). Ray
    workers set their own thread counts from the recipe."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
