"""The ``dare`` command line: run | validate | plugins | generate | eval | export | leaderboard, plus plugin
commands."""
from __future__ import annotations

import argparse
import sys


def cmd_run(args) -> int:
    from dare import recipe as recipes
    from dare.executor.driver import run

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    rec = recipes.load(args.recipe, overrides)
    run_dir = run(rec, args.recipe, progress=not args.no_progress)
    print(f"run directory: {run_dir}")
    return 0


def cmd_validate(args) -> int:
    from dare import recipe as recipes

    rec = recipes.load(args.recipe, args.overrides)
    recipes.validate(rec, args.recipe)
    print(f"{args.recipe}: ok (family {rec.model.family}, algorithm {rec.algorithm_name}, "
          f"{rec.learner.workers} learner worker(s), {rec.learner.steps} steps)")
    return 0


def cmd_plugins(args) -> int:
    from dare.plugins import default_manager

    for info in default_manager().info():
        status = "FAILED" if info.error else "ok"
        print(f"{info.name} {info.version} [{status}]")
        for kind, names in sorted(info.registers.items()):
            print(f"    {kind}: {', '.join(sorted(names))}")
        if info.error:
            print(f"    error: {info.error.splitlines()[0]}")
    return 0


# generic `dare generate` flags -> the names some samplers use for the same thing
ALIASES = {"gen_length": ("max_new_tokens",), "steps": ("denoising_steps",)}


def sampler_kwargs(fn, given: dict) -> dict:
    """Map generic CLI arguments onto the sampler's own names; reject unknown ones."""
    import inspect

    params = inspect.signature(fn).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out = {}
    for key, value in given.items():
        if key in params or accepts_any:
            out[key] = value
            continue
        alias = next((a for a in ALIASES.get(key, ()) if a in params), None)
        if alias is None:
            names = [n for n in params if n not in ("model", "prompt_ids", "attention_mask")]
            raise ValueError(f"sampler argument {key!r} is not accepted; it takes: {', '.join(names)}")
        out[alias] = value
    return out


