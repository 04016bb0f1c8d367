"""The quickstart: SFT then diffu-GRPO on a synthetic task, on CPU, with no downloads.

Registers the ``synthetic`` dataset (train / heldout; tasks ``sort`` and ``sums``), the ``exact_match`` and ``digit_match``
rewards, the ``synthetic`` benchmark (the held-out problems, exact match) and the ``dare quickstart`` command, which

  1. writes a small LLaDA-architecture model and a character tokenizer (``task.py``),
  2. runs ``recipes/quickstart/sft.yaml`` (masked-diffusion SFT),
  3. runs ``recipes/quickstart/d1.yaml`` (diffu-GRPO) from the SFT checkpoint,
  4. prints held-out accuracy and reward before and after RL (the RL run's evaluations
     at step 0 and at the end) and writes ``runs/quickstart-<seed>/summary.json``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import dare
from dare.registry import Benchmark, Dataset, Reward

from .task import make_base_model, rows

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "quickstart"


def exact_match(prompts, completions, ground_truth, **row) -> list[float]:
    """1.0 when the completion (stripped) is exactly the answer."""
    return [1.0 if c.strip() == str(t) else 0.0 for c, t in zip(completions, ground_truth)]


def digit_match(prompts, completions, ground_truth, **row) -> list[float]:
    """Fraction of the answer's digits right at their place (right-aligned), minus a
    penalty for extra characters: a dense signal for partially right sums."""
    scores = []
    for c, t in zip(completions, ground_truth):
        c, t = c.strip(), str(t)
        right = sum(a == b for a, b in zip(reversed(c), reversed(t)))
        scores.append(max(0.0, (right - max(0, len(c) - len(t))) / len(t)))
    return scores


@dare.hookimpl
def register_datasets(register):
    register(Dataset(name="synthetic", load=rows, splits=("train", "heldout"),
                     description="synthetic digit sorting / sums (quickstart); options task, size, length"))


@dare.hookimpl
def register_rewards(register):
    register(Reward(name="exact_match", fn=exact_match, description="completion == answer"))
    register(Reward(name="digit_match", fn=digit_match, description="fraction of answer digits right"))


def benchmark_rows(limit: int | None = None, few_shot: int = 0, task: str = "sort", length: int = 6,
                   max_operand: int = 99) -> list[dict]:
    """The held-out problems (never trained on) as benchmark rows with ids."""
    if few_shot:
        raise ValueError("the synthetic benchmark has no few-shot form (its model has a 64-token context)")
    out = rows("heldout", task=task, size=256, max_operand=max_operand, length=length, limit=limit)
    return [dict(r, id=f"{task}-{i}") for i, r in enumerate(out)]


def benchmark_score(completion: str, row: dict) -> tuple[float, str | None]:
    prediction = completion.strip()
    return float(prediction == row["ground_truth"]), prediction or None


@dare.hookimpl
def register_benchmarks(register):
    register(Benchmark(name="synthetic", load=benchmark_rows, score=benchmark_score,
                       description="quickstart's held-out digit sorting / sums problems, exact match"))


def run_quickstart(args) -> int:
    from dare import recipe as recipes
    from dare.executor.driver import run

    out = Path(args.output_dir) / f"quickstart-{args.seed}"
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    base = make_base_model(out / "base", seed=args.seed)
    common = [f"run.output_dir={out}", f"run.seed={args.seed}"]
    sft = recipes.load(RECIPES / "sft.yaml", common + [f"model.path={base}"] + list(args.sft_overrides or []))
    sft_dir = run(sft, str(RECIPES / "sft.yaml"), progress=not args.no_progress)
    t1 = time.perf_counter()
    sft_ckpt = sft_dir / "checkpoints" / (sft_dir / "checkpoints" / "latest").read_text().strip()
    rl = recipes.load(RECIPES / "d1.yaml", common + [f"model.path={sft_ckpt}"] + list(args.rl_overrides or []))
    rl_dir = run(rl, str(RECIPES / "d1.yaml"), progress=not args.no_progress)
    t2 = time.perf_counter()
    evals = [json.loads(x) for x in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in evals if m["kind"] == "eval"]
    train = [json.loads(x) for x in (rl_dir / "metrics.jsonl").read_text().splitlines()]
    phases = {k: sum(m.get(k, 0.0) for m in train if m["kind"] == "train")
              for k in ("time_generate", "time_reward", "time_update", "time_sync")}
    before, after = evals[0], evals[-1]
    rl_ckpt = rl_dir / "checkpoints" / (rl_dir / "checkpoints" / "latest").read_text().strip()
    heldout = rows("heldout", limit=rl.data.eval_limit, **rl.data.options)
    greedy = {name: greedy_accuracy(path, heldout) for name, path in (("before", sft_ckpt), ("after", rl_ckpt))}
    summary = {
        "seed": args.seed, "sft_seconds": t1 - t0, "rl_seconds": t2 - t1, "total_seconds": t2 - t0,
        "before": {"accuracy": before["heldout_exact_match"], "reward": before["heldout_reward"],
                   "greedy_accuracy": greedy["before"]},
        "after": {"accuracy": after["heldout_exact_match"], "reward": after["heldout_reward"],
                  "greedy_accuracy": greedy["after"]},
        "rl_phase_seconds": phases, "sft_run": str(sft_dir), "rl_run": str(rl_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nquickstart (seed {args.seed}): {len(heldout)} held-out problems")
    print(f"{'':<20}{'accuracy':>10}{'reward':>10}{'greedy accuracy':>17}")
    for label, key in (("SFT checkpoint", "before"), ("after diffu-GRPO", "after")):
        r = summary[key]
        print(f"{label:<20}{r['accuracy']:>10.3f}{r['reward']:>10.3f}{r['greedy_accuracy']:>17.3f}")
    print("(accuracy and reward: the policy's own sampler, one sample per problem; greedy: 8-step "
          "low-confidence decoding at temperature 0)")
    print(f"time: SFT {t1 - t0:.0f}s, RL {t2 - t1:.0f}s (" +
          ", ".join(f"{k.removeprefix('time_')} {v:.0f}s" for k, v in phases.items()) + f"), total {t2 - t0:.0f}s")
    print(f"summary: {out / 'summary.json'}")
    return 0


def greedy_accuracy(checkpoint: Path, heldout: list[dict], batch: int = 64) -> float:
    """Exact-match accuracy with LLaDA's reference sampler, greedy, 8 steps (in-process)."""
    import torch

    from dare.data import encode_prompt, left_pad
    from dare.executor.rollouts import completion_mask

    model, tok = dare.load_model(checkpoint), dare.load_tokenizer(checkpoint)
    eos = model.hf_config["eos_token_id"]
    correct = 0
    for start in range(0, len(heldout), batch):
        part = heldout[start:start + batch]
        prompts = left_pad([encode_prompt(tok, r["prompt"]) for r in part], eos)
        with torch.no_grad():
            out = dare.generate(model, prompts.input_ids, attention_mask=prompts.attention_mask, steps=8,
                                gen_length=8, block_length=8, temperature=0.0)
        comps = out.sequences[:, prompts.input_ids.shape[1]:]
        keep = completion_mask(comps, eos)
        texts = [tok.decode(c[k], skip_special_tokens=True) for c, k in zip(comps, keep)]
        correct += sum(float(s) for s in exact_match(None, texts, [r["ground_truth"] for r in part]))
    return correct / len(heldout)


@dare.hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("quickstart", help="SFT then diffu-GRPO on a synthetic task (CPU, minutes)",
                              description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--sft", dest="sft_overrides", action="append", metavar="KEY=VALUE",
                   help="override for the SFT recipe (repeatable)")
    p.add_argument("--rl", dest="rl_overrides", action="append", metavar="KEY=VALUE",
                   help="override for the RL recipe (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_quickstart)
