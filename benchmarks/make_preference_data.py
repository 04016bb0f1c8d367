"""Make the shipped GSM8K preference set ``recipes/data/gsm8k_pref.jsonl`` (deterministic).

    python benchmarks/make_preference_data.py [--source PARQUET] [--out JSONL] [--pairs 400]

Source: the SFT layout of GSM8K, ``${DARE_SHARED:-../shared}/data/sft/train/gsm8k.parquet``,
without its last 256 rows (the ``gsm8k`` dataset's held-out split stays unseen). Rows are
taken in file order, keeping solutions of at most ``--max-chars`` characters, until
``--pairs`` pairs exist. Each row is

    {"prompt": [chat messages], "chosen": solution, "rejected": corrupted solution,
     "ground_truth": "N"}

where the rejected solution is the correct one with its last computed number
(``<<expr=V>>V``) replaced by a wrong value (an offset drawn from a generator seeded with the row
index) and its final line ``#### N`` replaced by a wrong answer in free text (``The answer is
M.``), which the GSM8K answer extractors do not accept. So every pair prefers the correct,
well-formatted solution over a wrong and badly formatted one: the format part is the same in
every pair, which is what a small model can learn in a few steps and carry over to held-out
pairs; the arithmetic part is problem-specific. Prints a summary table and writes the file;
running it twice gives identical bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K_HELDOUT = 256  # the gsm8k dataset plugin's held-out tail
FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")
CALC = re.compile(r"<<([^<>=]*)=(-?[\d,]*\.?\d+)>>(-?[\d,]*\.?\d+)")
REJECTED_FINAL = "The answer is {answer}."
NUMBER = re.compile(r"(?<![\w.,])\d[\d,]*(?:\.\d+)?(?![\w]|[.,]\d)")


def default_source() -> Path:
    return Path(os.environ.get("DARE_SHARED", ROOT.parent / "shared")) / "data" / "sft" / "train" / "gsm8k.parquet"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _format(value: float, like: str) -> str:
    """``value`` written like ``like``: same decimals, thousands commas if it had them."""
    if "." in like:
        return f"{value:.{len(like.split('.')[1])}f}"
    return f"{int(round(value)):,}" if "," in like else str(int(round(value)))


def wrong(text: str, rng: random.Random) -> str:
    """A different, plausible value for the number ``text`` (non-negative if it was)."""
    value = _number(text)
    for _ in range(100):
        delta = rng.choice([1, 2, 3, 4, 5, 10]) * rng.choice([-1, 1])
        candidate = value * 2 if rng.random() < 0.25 and value != 0 else value + delta
        if candidate >= 0 or value < 0:
            out = _format(candidate, text)
            if _number(out) != value:
                return out
    raise ValueError(f"no wrong value found for {text!r}")


def corrupt(solution: str, rng: random.Random) -> str | None:
    """The solution with a wrong last computed number and a wrong free-text final answer.

    The last computed number is the result of the last ``<<expr=V>>V`` annotation (both
    copies), or else the last number of the reasoning equal to the final answer. When it
    equals the final answer both get the same wrong value, so the rejected solution stays
    self-consistent and only its arithmetic is wrong. The final line becomes
    ``REJECTED_FINAL``. None if there is no ``#### N`` line.
    """
    final = FINAL.search(solution)
    if final is None:
        return None
    answer = final.group(1)
    bad_answer = wrong(answer, rng)
    body = solution[: final.start()]
    calcs = [m for m in CALC.finditer(body) if _number(m.group(2)) == _number(m.group(3))]
    if calcs:
        last = calcs[-1]
        value = _number(last.group(2))
        bad = _number(bad_answer) if value == _number(answer) else _number(wrong(last.group(2), rng))
        new = f"<<{last.group(1)}={_format(bad, last.group(2))}>>{_format(bad, last.group(3))}"
        body = body[: last.start()] + new + body[last.end():]
    else:
        same = [m for m in NUMBER.finditer(body) if _number(m.group(0)) == _number(answer)]
        if same:
            last = same[-1]
            body = body[: last.start()] + _format(_number(bad_answer), last.group(0)) + body[last.end():]
    return body + REJECTED_FINAL.format(answer=bad_answer)


def make_pairs(source: Path, pairs: int, max_chars: int, seed: int) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    rows = table.slice(0, table.num_rows - GSM8K_HELDOUT).to_pylist()
    out = []
    for index, row in enumerate(rows):
        solution = (row.get("extra_info") or {}).get("answer")
        if not solution or len(solution) > max_chars:
            continue
        rejected = corrupt(solution, random.Random(f"{seed}:{index}"))
        if rejected is None or rejected == solution:
            continue
        out.append({
            "prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
            "chosen": solution,
            "rejected": rejected,
            "ground_truth": row["reward_model"]["ground_truth"],
        })
        if len(out) == pairs:
            break
    if len(out) < pairs:
        raise SystemExit(f"only {len(out)} pairs with solutions <= {max_chars} chars in {source}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=default_source())
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "data" / "gsm8k_pref.jsonl")
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--max-chars", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.source.is_file():
        raise SystemExit(f"{args.source} not found (set DARE_SHARED or pass --source)")
    rows = make_pairs(args.source, args.pairs, args.max_chars, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    args.out.write_text(text, encoding="utf-8")
    mean = lambda key: sum(len(r[key]) for r in rows) / len(rows)  # noqa: E731
    print(f"| pairs | bytes | mean chosen chars | mean rejected chars |\n|---|---|---|---|\n"
          f"| {len(rows)} | {len(text.encode())} | {mean('chosen'):.0f} | {mean('rejected'):.0f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
