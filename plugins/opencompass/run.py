"""Run OpenCompass evaluations in-process on a dare model.

``evaluate`` builds an OpenCompass config (one model, the given dataset configs, a work
dir) and runs ``OpenICLInferTask`` then ``OpenICLEvalTask`` in this process, with the live
model passed to the inference task (no subprocess, no reload). OpenCompass writes
``WORK_DIR/predictions/<abbr>/<dataset>.json`` and ``WORK_DIR/results/<abbr>/<dataset>.json``.
Both tasks skip work whose output file already exists, so ``evaluate`` refuses a work dir
that already holds outputs for the same model abbr and dataset.

Dataset configs are OpenCompass's own dicts: ``dataset_configs("gsm8k_gen_1d7fe4")`` reads a
config module shipped in the installed ``opencompass/configs/datasets``; ``load_config_file``
reads the datasets of a config file (``datasets = [...]`` or every ``*_datasets`` list).
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

from dare_plugins.opencompass.model import model_class, require_opencompass

# short names for the configs dare documents; any other config module name works as well
ALIASES = {"gsm8k": "gsm8k_gen_1d7fe4"}


def dataset_abbr(cfg: dict) -> str:
    if "abbr" in cfg:
        return cfg["abbr"]
    abbr = cfg["path"] + (f"_{cfg['name']}" if "name" in cfg else "")
    return abbr.replace("/", "_")


def set_limit(datasets: list[dict], limit: int | None) -> list[dict]:
    """Copies of ``datasets`` keeping the first ``limit`` test problems (``test_range``)."""
    out = copy.deepcopy(list(datasets))
    if limit is None:
        return out
    if int(limit) < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    for cfg in out:
        cfg["reader_cfg"] = dict(cfg.get("reader_cfg") or {}, test_range=f"[0:{int(limit)}]")
    return out


def _collect(namespace: dict, where: str) -> list[dict]:
    if namespace.get("datasets"):
        return list(namespace["datasets"])
    found = [d for key, value in namespace.items() if key.endswith("_datasets") and isinstance(value, list)
             for d in value]
    if not found:
        raise ValueError(f"{where} defines no datasets (a `datasets` list or `*_datasets` lists)")
    return found


@functools.lru_cache(maxsize=None)
def _config_modules() -> dict[str, str]:
    """Config module name -> dotted module path, for opencompass/configs/datasets/**.py."""
    import opencompass.configs.datasets as root

    base = Path(list(root.__path__)[0])  # a namespace package: no __init__.py
    modules = {}
    for file in sorted(base.rglob("*.py")):
        if file.name == "__init__.py":
            continue
        dotted = ".".join(("opencompass.configs.datasets",) + file.relative_to(base).with_suffix("").parts)
        modules.setdefault(file.stem, dotted)
    return modules


def dataset_configs(name: str, limit: int | None = None) -> list[dict]:
    """The dataset configs of OpenCompass's config module ``name`` (e.g. ``gsm8k_gen_1d7fe4``,
    ``gsm8k_0shot_gen_a58960``; ``gsm8k`` is short for ``gsm8k_gen_1d7fe4``), read from the
    installed opencompass package; ``limit`` keeps the first N test problems."""
    require_opencompass()
    import importlib

    name = ALIASES.get(name, name)
    modules = _config_modules()
    if name not in modules:
        import difflib

        close = difflib.get_close_matches(name, list(modules), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"no OpenCompass dataset config named {name!r} in opencompass/configs/datasets.{hint}")
    module = importlib.import_module(modules[name])
    return set_limit(_collect(vars(module), modules[name]), limit)


def gsm8k_datasets(limit: int | None = None, config: str = "gsm8k_gen_1d7fe4") -> list[dict]:
    """OpenCompass's GSM8K config (``gsm8k_gen_1d7fe4``: 4-shot chain of thought, GenInferencer
    with max_out_len 512, ``gsm8k_postprocess`` + ``Gsm8kEvaluator``), optionally limited to
    the first ``limit`` test problems. Data: ``$COMPASS_DATA_CACHE/data/gsm8k/{train,test}.jsonl``."""
    return dataset_configs(config, limit)


def load_config_file(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The datasets of an OpenCompass config file (``read_base()`` imports work)."""
    require_opencompass()
    from mmengine.config import Config

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such config file")
    cfg = Config.fromfile(str(file), format_python_code=False)
    return set_limit(_collect(dict(cfg.items()), str(file)), limit)


def output_paths(work_dir: str | os.PathLike, abbr: str, dataset: dict | str) -> dict[str, Path]:
    """Where OpenCompass writes the predictions and results of ``dataset`` for model ``abbr``."""
    name = dataset if isinstance(dataset, str) else dataset_abbr(dataset)
    work = Path(work_dir)
    return {"predictions": work / "predictions" / abbr / f"{name}.json",
            "partial": work / "predictions" / abbr / f"tmp_{name}.jsonl",
            "results": work / "results" / abbr / f"{name}.json"}


def read_predictions(work_dir: str | os.PathLike, abbr: str, dataset: dict | str) -> list[dict]:
    """The prediction records (``origin_prompt``, ``prediction``, ``gold``) in problem order."""
    data = json.loads(output_paths(work_dir, abbr, dataset)["predictions"].read_text())
    return [data[str(i)] for i in range(len(data))]


def as_model(model, tokenizer=None, sampler=None, sampler_args=None, batch_size=8, registry=None):
    """An OpenCompass model: ``model`` itself if it is one, else a ``DareOpenCompassModel``
    around a loaded dare model (+ tokenizer) or a checkpoint path."""
    base = require_opencompass()
    if isinstance(model, base):
        return model
    cls = model_class()
    if isinstance(model, (str, os.PathLike)):
        return cls(path=str(model), tokenizer=tokenizer, sampler=sampler, sampler_args=sampler_args,
                   batch_size=batch_size, registry=registry)
    return cls(model=model, tokenizer=tokenizer, sampler=sampler, sampler_args=sampler_args,
               batch_size=batch_size, registry=registry)


def evaluate(model, tokenizer, datasets: list[dict], work_dir: str | os.PathLike, sampler: str | None = None,
             sampler_args: dict | None = None, batch_size: int = 8, abbr: str = "dare",
             registry=None) -> dict[str, dict]:
    """Run OpenCompass inference + evaluation of ``datasets`` in this process.

    model: a loaded dare model (with ``tokenizer``), a checkpoint path, or an OpenCompass
        model object (e.g. a ``DareOpenCompassModel``; ``sampler``/``sampler_args`` then unused).
    datasets: OpenCompass dataset config dicts (``gsm8k_datasets()``, ``dataset_configs()``).
    work_dir: OpenCompass's work dir; must not hold outputs of ``abbr`` for these datasets.

    Returns ``{dataset abbr: metrics}`` with OpenCompass's metrics as it saved them (e.g.
    ``{"accuracy": 50.0}``; OpenCompass reports percentages).
    """
    require_opencompass()
    from mmengine.config import Config
    from opencompass.tasks import OpenICLEvalTask, OpenICLInferTask

    oc_model = as_model(model, tokenizer, sampler, sampler_args, batch_size, registry)
    work = Path(work_dir)
    names = [dataset_abbr(d) for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset abbrs must be unique, got {names}")
    for name in names:
        stale = [str(p) for p in output_paths(work, abbr, name).values() if p.exists()]
        if stale:
            raise ValueError(f"{work} already holds OpenCompass outputs for {abbr}/{name} ({stale[0]}); "
                             "OpenCompass would reuse them: use a fresh work_dir")
    work.mkdir(parents=True, exist_ok=True)
    model_cfg = dict(type=type(oc_model), abbr=abbr, path=str(getattr(oc_model, "path", abbr)),
                     batch_size=int(getattr(oc_model, "batch_size", batch_size) or batch_size),
                     max_seq_len=getattr(oc_model, "max_seq_len", None), run_cfg=dict(num_gpus=0, num_procs=1))
    cfg = Config(dict(models=[model_cfg], datasets=[list(datasets)], work_dir=str(work)))
    OpenICLInferTask(cfg).run(cur_model=oc_model, cur_model_abbr=abbr)
    OpenICLEvalTask(cfg).run()
    results = {}
    for name in names:
        path = output_paths(work, abbr, name)["results"]
        if not path.is_file():
            raise RuntimeError(f"OpenCompass wrote no results for {name} ({path}); see its log above")
        metrics = json.loads(path.read_text())
        metrics.pop("details", None)
        if "error" in metrics:
            raise RuntimeError(f"OpenCompass evaluation of {name} failed: {metrics['error']}")
        results[name] = metrics
    return results


PERCENT_METRICS = ("accuracy", "score", "acc")


def primary_metric(metrics: dict) -> tuple[str, float]:
    """The headline metric of an OpenCompass result: ``accuracy`` if present, else the first
    numeric one; (name, value as OpenCompass reports it, usually a percentage)."""
    for key in PERCENT_METRICS:
        if isinstance(metrics.get(key), (int, float)):
            return key, float(metrics[key])
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    raise ValueError(f"no numeric metric in {sorted(metrics)}")
