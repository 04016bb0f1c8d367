"""Rollout throughput: tokens/s, NFE and achieved FLOP/s of LLaDA decoding, reference vs Fast-dLLM.

    python benchmarks/rollout.py [--lengths 64,128,256] [--prompts 64] [--batch 32] [--threads 2]
                                 [--quick] [--model PATH] [--no-train] [--retrain] [--json PATH]

Model. A small LLaDA-architecture model (``dare_plugins.quickstart.task.make_base_model``:
d_model 64, 4 layers, char tokenizer, context 1024) trained with masked-diffusion SFT (the
``sft`` algorithm, stage recipes run by the driver's ``Learner`` role in process, see
``train_model``) on the synthetic ``sort`` task (sort 8 digits). dare's SFT rows are prompt +
response + <EOS>, padded with <EOS>, and the padding is in the loss, so the model learns to
write the sorted digits and then <EOS> over the rest of the generation. A model trained at one
padded length fails at the others (trained at generation 16, then 256: 0% at 64), so the
second stage pads each step's batch to a different generation length (16, 64, 256, 128, 512
in turn). About 10 minutes on one CPU thread. The checkpoint is cached in
``runs/rollout-bench-model/`` (``--retrain`` rebuilds it; ``--model PATH`` benchmarks any LLaDA
checkpoint with the char tokenizer instead; ``--no-train`` fails if the default model is
missing).

Benchmark. For every generation length L (block length min(32, L)), the N held-out prompts
(the ``synthetic`` benchmark's, never trained on) are decoded greedily (temperature 0) in
batches by every variant (``VARIANTS``): the reference sampler ``llada`` with steps = L (one
token per step), and ``llada_fast`` with cache none (exact mode) / prefix / dual at the same
schedule, and with the threshold 0.9 and factor rules. The variants run interleaved, batch by
batch (the order rotating from batch to batch), so load on the machine hits them alike; one
warm-up call per variant precedes the timing.

Reported per (L, variant):
  tokens/s        B * L generated tokens (the <EOS> fill included) / wall time of the call
  speed-up        tokens/s / the reference's, same L
  NFE/token       model calls / L, per batch (every call serves the whole batch; the reference: 1)
  MFLOP/token     model forward FLOPs / generated tokens, counted from what each call processed
  GFLOP/s, % peak counted FLOPs / wall time, and that over the float32 matmul peak measured
                  first (``torch.mm`` 2048^3 at the same thread count, benchmarks/_common.py)
  agreement       fraction of generated positions equal to the reference's token
  accuracy        exact match of the answer (the text before the first <EOS>) with the sorted
                  digits, scored by the ``synthetic`` benchmark's ``benchmark_score``

FLOPs of one model call (forward only, multiply-add = 2 FLOPs; norms, rotary, softmax and the
sampler's own ops not counted). Every call is observed (a pre-hook on the full forward, a
wrapper on ``forward_cached``): Q = query positions run through the blocks (rows x positions
of the call: the whole sequence for a full forward, the window for a cached one), K = key
positions each query attends to (the whole sequence: cached keys included), H = positions
the LM head runs on (all positions of a full forward; only the logits_mask ones of a cached
call). With N_blocks the weights of the transformer blocks' linear layers (the
non-embedding parameters without the LM head), d the attention width and n_layers layers:

    FLOPs = 2 * N_blocks * Q  +  4 * n_layers * d * Q * K  +  2 * d * V * H
            (linear layers)      (QK^T and AV)              (LM head, vocabulary V)

The exact mode does the reference's work; the cached modes do less per call (Q is the block,
or block + suffix, instead of the sequence); the threshold / factor rules make fewer calls.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, matmul_peak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "runs" / "rollout-bench-model"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "rollout.json"
TRAIN_INFO = "rollout_bench_train.json"

DIGITS = 8  # the sort task's size
CONTEXT = 1024  # the model's max_sequence_length
MODEL_SIZES = {"d_model": 64, "n_layers": 4}
# masked-diffusion SFT stages: a step pads its rows to prompt + gens[step % len(gens)] tokens
TRAIN_STAGES = (
    {"name": "short", "gens": (16,), "steps": 1000, "batch": 64, "lr": 2e-3, "warmup": 50},
    {"name": "mixed", "gens": (16, 64, 256, 128, 512), "steps": 700, "batch": 32, "lr": 5e-4, "warmup": 20},
)
THRESHOLD, FACTOR = 0.9, 1.0


def _shown(path) -> str:
    """``path`` relative to the project root when inside it (no machine paths in results)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@dataclass(frozen=True)
