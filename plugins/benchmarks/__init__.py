"""Evaluation benchmarks: gsm8k, math500, countdown, sudoku and code.

Every benchmark is a ``dare.registry.Benchmark``:

  ``load(limit=None, few_shot=0, data_dir=None, **options) -> list[dict]``: rows with a
  stable ``id`` (``"gsm8k/17"``), ``prompt`` (a chat message list; few-shot examples are
  earlier user/assistant turns), ``ground_truth`` and what the scorer needs. ``limit``
  keeps the first N problems. Unknown options raise ``TypeError``.

  ``score(completion, row) -> (score, prediction)``: 1.0 or 0.0, and the answer read from
  the completion (None when there is none).

  name       problems  file (under the data folder)   score
  gsm8k      1319      rl/test/gsm8k.parquet          final number == ground truth
  math500    500       rl/test/math500.parquet        math-verify on the \\boxed{} answer
  countdown  256       rl/test/countdown.parquet      expression uses the numbers, hits target
  sudoku     500       rl/test/sudoku.parquet         exact solve of the 4x4 grid
  code       20        data/code_problems.jsonl (here) all unit tests pass in the sandbox

The data folder is ``data_dir=``, else ``$DARE_DATA``, else ``$DARE_SHARED/data``, else
``../shared/data`` beside the project. Answer extraction and checking reuse the rewards
plugin (``math_reward``, ``countdown_reward``, ``sudoku_reward``); see ``math_tasks``,
``puzzles`` and ``coding`` for each benchmark's prompt, few-shot source and scoring rule,
and ``sandbox`` for how model-written code is contained. docs/benchmarks.md has the whole
story.
"""
from __future__ import annotations

import dare
from dare.registry import Benchmark

from .coding import load_code, score_code
from .math_tasks import load_gsm8k, load_math500, score_gsm8k, score_math500
from .puzzles import load_countdown, load_sudoku, score_countdown, score_sudoku

__all__ = ["BENCHMARKS"]

BENCHMARKS = (
    Benchmark("gsm8k", load_gsm8k, score_gsm8k,
              "GSM8K test (1319): final number ('####', \\boxed{}, <answer>, else the last "
              "number) equals the answer; few-shot from the SFT train file"),
    Benchmark("math500", load_math500, score_math500,
              "MATH-500 (500): math-verify equivalence of the \\boxed{} answer; up to 5 "
              "hand-written few-shot examples"),
    Benchmark("countdown", load_countdown, score_countdown,
              "Countdown test (256): the <answer> expression uses each number once and "
              "equals the target"),
    Benchmark("sudoku", load_sudoku, score_sudoku,
              "4x4 Sudoku test (500): the <answer> grid is a complete, valid solution"),
    Benchmark("code", load_code, score_code,
              "20 Python function-completion problems: all asserts pass when run in the "
              "sandbox (timeout, memory, no network, no processes, no writes outside)"),
)


@dare.hookimpl
def register_benchmarks(register):
    for benchmark in BENCHMARKS:
        register(benchmark)
