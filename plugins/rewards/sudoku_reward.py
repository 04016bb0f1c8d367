"""``sudoku``: fraction of the puzzle's empty cells filled in correctly.

Follows d1 ``diffu-grpo/reward_func.py`` (``extract_answer_sudoku`` /
``validate_sudoku_solution``; SPG's ``spg/reward_func.py`` is identical):
  * the answer is the last closed ``<answer>...</answer>`` block; no block -> 0.0;
  * every non-digit character is dropped (spaces, newlines, ``|``, commas, brackets, so a
    grid written row by row is read left-to-right, top-to-bottom; note that digits in any
    labels, e.g. ``Row 1:``, are kept too, as in d1); no digits left -> 0.0;
  * the digit string is padded with ``0`` or truncated to the grid size (the length of the
    ground truth: 16 for 4x4, 81 for 9x9);
  * score = (empty cells of ``puzzle``, i.e. ``'0'``, whose answer digit equals the ground
    truth's) / (number of empty cells); a puzzle without empty cells scores 0.0.
Givens are not checked: copying them wrong costs nothing, as in d1.

Columns: ``ground_truth`` (the solved grid; or ``reward_model.ground_truth``) and
``puzzle`` (the grid with ``0`` for empty cells; or ``extra_info.puzzle``).
"""
from __future__ import annotations

from typing import Any, Sequence

from ._common import check_lengths, column, completion_text, last_answer_block


def _digits(value: Any) -> str:
    return "".join(ch for ch in str(value) if ch.isdigit())


def score(completion: Any, solution: Any, puzzle: Any) -> float:
    try:
        answer = last_answer_block(completion_text(completion))
        if answer is None:
            return 0.0
        filled = _digits(answer)
        solution, puzzle = _digits(solution), _digits(puzzle)
        size = len(solution)
        if not filled or size == 0:
            return 0.0
        filled = filled[:size].ljust(size, "0")
        empty = [i for i in range(min(size, len(puzzle))) if puzzle[i] == "0"]
        if not empty:
            return 0.0
        return sum(filled[i] == solution[i] for i in empty) / len(empty)
    except Exception:
        return 0.0


def sudoku(prompts: Sequence[Any], completions: Sequence[Any], **row) -> list[float]:
    """Fraction of the empty cells of ``puzzle`` filled as in ``ground_truth``."""
    solutions = column("sudoku", row, "ground_truth", "reward_model")
    puzzles = column("sudoku", row, "puzzle", "extra_info")
    check_lengths("sudoku", completions, ground_truth=solutions, puzzle=puzzles)
    return [score(c, s, p) for c, s, p in zip(completions, solutions, puzzles)]
