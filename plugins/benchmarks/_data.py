"""Where the benchmark data lives, and reading its parquet files."""
from __future__ import annotations

import os
from pathlib import Path

# plugins/benchmarks/_data.py -> the project root is two folders up
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``explicit``, else ``$DARE_DATA``, else ``$DARE_SHARED/data``,
    else ``<project root>/../shared/data``. Raises FileNotFoundError naming the path tried
    and the variables that choose it when the folder is absent."""
    if explicit is not None:
        path, how = Path(explicit), "the data_dir option"
    elif os.environ.get("DARE_DATA"):
        path, how = Path(os.environ["DARE_DATA"]), "$DARE_DATA"
    elif os.environ.get("DARE_SHARED"):
        path, how = Path(os.environ["DARE_SHARED"]) / "data", "$DARE_SHARED/data"
    else:
        path, how = PROJECT_ROOT.parent / "shared" / "data", "the default <project>/../shared/data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"benchmark data folder {path} (from {how}) not found: set DARE_DATA to the folder "
            f"holding rl/test/*.parquet (or DARE_SHARED to its parent), or pass data_dir=")
    return path


def read_parquet(folder: Path, relative: str, limit: int | None = None) -> list[dict]:
    """Rows of ``folder/relative`` (the first ``limit`` when given) as dicts."""
    import pyarrow.parquet as pq

    path = folder / relative
    if not path.is_file():
        raise FileNotFoundError(f"benchmark data file {path} not found (data folder {folder}; "
                                f"set DARE_DATA or pass data_dir=)")
    if limit is None:
        return pq.read_table(path).to_pylist()
    rows: list[dict] = []
    if limit > 0:  # read only the first batches, not a 20,000-row train file
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(limit, 1024)):
            rows += batch.to_pylist()
            if len(rows) >= limit:
                break
    return rows[:limit]


def check_counts(name: str, limit: int | None, few_shot: int, available: int | None = None,
                 options: dict | None = None) -> None:
    """Reject a negative ``limit``/``few_shot``, too many examples and unknown options."""
    if options:
        raise TypeError(f"benchmark {name!r}: unknown option(s) {', '.join(sorted(options))}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"benchmark {name!r}: limit must be None or an int >= 0, got {limit!r}")
    if not isinstance(few_shot, int) or few_shot < 0:
        raise ValueError(f"benchmark {name!r}: few_shot must be an int >= 0, got {few_shot!r}")
    if available is not None and few_shot > available:
        raise ValueError(f"benchmark {name!r}: few_shot={few_shot} but only {available} "
                         f"solved examples exist")


def messages(prompt) -> list[dict]:
    """A parquet prompt column as plain ``[{"role", "content"}]`` dicts."""
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def with_shots(shots: list[tuple[str, str]], question: str) -> list[dict]:
    """Few-shot examples as prior user/assistant turns, then the question."""
    chat: list[dict] = []
    for user, assistant in shots:
        chat += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return chat + [{"role": "user", "content": question}]
