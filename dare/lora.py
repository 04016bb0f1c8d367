"""LoRA through peft: wrap a family model, save the adapter alone, merge into full weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float,
               target_modules: list[str] | str) -> torch.nn.Module:
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        bias="none")
    return get_peft_model(model, config)


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, trainable: bool = True) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if is_peft(model) else model


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights (checkpoint names) with every adapter's delta added; model unchanged."""
    if not is_peft(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().clone()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    out[f"{name}.weight"] += module.get_delta_weight(adapter).detach().to(out[f"{name}.weight"].dtype)
    return out


def save_adapter(model: torch.nn.Module, folder: str | Path, base_path: str) -> None:
    """peft's adapter format (adapter_config.json + adapter_model.safetensors)."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    cfg_file = folder / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(base_path)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