class Variant:
    name: str
    sampler: str
    args: dict = field(default_factory=dict)


VARIANTS = (
    Variant("reference", "llada"),
    Variant("exact (cache none)", "llada_fast", {"cache": "none"}),
    Variant("prefix", "llada_fast", {"cache": "prefix"}),
    Variant("dual", "llada_fast", {"cache": "dual"}),
    Variant(f"threshold {THRESHOLD}", "llada_fast", {"cache": "none", "threshold": THRESHOLD}),
    Variant(f"prefix + threshold {THRESHOLD}", "llada_fast", {"cache": "prefix", "threshold": THRESHOLD}),
    Variant(f"dual + threshold {THRESHOLD}", "llada_fast", {"cache": "dual", "threshold": THRESHOLD}),
    Variant(f"dual + factor {FACTOR}", "llada_fast", {"cache": "dual", "factor": FACTOR}),
)


# --- the model -----------------------------------------------------------------------------


def prompt_length(tokenizer, digits: int) -> int:
    from dare.data import encode_prompt

    return len(encode_prompt(tokenizer, [{"role": "user", "content": "0" * digits}]))


def train_model(folder: Path, digits: int = DIGITS, stages=TRAIN_STAGES, threads: int = 1,
                progress: bool = True) -> dict:
    """Masked-diffusion SFT of a fresh quickstart model on sorting, stage by stage; the final
    weights + tokenizer are written to ``folder`` (with ``rollout_bench_train.json``).

    Every stage is a recipe (written to a temporary folder, checked by ``dare.recipe``) run by
    the driver's own ``Learner`` role in process, with the driver's data path (``encode_units``,
    ``DataOrder``, ``collate_units``: prompt + sorted digits + <EOS>, <EOS> padding in the loss).
    One difference from ``dare run``: the driver pads every row to ``data.max_length``, and a
    model trained at one length does not work at the others, so each step here pads its batch
    to the prompt + one of the stage's generation lengths ``gens`` (in turn).
    """
    import yaml
    from tqdm import tqdm

    import dare
    from dare import recipe as recipes
    from dare.data import DataOrder, collate_units, encode_units
    from dare.executor.roles import Learner
    from dare.plugins import default_manager
    from dare_plugins.quickstart.task import make_base_model
    from dare_plugins.quickstart.task import rows as synthetic_rows

    t_start = time.perf_counter()
    manager = default_manager()
    info = {"digits": digits, "sizes": dict(MODEL_SIZES), "context": CONTEXT, "threads": threads, "stages": []}
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        path = make_base_model(Path(tmp) / "base", seed=0, max_sequence_length=CONTEXT, **MODEL_SIZES)
        tokenizer = dare.load_tokenizer(path)
        plen = prompt_length(tokenizer, digits)
        rows = synthetic_rows("train", task="sort", length=digits)
        for stage in stages:
            gens = tuple(stage["gens"])
            if min(gens) < digits + 1:
                raise ValueError(f"stage {stage['name']}: generation lengths {gens} leave no room for the answer")
            recipe = {
                "model": {"family": "llada", "path": str(Path(path).resolve())},
                "algorithm": {"name": "sft"},
                "data": {"dataset": "synthetic", "train_split": "train", "eval_split": None,
                         "max_length": plen + max(gens), "options": {"task": "sort", "length": digits}},
                "learner": {"workers": 1, "num_cpus": threads,
                            "optimizer": {"name": "adamw", "lr": stage["lr"], "weight_decay": 0.0},
                            "global_batch_size": stage["batch"], "micro_batch_size": stage["batch"],
                            "steps": stage["steps"], "lr_schedule": "cosine", "warmup_steps": stage["warmup"]},
                "evaluator": {"every": stage["steps"], "num_samples": 0},
                "run": {"name": stage["name"], "output_dir": tmp, "seed": 0, "tensorboard": False},
            }
            source = Path(tmp) / f"{stage['name']}.yaml"
            source.write_text(yaml.safe_dump(recipe, sort_keys=False))
            parsed = recipes.load(source)
            recipes.validate(parsed, str(source), manager)
            t0 = time.perf_counter()
            learner = Learner(parsed.model_dump(mode="json"))
            eos = learner.special.eos_id
            units = encode_units("sft", rows, tokenizer, plen + min(gens), eos)
            order = DataOrder(len(units), stage["batch"], parsed.run.seed)
            losses = []
            bar = tqdm(range(stage["steps"]), desc=f"train {stage['name']}", disable=not progress, dynamic_ncols=True)
            for step in bar:
                length = plen + gens[step % len(gens)]
                batch = collate_units([units[i] for i in order.indices(step)], length, learner.special.pad_id,
                                      parsed.run.seed, step)
                losses.append(learner.train_step(batch, step).metrics["loss"])
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            path = Path(tmp) / f"{stage['name']}-checkpoint"
            learner.save_checkpoint(str(path), stage["steps"])
            shown = json.loads(json.dumps(recipe).replace(tmp, "<tmp>"))  # no machine paths in results
            info["stages"].append(dict(stage, gens=list(gens), recipe=shown, seconds=time.perf_counter() - t0,
                                       final_loss=sum(losses[-20:]) / len(losses[-20:])))
        if folder.exists():
            shutil.rmtree(folder)
        dare.save_model(dare.load_model(path), folder, tokenizer_from=path)
    info["train_seconds"] = time.perf_counter() - t_start
    (folder / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def resolve_model(args) -> tuple[Path, dict]:
    """The checkpoint to benchmark, trained first when it is the default one and missing."""
    if args.model is not None:
        folder = Path(args.model)
        if not (folder / "config.json").is_file():
            raise SystemExit(f"--model {folder}: no checkpoint there (config.json missing)")
    else:
        folder = DEFAULT_MODEL
        if args.retrain or not (folder / "config.json").is_file():
            if args.no_train:
                raise SystemExit(f"the benchmark model {folder} is missing and --no-train was given: run "
                                 "`python benchmarks/rollout.py` once without --no-train to train it "
                                 "(masked-diffusion SFT on CPU, minutes), or pass --model PATH")
            print(f"training the benchmark model into {folder} ...", flush=True)
            train_model(folder, threads=args.threads, progress=not args.quiet)
            torch.set_num_threads(args.threads)
    info_file = folder / TRAIN_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {"digits": args.digits, "trained": False}
    return folder, info


# --- counting what each model call processes -----------------------------------------------


class ForwardCounter:
    """Observes every model call (full forward and ``forward_cached``) and adds up its FLOPs."""

    def __init__(self, model):
        cfg = model.hf_config
        self.layers, self.d = cfg["n_layers"], cfg["d_model"]
        self.vocab = cfg.get("embedding_size") or cfg["vocab_size"]
        blocks = model.model.transformer.blocks
        self.n_blocks = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
        self.reset()
        model.register_forward_pre_hook(self._full, with_kwargs=True)
        if hasattr(model, "forward_cached"):
            inner = model.forward_cached

            def forward_cached(*args, **kwargs):
                ids = args[0] if args else kwargs["input_ids"]
                cache = args[1] if len(args) > 1 else kwargs.get("cache")
                logits_mask = args[4] if len(args) > 4 else kwargs.get("logits_mask")
                B, n = ids.shape
                keys = n if cache is None else cache.length
                head = B * n if logits_mask is None else int(logits_mask.sum())
                self.add(B * n, keys, head)
                return inner(*args, **kwargs)

            model.forward_cached = forward_cached  # the instance attribute shadows the method

    def reset(self) -> None:
        self.calls, self.positions, self.flops = 0, 0, 0.0

    def _full(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        B, n = ids.shape
        self.add(B * n, n, B * n)

    def add(self, queries: int, keys: int, head: int) -> None:
        self.calls += 1
        self.positions += queries
        self.flops += (2 * self.n_blocks * queries + 4 * self.layers * self.d * queries * keys
                       + 2 * self.d * self.vocab * head)


# --- the benchmark -------------------------------------------------------------------------


def score(tokenizer, completions: torch.Tensor, rows: list[dict], eos: int) -> list[float]:
    from dare.executor.rollouts import completion_mask

    try:
        from dare_plugins.quickstart import benchmark_score
    except ImportError:  # the scorer's rule: the stripped text before <EOS> equals the answer
        def benchmark_score(text, row):
            return float(text.strip() == row["ground_truth"]), text.strip()
    keep = completion_mask(completions, eos)
    texts = [tokenizer.decode(c[k], skip_special_tokens=True) for c, k in zip(completions, keep)]
    return [float(benchmark_score(t, r)[0]) for t, r in zip(texts, rows)]


def available_variants(registry) -> list[Variant]:
    out = [v for v in VARIANTS if v.sampler in registry.samplers]
    missing = sorted({v.sampler for v in VARIANTS} - {v.sampler for v in out})
    if missing:
        print(f"note: sampler(s) {', '.join(missing)} not registered; their variants are skipped")
    return out


def bench_length(model, tokenizer, counter: ForwardCounter, rows: list[dict], length: int, batch: int,
                 variants: list[Variant], peak: float) -> list[dict]:
    import dare
    from dare.data import encode_prompt, left_pad

    eos = model.hf_config["eos_token_id"]
    block = min(32, length)
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    stats = {v.name: {"time": 0.0, "nfe": 0, "calls": 0, "positions": 0, "flops": 0.0, "seqs": [], "batches": 0}
             for v in variants}
    starts = list(range(0, len(rows), batch))
    for b, start in enumerate(starts):
        pb = left_pad(prompts[start:start + batch], eos)
        order = variants[b % len(variants):] + variants[:b % len(variants)]
        for v in order:
            counter.reset()
            t0 = time.perf_counter()
            out = dare.generate(model, pb.input_ids, attention_mask=pb.attention_mask, sampler=v.sampler,
                                steps=length, gen_length=length, block_length=block, temperature=0.0, **v.args)
            dt = time.perf_counter() - t0
            s = stats[v.name]
            s["time"] += dt
            s["nfe"] += int(out.nfe)
            s["calls"] += counter.calls
            s["positions"] += counter.positions
            s["flops"] += counter.flops
            s["batches"] += 1
            s["seqs"].append(out.sequences[:, pb.input_ids.shape[1]:])
    results = []
    ref = torch.cat(stats[variants[0].name]["seqs"]) if variants[0].name == "reference" else None
    for v in variants:
        s = stats[v.name]
        seqs = torch.cat(s["seqs"])
        tokens = seqs.numel()
        acc = score(tokenizer, seqs, rows, eos)
        r = {
            "length": length, "block_length": block, "variant": v.name, "sampler": v.sampler,
            "sampler_args": dict(v.args, steps=length, gen_length=length, block_length=block, temperature=0.0),
            "prompts": len(rows), "batches": s["batches"], "time_s": s["time"], "generated_tokens": tokens,
            "tokens_per_s": tokens / s["time"], "nfe": s["nfe"], "nfe_per_token": s["nfe"] / (s["batches"] * length),
            "model_calls_observed": s["calls"], "positions_per_token": s["positions"] / tokens,
            "flops_per_token": s["flops"] / tokens, "achieved_flops": s["flops"] / s["time"],
            "fraction_of_peak": s["flops"] / s["time"] / peak,
            "agreement": None if ref is None else float((seqs == ref).float().mean()),
            "accuracy": sum(acc) / len(acc),
        }
        if s["calls"] != s["nfe"]:
            print(f"warning: {v.name} at L={length}: {s['calls']} model calls observed but nfe = {s['nfe']}; "
                  "the FLOP count may be off")
        results.append(r)
    base = results[0]["tokens_per_s"] if results[0]["variant"] == "reference" else None
    for r in results:
        r["speedup"] = None if base is None else r["tokens_per_s"] / base
    return results


def targets(results: list[dict], length: int = 256) -> dict:
    """The issue's targets at ``length``: cached + threshold decoding >= 5x the reference's
    tokens/s with accuracy within 1 point; NFE per token <= 0.35 at threshold 0.9."""
    at = {r["variant"]: r for r in results if r["length"] == length}
    ref = at.get("reference")
    if ref is None:
        return {"length": length, "evaluated": False}
    out = {"length": length, "evaluated": True, "speed": {}, "nfe": {}}
    for name in (f"prefix + threshold {THRESHOLD}", f"dual + threshold {THRESHOLD}"):
        if name in at:
            r = at[name]
            out["speed"][name] = {"speedup": r["speedup"], "accuracy_drop": ref["accuracy"] - r["accuracy"],
                                  "met": r["speedup"] >= 5 and ref["accuracy"] - r["accuracy"] <= 0.01 + 1e-9}
    for name, r in at.items():
        if "threshold" in name:
            out["nfe"][name] = {"nfe_per_token": r["nfe_per_token"], "met": r["nfe_per_token"] <= 0.35}
    return out


def print_table(results: list[dict]) -> None:
    print("| L | variant | tokens/s | speed-up | NFE/token | MFLOP/token | GFLOP/s | % peak | agreement | accuracy |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        ag = "" if r["agreement"] is None else f"{r['agreement']:.4f}"
        print(f"| {r['length']} | {r['variant']} | {r['tokens_per_s']:.0f} | {sp} | {r['nfe_per_token']:.3f} | "
              f"{r['flops_per_token'] / 1e6:.2f} | {r['achieved_flops'] / 1e9:.2f} | {r['fraction_of_peak']:.1%} | "
              f"{ag} | {r['accuracy']:.3f} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,128,256", help="generation lengths, comma-separated")
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts per length")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 prompts in batches of 4, L=64, no warm-up")
    parser.add_argument("--model", default=None,
                        help="any LLaDA checkpoint (default: the trained one, runs/rollout-bench-model)")
    parser.add_argument("--no-train", action="store_true", help="fail instead of training a missing model")
    parser.add_argument("--retrain", action="store_true", help="retrain the default model even if cached")
    parser.add_argument("--digits", type=int, default=DIGITS, help="sort task size for a --model without "
                                                                   f"{TRAIN_INFO}")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--quiet", action="store_true", help="no training progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.prompts, args.batch = "64", 8, 4
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]

    import dare
    from dare.plugins import registry
    from dare_plugins.quickstart.task import rows as synthetic_rows

    torch.set_num_threads(args.threads)
    machine = dict(machine_info(), threads=args.threads)  # the load average before the run
    folder, info = resolve_model(args)
    model, tokenizer = dare.load_model(folder).eval(), dare.load_tokenizer(folder)
    digits = int(info.get("digits", args.digits))
    held = [dict(r, id=f"sort-{i}") for i, r in
            enumerate(synthetic_rows("heldout", task="sort", size=256, length=digits, limit=args.prompts))]
    plen = prompt_length(tokenizer, digits)
    max_len = model.hf_config.get("max_sequence_length") or 10**9
    fits = [L for L in lengths if plen + L <= max_len]
    if fits != lengths:
        print(f"skipping lengths {sorted(set(lengths) - set(fits))}: prompt ({plen}) + L exceeds the model's "
              f"context of {max_len}")
    variants = available_variants(registry())
    counter = ForwardCounter(model)
    peak = matmul_peak(1024, 3) if args.quick else matmul_peak()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {folder} ({params / 1e6:.2f}M parameters, {counter.n_blocks / 1e6:.2f}M in block linears, "
          f"d_model {counter.d}, {counter.layers} layers); task: sort {digits} digits, prompt {plen} tokens")
    print(f"matmul peak (fp32 mm, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s; "
          f"{len(held)} prompts, batch {args.batch}, greedy\n", flush=True)

    if not args.quick:  # warm-up: one short call per variant (first-call allocations, lazy imports)
        warm = synthetic_rows("train", task="sort", size=2, length=digits)
        for v in variants:
            bench_length(model, tokenizer, counter, warm, min(fits + [64]), 2, [v], peak)

    results = []
    for L in fits:
        t0 = time.perf_counter()
        results += bench_length(model, tokenizer, counter, held, L, args.batch, variants, peak)
        print(f"L={L}: {time.perf_counter() - t0:.0f}s", flush=True)
    print()
    print_table(results)
    check = targets(results)
    if check["evaluated"]:
        print(f"\ntargets at L={check['length']}:")
        for name, t in check["speed"].items():
            print(f"  {name}: {t['speedup']:.2f}x the reference's tokens/s (target >= 5x), accuracy "
                  f"{-t['accuracy_drop']:+.3f} vs the reference (target >= -0.01): {'met' if t['met'] else 'NOT met'}")
        for name, t in check["nfe"].items():
            print(f"  {name}: NFE/token {t['nfe_per_token']:.3f} (target <= 0.35): {'met' if t['met'] else 'NOT met'}")
    report = {
        "machine": machine, "peak_flops": peak,
        "model": {"path": _shown(folder), "params": params, "block_linear_params": counter.n_blocks,
                  "d_model": counter.d, "n_layers": counter.layers, "vocab": counter.vocab,
                  "max_sequence_length": model.hf_config.get("max_sequence_length"), "train": info},
        "settings": {"lengths": fits, "prompts": len(held), "batch": args.batch, "digits": digits,
                     "prompt_length": plen, "temperature": 0.0, "quick": args.quick},
        "results": results, "targets": check,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
