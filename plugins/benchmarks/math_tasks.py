"""``gsm8k`` and ``math500``: grade-school and competition math with a single final answer.

gsm8k (1,319 test problems, ``rl/test/gsm8k.parquet``)
  prompt: the question + `` Let's think step by step and output the final answer after
  "####".`` (the instruction of the SFT file, so SFT-trained models see their format).
  few-shot: the first ``few_shot`` problems of ``sft/train/gsm8k.parquet`` as earlier
  user/assistant turns, the assistant giving the worked solution with its ``<<48/2=24>>``
  calculator notes removed.
  score: the final number (``extract_answer`` of the rewards plugin: the last ``\\boxed{}``,
  ``####`` line or ``<answer>`` block; without any of them the last number of the whole
  completion), compared exactly as a fraction with the ground truth (``1,000`` = ``1000``,
  ``18.00`` = ``18``). Inside an extracted answer the last number counts (``18 dollars``,
  ``x = 18``). prediction: that number, without thousands separators.

math500 (500 test problems, ``rl/test/math500.parquet``)
  prompt: the problem + ``Please reason step by step, and put your final answer within
  \\boxed{}.``
  few-shot: up to 5 hand-written worked examples (``MATH_EXAMPLES``; no train split ships).
  score: math-verify equivalence of the extracted answer (rewards plugin ``extract_answer``
  and ``is_correct``: the same rule as the ``math_answer`` reward) with the ground truth.
  prediction: the extracted answer (None when there is no box, ``####`` or ``<answer>``).
"""
from __future__ import annotations

import re
from fractions import Fraction

from dare_plugins.rewards._common import completion_text
from dare_plugins.rewards.math_reward import extract_answer, is_correct

from ._data import check_counts, read_parquet, resolve_data_dir, with_shots

GSM8K_INSTRUCTION = ' Let\'s think step by step and output the final answer after "####".'
MATH_INSTRUCTION = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")

# Hand-written (question, worked solution) pairs for math500's few-shot prompts.
MATH_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("What is the sum of all positive divisors of $18$?",
     "The positive divisors of $18 = 2 \\cdot 3^2$ are $1, 2, 3, 6, 9, 18$. Their sum is "
     "$1 + 2 + 3 + 6 + 9 + 18 = 39$.\n\nThe answer is $\\boxed{39}$."),
    ("Solve for $x$: $5x - 9 = 2x + 12$.",
     "Subtracting $2x$ from both sides gives $3x - 9 = 12$, so $3x = 21$ and $x = 7$.\n\n"
     "The answer is $\\boxed{7}$."),
    ("Compute $\\frac{3}{4} + \\frac{5}{6}$. Express your answer as a common fraction.",
     "The least common denominator is $12$: $\\frac{3}{4} = \\frac{9}{12}$ and "
     "$\\frac{5}{6} = \\frac{10}{12}$. The sum is $\\frac{19}{12}$, already in lowest "
     "terms.\n\nThe answer is $\\boxed{\\frac{19}{12}}$."),
    ("In how many ways can a committee of $3$ people be chosen from a group of $8$ people?",
     "Order does not matter, so the count is $\\binom{8}{3} = \\frac{8 \\cdot 7 \\cdot 6}"
     "{3 \\cdot 2 \\cdot 1} = 56$.\n\nThe answer is $\\boxed{56}$."),
    ("Find the distance between the points $(1, 2)$ and $(7, 10)$.",
     "The differences are $7 - 1 = 6$ and $10 - 2 = 8$, so the distance is "
     "$\\sqrt{6^2 + 8^2} = \\sqrt{100} = 10$.\n\nThe answer is $\\boxed{10}$."),
)


# --- gsm8k -----------------------------------------------------------------------------------


def load_gsm8k(limit: int | None = None, few_shot: int = 0, data_dir: str | None = None,
               **options) -> list[dict]:
    check_counts("gsm8k", limit, few_shot, options=options)
    folder = resolve_data_dir(data_dir)
    shots = []
    if few_shot:
        for r in read_parquet(folder, "sft/train/gsm8k.parquet", few_shot):
            solution = _CALCULATOR_NOTE.sub("", r["extra_info"]["answer"])
            shots.append((r["extra_info"]["question"] + GSM8K_INSTRUCTION, solution))
    rows = []
    for r in read_parquet(folder, "rl/test/gsm8k.parquet", limit):
        question = r["prompt"][-1]["content"]
        rows.append({
            "id": f"gsm8k/{r['extra_info']['index']}",
            "prompt": with_shots(shots, question + GSM8K_INSTRUCTION),
            "question": question,
            "ground_truth": r["reward_model"]["ground_truth"],
        })
    return rows


def last_number(text: str) -> str | None:
    """The last number written in ``text``, thousands separators dropped; None if none."""
    found = _NUMBER.findall(text.replace("\\!", ""))
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number if number not in ("", "-") else None


def score_gsm8k(completion, row: dict) -> tuple[float, str | None]:
    text = completion_text(completion)
    answer = extract_answer(text)
    prediction = last_number(answer if answer is not None else text)
    if prediction is None:
        return 0.0, None
    try:
        truth = Fraction(str(row["ground_truth"]).replace(",", "").strip())
        return (1.0 if Fraction(prediction) == truth else 0.0), prediction
    except (ValueError, ZeroDivisionError):
        return 0.0, prediction


# --- math500 ---------------------------------------------------------------------------------


def load_math500(limit: int | None = None, few_shot: int = 0, data_dir: str | None = None,
                 **options) -> list[dict]:
    check_counts("math500", limit, few_shot, len(MATH_EXAMPLES), options)
    shots = [(q + MATH_INSTRUCTION, a) for q, a in MATH_EXAMPLES[:few_shot]]
    rows = []
    for r in read_parquet(resolve_data_dir(data_dir), "rl/test/math500.parquet", limit):
        question = r["prompt"][-1]["content"]
        rows.append({
            "id": f"math500/{r['extra_info']['index']}",
            "prompt": with_shots(shots, question + MATH_INSTRUCTION),
            "question": question,
            "ground_truth": r["reward_model"]["ground_truth"],
        })
    return rows


def score_math500(completion, row: dict) -> tuple[float, str | None]:
    answer = extract_answer(completion_text(completion))
    if answer is None or not answer:
        return 0.0, None
    try:
        return (1.0 if is_correct(answer, str(row["ground_truth"])) else 0.0), answer
    except Exception:  # math-verify on garbage: a wrong answer, never a crashed evaluation
        return 0.0, answer