def cmd_generate(args) -> int:
    import torch

    import dare
    from dare.data import encode_prompt, left_pad
    from dare.generation import family_name
    from dare.plugins import registry

    model = dare.load_model(args.model, dtype=getattr(torch, args.dtype))
    tok = dare.load_tokenizer(args.model)
    family = registry().families.get(family_name(model))
    sampler = registry().samplers.get(args.sampler or family.default_sampler)
    pad = family.special_tokens(model.hf_config).pad_id
    prompts = [encode_prompt(tok, p) if not args.raw else tok(p, add_special_tokens=False).input_ids
               for p in args.prompt]
    batch = left_pad(prompts, pad)
    given = parse_set(args.set)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out = dare.generate(model, batch.input_ids, attention_mask=batch.attention_mask, sampler=sampler.name,
                        **sampler_kwargs(sampler.fn, given))
    width = batch.input_ids.shape[1]
    for i in range(len(prompts)):
        print(tok.decode(out.sequences[i, width:], skip_special_tokens=True))
    print(f"[sampler={sampler.name} nfe={out.nfe}]", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    import dare
    from dare.checkpoint import DTYPES_BY_NAME
    from dare.lora import load_adapter, merged_state_dict

    ckpt = Path(args.checkpoint)
    adapter = ckpt / "adapter"
    if not adapter.is_dir():
        raise SystemExit(f"{ckpt}: no adapter/ folder; a full checkpoint needs no export")
    import json
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = dare.load_model(args.base or base_path, dtype=DTYPES_BY_NAME[args.dtype])
    merged = load_adapter(base, adapter, trainable=False)
    state = merged_state_dict(merged)
    out = dare.load_model(args.base or base_path, dtype=DTYPES_BY_NAME[args.dtype])
    out.load_state_dict(state, strict=True)
    dare.save_model(out, args.out, tokenizer_from=ckpt)
    print(f"merged {adapter} into {args.out}")
    return 0


def cmd_eval(args) -> int:
    import os
    from pathlib import Path

    import ray

    from dare.checkpoint import read_config
    from dare.evaluation import resolve
    from dare.executor.actors import EvaluatorWorker
    from dare.executor.benchmarks import format_table, run_benchmarks
    from dare.plugins import registry
    from dare.recipe import BenchmarkSpec, RecipeError

    reg = registry()
    checkpoints = resolve(args.model, args.all_checkpoints)
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    for name in names:
        if name not in reg.benchmarks:
            raise RecipeError(f"--benchmarks: {reg.benchmarks.unknown_message(name)}")
    options = parse_set(args.option)
    specs = [BenchmarkSpec(name=n, limit=args.limit, few_shot=args.few_shot, options=options) for n in names]
    config = read_config(checkpoints[0].path)
    family = reg.family_for_model_type(config["model_type"])
    sampler = reg.samplers.get(args.sampler or family.default_sampler)
    sampler_args = sampler_kwargs(sampler.fn, parse_set(args.set))
    run_root = Path(args.model).resolve()
    out = Path(args.output) if args.output else (run_root if (run_root / "checkpoints").is_dir()
                                                  else Path("eval") / checkpoints[0].run)
    if not ray.is_initialized():
        ray.init(num_cpus=max(int(args.workers * args.num_cpus + 0.999), os.cpu_count() or 1),
                 include_dashboard=False, logging_level="WARNING")
    records = []
    for ckpt in checkpoints:
        model = {"family": family.name, "path": str(ckpt.path), "dtype": args.dtype}
        rollout = {"engine": args.engine}
        workers = [EvaluatorWorker.options(num_cpus=args.num_cpus).remote(None, model, rollout, args.num_cpus)
                   for _ in range(args.workers)]
        try:
            records += run_benchmarks(workers, reg, specs, sampler.name, sampler_args, args.batch_size, args.seed,
                                      ckpt, out)
        finally:
            for w in workers:
                ray.kill(w)
    print(format_table(records))
    print(f"results: {out / 'eval_results.jsonl'}; predictions: {out / 'predictions'}")
    return 0


def parse_set(items: list[str] | None) -> dict:
    """``KEY=VALUE`` strings -> dict, values parsed as YAML (numbers, booleans, lists)."""
    import yaml

    given = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not of the form KEY=VALUE")
        given[key.replace("-", "_")] = yaml.safe_load(value)
    return given


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """--sampler and its arguments; the generic flags are mapped to the sampler's names (ALIASES)."""
    p.add_argument("--sampler", default=None, help="sampler name (default: the family's)")
    p.add_argument("--steps", type=int, dest="steps")
    p.add_argument("--gen-length", type=int, dest="gen_length")
    p.add_argument("--block-length", type=int, dest="block_length")
    p.add_argument("--temperature", type=float)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other sampler argument")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dare", description="Post-training for diffusion language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="run a recipe", description="Run a YAML recipe end to end on Ray.")
    p.add_argument("recipe", help="path to the recipe YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. learner.steps=5")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="validate a recipe without running it")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("generate", help="generate text with a checkpoint and a sampler")
    p.add_argument("--model", required=True, help="HF checkpoint folder")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    add_sampler_flags(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval", help="evaluate a model or run on benchmarks",
        description="Run benchmarks on a model folder, a run's checkpoint or a run directory (its latest "
                    "checkpoint; --all-checkpoints: every one), sharded over evaluator workers on Ray. Writes "
                    "eval_results.jsonl (read by `dare leaderboard`) and per-problem predictions.")
    p.add_argument("--model", required=True, help="model folder, checkpoint folder or run directory")
    p.add_argument("--benchmarks", required=True, help="comma-separated benchmark names (see `dare plugins`)")
    add_sampler_flags(p)
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--few-shot", type=int, default=0, help="solved examples prepended to each prompt")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="benchmark load() option")
    p.add_argument("--workers", type=int, default=1, help="evaluator workers (Ray actors)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per worker")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--engine", default="torch", help="rollout engine")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all-checkpoints", action="store_true", help="every checkpoint of a run directory")
    p.add_argument("--output", default=None,
                   help="results folder (default: the run directory, else ./eval/<model folder name>)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="merge a LoRA checkpoint into a full HF checkpoint")
    p.add_argument("checkpoint", help="a run checkpoint folder holding adapter/")
    p.add_argument("out", help="output folder")
    p.add_argument("--base", default=None, help="base model folder (default: from adapter_config.json)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_export)

    from dare import leaderboard

    leaderboard.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dare.checkpoint import CheckpointError
    from dare.plugins import default_manager
    from dare.recipe import RecipeError

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    default_manager().hook.register_commands(subparsers=sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in ("generate", "eval"):  # map the CLI's generic flags to the sampler's names
        args.set = (args.set or []) + [f"{k}={getattr(args, k)}" for k in ("steps", "gen_length", "block_length",
                                                                         "temperature") if getattr(args, k) is not None]
    try:
        return args.func(args) or 0
    except (RecipeError, CheckpointError, KeyError, ValueError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
