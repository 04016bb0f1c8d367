"""``countdown`` and ``sudoku``: the d1 planning puzzles.

countdown (256 test puzzles, ``rl/test/countdown.parquet``)
  prompt: the file's own prompt (it asks for ``<reasoning>`` then the bare expression in
  ``<answer>`` tags). Rows add ``numbers`` (list of ints) and ``target`` (int).
  few-shot: the first solvable puzzles of ``rl/train/countdown_n20000.parquet`` (the file
  holds targets, not solutions: ``solve_countdown`` finds an expression, checked with the
  reward's evaluator) as earlier user/assistant turns in the format the prompt asks for.
  score: the ``countdown`` reward's check (last ``<answer>`` block; an expression of
  integers, ``+ - * /`` and parentheses using exactly the given numbers, each once, whose
  exact value is the target): 1.0 when it passes, else 0.0 (the reward's 0.1 for a wrong
  but present answer is a training signal, not a success). prediction: the answer block.

sudoku (500 test puzzles, 4x4, ``rl/test/sudoku.parquet``)
  prompt: the file's own prompt. Rows add ``puzzle`` (16 digits, ``0`` = empty).
  few-shot: the first puzzles of ``rl/train/sudoku_n20000.parquet`` with their solutions.
  score: exact solve. The grid is read as the ``sudoku`` reward reads it (digits of the
  last ``<answer>`` block, left to right, cut to 16); 1.0 when it equals the ground truth,
  or is any other valid grid that keeps every given (puzzles normally have one solution),
  else 0.0. prediction: the grid read (its digits, possibly fewer than 16). Partial credit
  (the fraction of empty cells filled right) is the ``sudoku`` reward, also available here
  as ``cell_accuracy(completion, row)``.
"""
from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

from dare_plugins.rewards import countdown_reward, sudoku_reward
from dare_plugins.rewards._common import completion_text, last_answer_block

from ._data import check_counts, messages, read_parquet, resolve_data_dir, with_shots

COUNTDOWN_TRAIN = "rl/train/countdown_n20000.parquet"
SUDOKU_TRAIN = "rl/train/sudoku_n20000.parquet"


# --- countdown -------------------------------------------------------------------------------


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """An expression using each of ``numbers`` once with ``+ - * /`` that equals ``target``
    exactly, or None. Exhaustive: combine any two terms, recurse on the shorter list."""
    goal = Fraction(target)

    def search(terms: list[tuple[Fraction, str]]) -> str | None:
        if len(terms) == 1:
            return terms[0][1] if terms[0][0] == goal else None
        for i, j in itertools.permutations(range(len(terms)), 2):
            (a, ta), (b, tb) = terms[i], terms[j]
            rest = [t for k, t in enumerate(terms) if k not in (i, j)]
            options = [(a + b, f"{ta} + {tb}"), (a - b, f"{ta} - {tb}"), (a * b, f"{ta} * {tb}")]
            if b != 0:
                options.append((a / b, f"{ta} / {tb}"))
            for value, text in options:
                wrapped = text if not rest else f"({text})"
                found = search([(value, wrapped)] + rest)
                if found is not None:
                    return found
        return None

    return search([(Fraction(n), str(n)) for n in numbers])


def _countdown_shot(row: dict) -> tuple[str, str] | None:
    numbers = countdown_reward.parse_numbers(row["extra_info"]["numbers"])
    target = int(row["reward_model"]["ground_truth"])
    expression = solve_countdown(numbers, target)
    if expression is None:
        return None
    value, literals = countdown_reward.evaluate(expression)
    assert value == target and Counter(literals) == Counter(numbers), expression
    reply = (f"<reasoning>\nI need {target} from {numbers}, each number once. "
             f"{expression} = {target}, which uses every number exactly once.\n</reasoning>\n"
             f"<answer>\n{expression}\n</answer>")
    return row["prompt"][-1]["content"], reply


