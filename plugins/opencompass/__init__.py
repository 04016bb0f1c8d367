"""opencompass plugin: evaluate dare checkpoints with OpenCompass (0.5.4), in-process.

Adds the ``dare opencompass`` command:

    dare opencompass --model PATH (--datasets NAME [NAME ...] | --config CONFIG.py)
                     [--limit N] [--sampler NAME] [--set KEY=VALUE ...] [--work-dir DIR]

It runs OpenCompass's inference and evaluation tasks on the model through a dare sampler
(``run.evaluate``), prints a table, keeps OpenCompass's outputs in ``WORK_DIR/<UTC time>/``
and appends one record per dataset to ``WORK_DIR/eval_results.jsonl``. OpenCompass itself is
optional: this module imports without it; the command says how to install it when missing.
See docs/opencompass.md.
"""
from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import dare

DEFAULT_WORK_DIR = "runs/opencompass"


def parse_sets(items) -> dict:
    """``KEY=VALUE`` strings -> dict (values parsed as YAML: numbers, booleans, lists)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is not of the form KEY=VALUE")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def fresh_dir(root: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
    path, k = root / stamp, 1
    while path.exists():
        path, k = root / f"{stamp}_{k}", k + 1
    return path


def record(model_path: str, dataset: str, score: float, n: int, sampler: str, sampler_args: dict,
           time_s: float) -> dict:
    """One line of ``eval_results.jsonl``: the keys and formats of ``dare eval``'s records
    (``dare.evaluation.make_record``), so ``dare leaderboard`` reads both."""
    return {
        "run": Path(model_path).name,
        "model": model_path,
        "checkpoint": model_path,
        "step": None,
        "recipe": None,
        "benchmark": f"opencompass/{dataset}",
        "score": score,
        "n": n,
        "sampler": sampler,
        "sampler_args": sampler_args,
        "few_shot": None,
        "time_s": round(float(time_s), 3),
        "dare_version": dare.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def cmd_opencompass(args) -> int:
    from dare_plugins.opencompass import model as oc_model

    try:
        oc_model.require_opencompass()
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from dare_plugins.opencompass import run

    if args.config:
        datasets = run.load_config_file(args.config, limit=args.limit)
    else:
        names = [n for item in args.datasets for n in item.split(",") if n]
        datasets = [d for name in names for d in run.dataset_configs(name, limit=args.limit)]
    model = oc_model.model_class()(path=args.model, sampler=args.sampler, sampler_args=parse_sets(args.set),
                                   batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    root = Path(args.work_dir)
    work = fresh_dir(root)
    abbr = args.abbr or re.sub(r"[^\w.-]+", "_", Path(args.model).resolve().name) or "dare"
    rows, records = [], []
    for cfg in datasets:
        name = run.dataset_abbr(cfg)
        t0 = time.perf_counter()
        metrics = run.evaluate(model, None, [cfg], work, abbr=abbr)[name]
        elapsed = time.perf_counter() - t0
        n = len(run.read_predictions(work, abbr, name))
        metric, value = run.primary_metric(metrics)
        records.append(record(args.model, name, value / 100.0, n, model.sampler,
                              model.last_sampler_args or dict(model.sampler_args), elapsed))
        rows.append((name, metric, f"{value:.2f}", str(n), f"{elapsed:.1f}"))
        # appended after each dataset, so a crash keeps the earlier ones
        with open(root / "eval_results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(records[-1]) + "\n")
    header = ("dataset", "metric", "value", "n", "time_s")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(f"[sampler={model.sampler} outputs={work} records={root / 'eval_results.jsonl'}]", file=sys.stderr)
    return 0


@dare.hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser(
        "opencompass", help="evaluate a checkpoint with OpenCompass datasets (needs opencompass installed)",
        description="Run OpenCompass generation datasets on a dare checkpoint through a dare sampler, "
                    "in-process. See docs/opencompass.md.")
    p.add_argument("--model", required=True, help="checkpoint folder (dare.load_model)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--datasets", action="append", metavar="NAME",
                       help="OpenCompass dataset config name(s) from opencompass/configs/datasets, e.g. "
                            "gsm8k (= gsm8k_gen_1d7fe4) or gsm8k_0shot_gen_a58960; repeat or comma-separate")
    which.add_argument("--config", help="an OpenCompass config file defining `datasets` (or *_datasets)")
    p.add_argument("--limit", type=int, default=None, help="keep the first N test problems of each dataset")
    p.add_argument("--sampler", default=None, help="sampler name (default: the family's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="sampler argument, e.g. --set steps=64 --set gen_length=256 (the length defaults "
                        "to the dataset's max_out_len)")
    p.add_argument("--work-dir", default=DEFAULT_WORK_DIR,
                   help=f"outputs go to WORK_DIR/<UTC time>/, records to WORK_DIR/eval_results.jsonl "
                        f"(default {DEFAULT_WORK_DIR})")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--abbr", default=None, help="model name in OpenCompass's outputs (default: the folder name)")
    p.set_defaults(func=cmd_opencompass)
