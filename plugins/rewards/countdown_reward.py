"""``countdown``: the ``<answer>`` expression must use the given numbers and hit the target.

Scoring (d1 ``diffu-grpo/reward_func.py``: ``compute_score`` with ``format_score=0.1``,
``score=1.0``; SPG's ``spg/reward_func.py`` is identical):
  * 0.0: no closed ``<answer>...</answer>`` block (the last one is used, stripped);
  * 0.1: an answer block whose expression is not valid, does not use exactly the given
    numbers (as a multiset: each once, none missing, none extra), cannot be evaluated
    (division by zero) or evaluates to something other than the target;
  * 1.0: a valid expression over exactly the given numbers whose value equals the target.

The expression is checked without ``eval``: it is parsed with ``ast`` and only integer
literals written with digits, binary ``+ - * /``, unary ``+``/``-`` and parentheses are
allowed (anything else, e.g. ``**``, ``//``, names, calls, ``=``, floats, hex literals,
scores 0.1). It is evaluated exactly with ``fractions.Fraction`` (d1 evaluates floats and
accepts ``|value - target| < 1e-5``; for these integer puzzles the two agree). As in d1,
``expr = target`` in the answer is not accepted (the prompt asks for the bare expression).

Columns: ``ground_truth`` (the target; or ``reward_model.ground_truth``) and ``numbers``
(a list of ints or its string form ``"[30, 100, 93]"``; or ``extra_info.numbers``).
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Any, Sequence

from ._common import check_lengths, column, completion_text, last_answer_block

FORMAT_SCORE = 0.1
CORRECT_SCORE = 1.0
MAX_EXPRESSION_CHARS = 1000

_ALLOWED_CHARS = re.compile(r"[\d+\-*/()\s]+")
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


class InvalidExpression(ValueError):
    pass


def parse_numbers(numbers: Any) -> list[int]:
    """The available numbers from a list (or array) of ints or a string like ``"[1, 2]"``."""
    if isinstance(numbers, str):
        return [int(n) for n in re.findall(r"-?\d+", numbers)]
    return [int(n) for n in numbers]


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Value and literals of an arithmetic expression; raises InvalidExpression (or
    ZeroDivisionError) for anything outside digits, + - * /, unary +/- and parentheses."""
    if len(expression) > MAX_EXPRESSION_CHARS or not _ALLOWED_CHARS.fullmatch(expression):
        raise InvalidExpression(f"characters outside digits, + - * / ( ): {expression!r}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise InvalidExpression(str(e)) from e
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise InvalidExpression(f"not allowed: {ast.dump(node)[:80]}")

    try:
        value = walk(tree.body)
    except RecursionError as e:
        raise InvalidExpression("expression nested too deeply") from e
    return value, literals


def score(completion: Any, target: Any, numbers: Any) -> float:
    try:
        expression = last_answer_block(completion_text(completion))
    except Exception:
        return 0.0
    if expression is None:
        return 0.0
    try:
        value, literals = evaluate(expression)
        if Counter(literals) != Counter(parse_numbers(numbers)):
            return FORMAT_SCORE
        return CORRECT_SCORE if value == Fraction(str(target).strip()) else FORMAT_SCORE
    except Exception:  # invalid expression, division by zero, unreadable target/numbers
        return FORMAT_SCORE


def countdown(prompts: Sequence[Any], completions: Sequence[Any], **row) -> list[float]:
    """1.0 for a correct expression over exactly the given numbers, 0.1 for any other
    ``<answer>`` block, 0.0 without one."""
    targets = column("countdown", row, "ground_truth", "reward_model")
    numbers = column("countdown", row, "numbers", "extra_info")
    check_lengths("countdown", completions, ground_truth=targets, numbers=numbers)
    return [score(c, t, n) for c, t, n in zip(completions, targets, numbers)]