def load_countdown(limit: int | None = None, few_shot: int = 0, data_dir: str | None = None,
                   **options) -> list[dict]:
    check_counts("countdown", limit, few_shot, options=options)
    folder = resolve_data_dir(data_dir)
    shots: list[tuple[str, str]] = []
    if few_shot:
        for r in read_parquet(folder, COUNTDOWN_TRAIN, max(64, 4 * few_shot)):
            shot = _countdown_shot(r)
            if shot is not None:
                shots.append(shot)
            if len(shots) == few_shot:
                break
        if len(shots) < few_shot:
            raise ValueError(f"benchmark 'countdown': only {len(shots)} solvable few-shot "
                             f"puzzles found, {few_shot} asked")
    rows = []
    for r in read_parquet(folder, "rl/test/countdown.parquet", limit):
        chat = messages(r["prompt"])
        rows.append({
            "id": f"countdown/{r['extra_info']['index']}",
            "prompt": with_shots(shots, chat[-1]["content"]) if shots else chat,
            "ground_truth": r["reward_model"]["ground_truth"],
            "numbers": countdown_reward.parse_numbers(r["extra_info"]["numbers"]),
            "target": int(r["reward_model"]["ground_truth"]),
        })
    return rows


def score_countdown(completion, row: dict) -> tuple[float, str | None]:
    text = completion_text(completion)
    prediction = last_answer_block(text)
    if prediction is None:
        return 0.0, None
    reward = countdown_reward.score(text, row["ground_truth"], row["numbers"])
    return (1.0 if reward == countdown_reward.CORRECT_SCORE else 0.0), prediction


# --- sudoku ----------------------------------------------------------------------------------


def valid_grid(grid: str, puzzle: str) -> bool:
    """``grid`` is a solved n x n Sudoku (n = 4 or 9) that keeps every given of ``puzzle``."""
    n = {16: 4, 81: 9}.get(len(grid))
    if n is None or len(puzzle) != len(grid):
        return False
    if any(p != "0" and p != g for p, g in zip(puzzle, grid)):
        return False
    box = {4: 2, 9: 3}[n]
    digits = set("123456789"[:n])
    cells = [[grid[r * n + c] for c in range(n)] for r in range(n)]
    groups = [row for row in cells] + [[cells[r][c] for r in range(n)] for c in range(n)]
    groups += [[cells[br + r][bc + c] for r in range(box) for c in range(box)]
               for br in range(0, n, box) for bc in range(0, n, box)]
    return all(set(g) == digits for g in groups)


def _sudoku_shot(row: dict) -> tuple[str, str]:
    solution = row["reward_model"]["ground_truth"]
    lines = ", ".join(solution[i:i + 4] for i in range(0, 16, 4))
    reply = ("<reasoning>\nEvery row, column and 2x2 box needs 1-4 exactly once; placing the "
             f"forced digits cell by cell fills the grid row by row as {lines}.\n</reasoning>\n"
             f"<answer>\n{solution}\n</answer>")
    return row["prompt"][-1]["content"], reply


def load_sudoku(limit: int | None = None, few_shot: int = 0, data_dir: str | None = None,
                **options) -> list[dict]:
    check_counts("sudoku", limit, few_shot, options=options)
    folder = resolve_data_dir(data_dir)
    shots = [_sudoku_shot(r) for r in read_parquet(folder, SUDOKU_TRAIN, few_shot)] \
        if few_shot else []
    rows = []
    for r in read_parquet(folder, "rl/test/sudoku.parquet", limit):
        chat = messages(r["prompt"])
        rows.append({
            "id": f"sudoku/{r['extra_info']['index']}",
            "prompt": with_shots(shots, chat[-1]["content"]) if shots else chat,
            "ground_truth": r["reward_model"]["ground_truth"],
            "puzzle": r["extra_info"]["puzzle"],
        })
    return rows


def read_grid(completion, size: int = 16) -> str | None:
    """The digits of the last ``<answer>`` block cut to ``size`` (the ``sudoku`` reward's
    reading), or None without a block or digits."""
    answer = last_answer_block(completion_text(completion))
    if answer is None:
        return None
    digits = sudoku_reward._digits(answer)[:size]
    return digits or None


def score_sudoku(completion, row: dict) -> tuple[float, str | None]:
    solution = str(row["ground_truth"]).strip()
    grid = read_grid(completion, len(solution))
    if grid is None:
        return 0.0, None
    solved = grid == solution or valid_grid(grid, str(row["puzzle"]).strip())
    return (1.0 if solved else 0.0), grid


def cell_accuracy(completion, row: dict) -> float:
    """Fraction of the puzzle's empty cells filled as in the solution (the ``sudoku``
    reward)."""
    return sudoku_reward.score(completion, row["ground_truth"], row["puzzle"])
