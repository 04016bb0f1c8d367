"""Rule-based rewards for diffusion-LLM RL (GSM8K, MATH, Countdown, Sudoku, format).

Every reward is ``fn(prompts, completions, **row) -> list[float]``, one score per
completion; ``completions`` are strings (chat-style message lists are read too) and each
row column arrives as a keyword holding one value per completion. Columns are the
flattened names (``ground_truth``, ``numbers``, ``puzzle``); raw verl/DARE parquet rows,
which nest them under ``reward_model`` / ``extra_info``, work as well. A garbage
completion never raises: it scores 0.0 (or the reward's format score); a missing column
raises ``KeyError`` naming it.

  name              columns                   score
  math_answer       ground_truth              1.0 / 0.0, math-verify equivalence
  countdown         ground_truth, numbers     1.0 correct / 0.1 any <answer> / 0.0
  sudoku            ground_truth, puzzle      fraction of empty cells solved, in [0, 1]
  format_strict     -                         0.5 / 0.0, exact d1 layout
  format_soft       -                         0.5 / 0.0, tags in order
  format_xmlcount   -                         d1 count_xml, <= 0.5
  int_answer        -                         0.5 / 0.0, the <answer> is an integer

The modules (``math_reward``, ``countdown_reward``, ``sudoku_reward``, ``format_reward``)
document their extraction and scoring rules and the reference each follows
(d1 ``diffu-grpo/reward_func.py``, SPG ``spg/reward_func.py``). trl's ``accuracy_reward``
is not reused: it needs chat-message completions and a ``solution`` column, extracts
only LaTeX answers (no ``####``, ``<answer>`` or bare numbers) and returns None for an
unparseable gold; its math-verify usage (timeouts only on the main thread) is mirrored.
"""
from __future__ import annotations

import dare
from dare.registry import Reward

from .countdown_reward import countdown
from .format_reward import format_soft, format_strict, format_xmlcount, int_answer
from .math_reward import extract_answer, math_answer
from .sudoku_reward import sudoku

__all__ = ["countdown", "extract_answer", "format_soft", "format_strict", "format_xmlcount",
           "int_answer", "math_answer", "sudoku", "REWARDS"]

REWARDS = (
    Reward("math_answer", math_answer,
           "GSM8K/MATH correctness via math-verify on the \\boxed{}, '####' or <answer> "
           "answer vs ground_truth: 1.0 / 0.0"),
    Reward("countdown", countdown,
           "Countdown: <answer> expression uses exactly `numbers` and equals ground_truth: "
           "1.0; other <answer>: 0.1; none: 0.0 (d1)"),
    Reward("sudoku", sudoku,
           "Sudoku: fraction of the puzzle's empty cells filled as in ground_truth (d1)"),
    Reward("format_strict", format_strict,
           "0.5 if the completion is exactly <reasoning>\\n..\\n</reasoning>\\n<answer>\\n..\\n"
           "</answer>\\n (d1 strict_format)"),
    Reward("format_soft", format_soft,
           "0.5 if the completion starts <reasoning>..</reasoning> <answer>..</answer> "
           "(d1 soft_format)"),
    Reward("format_xmlcount", format_xmlcount,
           "0.125 per well-placed reasoning/answer tag, minus trailing text (d1 xmlcount)"),
    Reward("int_answer", int_answer,
           "0.5 if the <answer> is a non-negative integer (d1 int_reward)"),
)


@dare.hookimpl
def register_rewards(register):
    for reward in REWARDS:
        register(reward)
