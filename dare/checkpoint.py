"""Hugging Face checkpoint folders: config.json + safetensors (single or sharded) + tokenizer.

Weight names are never renamed: a folder saved here loads in the original code and
vice versa.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dare.plugins import registry as default_registry
from dare.registry import ModelFamily, Registry

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


DTYPES_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file."""


def read_config(path: str | os.PathLike) -> dict:
    folder = Path(path)
    cfg = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
    if not cfg.is_file():
        raise CheckpointError(f"{cfg}: missing; a checkpoint folder needs config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg}: not valid JSON ({exc})") from exc


def family_of(config: dict, path: Path, registry: Registry | None = None) -> ModelFamily:
    registry = registry or default_registry()
    model_type = config.get("model_type")
    if model_type is None:
        raise CheckpointError(f"{path / 'config.json'}: has no 'model_type' field")
    try:
        return registry.family_for_model_type(model_type)
    except KeyError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc.args[0]}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, checking a sharded index names existing shards."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_state_dict(folder: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", registry: Registry | None = None) -> torch.nn.Module:
    """Load a checkpoint folder into the native module of the family its config names."""
    folder = Path(path)
    config = read_config(folder)
    family = family_of(config, folder, registry)
    with torch.device("meta"):
        model = family.build(config)
    state = read_state_dict(folder, dtype)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match model_type {config['model_type']!r}; "
            f"missing: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.hf_config = config
    model.family = family.name
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike, registry: Registry | None = None):
    """The family's tokenizer from local files only (no remote code, no hub)."""
    folder = Path(path)
    config = read_config(folder)
    family = family_of(config, folder, registry)
    if family.load_tokenizer is not None:
        return family.load_tokenizer(folder)
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return Qwen2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    raise CheckpointError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt")


def save_model(model: torch.nn.Module, path: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None,
               dtype: torch.dtype | None = None, max_shard_bytes: int | None = None,
               weights: bool = True) -> Path:
    """Write ``model`` as an HF checkpoint folder, atomically.

    The folder is written under a temporary name and renamed into place, so a crash
    never leaves a half-written checkpoint. Tokenizer files are copied from
    ``tokenizer_from`` (a checkpoint folder). ``max_shard_bytes`` writes a sharded
    ``model.safetensors.index.json``. ``weights=False`` writes config and tokenizer only
    (a LoRA checkpoint keeps its adapter beside them).
    """
    folder = Path(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        config = dict(model.hf_config)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        if weights:
            _write_weights(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int | None) -> None:
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(state, str(folder / "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
