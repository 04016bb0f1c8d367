"""``math_answer``: GSM8K / MATH correctness checked with math-verify.

Extraction (``extract_answer``), in order:
  1. If the completion has an ``<answer>`` tag, only the last answer block is searched: the
     content of the last closed ``<answer>...</answer>``, or everything after the last
     ``<answer>`` when it is never closed. Otherwise the whole completion is searched.
  2. In that region: the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces
     balanced); else the rest of the line after the last ``####``; else, inside an answer
     block, the whole block. Nothing found (no tag, no box, no ``####``) -> 0.0: there is
     no "last number in the text" fallback.
  3. The extraction is cut to ``MAX_ANSWER_CHARS`` characters.

Normalisation (both sides): ``$`` and ``\\$`` dropped, ``\\!`` thin spaces dropped,
thousands separators removed when the whole answer is one number (``1,000`` -> ``1000``),
and a lone number followed only by words (``18 dollars``, ``5 eggs.``) keeps the number.
Both sides are then parsed by ``math_verify.parse`` as inline LaTeX (``$...$``, so plain
numbers, ``\\frac12``, ``1/2``, tuples and intervals all parse); the prediction falls back to
math-verify's plain-text extraction when LaTeX parsing finds nothing. Score:
``1.0 if math_verify.verify(gold, prediction) else 0.0``.

Robustness: any exception scores 0.0; a ground truth math-verify cannot parse scores 0.0.
math-verify's own ``signal.alarm`` timeouts (``PARSE_TIMEOUT`` / ``VERIFY_TIMEOUT`` seconds)
bound each call on the main thread; signals only work there, so off the main thread the
timeouts are disabled and the length cap is the bound. (The alarm shares the process's
one ``ITIMER_REAL``: a caller's own pending ``SIGALRM`` timer is cancelled by a call.)

Follows d1 (``diffu-grpo/reward_func.py``: ``<answer>`` extraction for GSM8K,
``\\boxed`` for MATH) with math-verify in place of exact-string / ``is_equiv`` matching, and
scores 1.0 rather than d1's 2.0 (weight it in the recipe).
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any, Sequence

from ._common import check_lengths, column, completion_text

MAX_ANSWER_CHARS = 512
PARSE_TIMEOUT = 3
VERIFY_TIMEOUT = 3

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_WITH_UNIT = re.compile(r"([+-]?\d+(?:\.\d+)?)\s+[A-Za-z][A-Za-z\s]*\.?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if
    there is none. An unclosed box gives the rest of the text."""
    start = max(text.rfind(opener) for opener in _BOX_OPENERS)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return text[i:]


def extract_answer(text: str) -> str | None:
    """The final answer of a completion (see the module docstring), or None."""
    region, in_block = text, False
    if "<answer>" in text:
        region = text[text.rfind("<answer>") + len("<answer>"):]
        region = region.split("</answer>", 1)[0]
        in_block = True
    found = last_boxed(region)
    if found is None and "####" in region:
        found = region[region.rfind("####") + 4:].strip().split("\n", 1)[0]
    if found is None and in_block:
        found = region
    if found is None:
        return None
    return found.strip()[:MAX_ANSWER_CHARS]


def normalize(answer: str) -> str:
    answer = answer.replace("\\$", "").replace("$", "").replace("\\!", "").strip()
    if answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1].rstrip()
    if _THOUSANDS.fullmatch(answer):
        answer = answer.replace(",", "")
    unit = _NUMBER_WITH_UNIT.fullmatch(answer)
    if unit:
        answer = unit.group(1)
    return answer


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT, VERIFY_TIMEOUT
    return None, None


def _quiet_math_verify() -> None:
    # math-verify warns on every call made with timeouts disabled (off the main thread).
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)


def is_correct(prediction: str, ground_truth: str) -> bool:
    """math-verify equivalence of an extracted prediction and a ground truth."""
    from math_verify import parse, verify

    parse_timeout, verify_timeout = _timeouts()
    if parse_timeout is None:
        _quiet_math_verify()
    gold = parse(f"${normalize(str(ground_truth))[:MAX_ANSWER_CHARS]}$",
                 parsing_timeout=parse_timeout)
    if not gold:
        return False
    pred_text = normalize(prediction)
    if not pred_text:
        return False
    pred = parse(f"${pred_text}$", parsing_timeout=parse_timeout)
    if not pred:
        pred = parse(pred_text, parsing_timeout=parse_timeout)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=verify_timeout))


def score(completion: Any, ground_truth: Any) -> float:
    try:
        if ground_truth is None:
            return 0.0
        answer = extract_answer(completion_text(completion))
        if answer is None:
            return 0.0
        return 1.0 if is_correct(answer, str(ground_truth)) else 0.0
    except Exception:  # garbage in: never fail a rollout batch
        return 0.0


def math_answer(prompts: Sequence[Any], completions: Sequence[Any], **row) -> list[float]:
    """1.0 when the completion's final answer is math-equivalent to ``ground_truth``."""
    truths = column("math_answer", row, "ground_truth", "reward_model")
    check_lengths("math_answer", completions, ground_truth=truths)
    return [score(c, t) for c, t in zip(completions, truths)]
