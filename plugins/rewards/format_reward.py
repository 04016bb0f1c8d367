"""Format rewards for the ``<reasoning>...</reasoning><answer>...</answer>`` layout.

All follow d1 ``diffu-grpo/reward_func.py`` (themselves from Will Brown's GRPO demo), with
d1's scores, so d1's GSM8K reward set (``format_xmlcount + format_soft + format_strict +
int_answer + 2 * math_answer``) can be rebuilt from registered names:

``format_strict`` 0.5 when the whole completion is exactly
    ``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n`` (d1's
    ``^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n$`` with DOTALL: the
    final newline is required, one more newline may follow, nothing else), else 0.0.
``format_soft`` 0.5 when the completion *starts* with ``<reasoning>...</reasoning>``,
    then optional whitespace, then ``<answer>...</answer>`` (d1 uses ``re.match``: anchored
    at the start, anything may follow), else 0.0.
``format_xmlcount`` d1's ``count_xml``: +0.125 for each of ``<reasoning>\\n``,
    ``\\n</reasoning>\\n``, ``\\n<answer>\\n``, ``\\n</answer>`` occurring exactly once, minus
    0.001 per character after the last ``\\n</answer>\\n`` (when ``\\n<answer>\\n`` is
    counted; as in d1, when ``\\n</answer>\\n`` never occurs that is the whole completion)
    and per character beyond one after the last ``\\n</answer>`` (when that is counted);
    at most 0.5, negative for long trailing text.
``int_answer`` d1's ``int_reward_func``: 0.5 when the answer (text after the last
    ``<answer>``, up to the next ``</answer>``, stripped; the whole completion when there
    is no tag) is all digits, else 0.0.

trl's ``think_format_reward`` checks ``<think>...</think>`` instead, so it is not reused.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from ._common import completion_text

STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)
SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def _texts(completions: Sequence[Any]) -> list[str]:
    return [completion_text(c) for c in completions]


def format_strict(prompts: Sequence[Any], completions: Sequence[Any], **row) -> list[float]:
    return [0.5 if STRICT.match(t) else 0.0 for t in _texts(completions)]


def format_soft(prompts: Sequence[Any], completions: Sequence[Any], **row) -> list[float]:
    return [0.5 if SOFT.match(t) else 0.0 for t in _texts(completions)]


def count_xml(text: str) -> float:
    total = 0.0
    if text.count("<reasoning>\n") == 1:
        total += 0.125
    if text.count("\n</reasoning>\n") == 1:
        total += 0.125
    if text.count("\n<answer>\n") == 1:
        total += 0.125
        total -= 0.001 * len(text.split("\n</answer>\n")[-1])
    if text.count("\n</answer>") == 1:
        total += 0.125
        total -= 0.001 * (len(text.split("\n</answer>")[-1]) - 1)
    return total


def format_xmlcount(prompts: Sequence[Any], completions: Sequence[Any], **row) -> list[float]:
    return [count_xml(t) for t in _texts(completions)]


def xml_answer(text: str) -> str:
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


def int_answer(prompts: Sequence[Any], completions: Sequence[Any], **row) -> list[float]:
    return [0.5 if xml_answer(t).isdigit() else 0.0 for t in _texts(completions)]
