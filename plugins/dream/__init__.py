"""dream plugin: the Dream-v0 model family (Qwen2-style bidirectional dLLM) and its sampler.

Registers the ``dream`` model family (config ``model_type: "Dream"``), the ``dream``
sampler (the reference ``diffusion_generate``) and the ``dream_fast`` sampler (Fast-dLLM-style
blocks, prefix/dual KV cache and threshold/factor parallel decoding: ``fast_diffusion_generate``).
"""
from __future__ import annotations

from pathlib import Path

from dare import hookimpl
from dare.registry import ModelFamily, Sampler, SpecialTokens

from dare_plugins.dream.fast import fast_diffusion_generate
from dare_plugins.dream.modeling import DreamModel, build, tiny_config
from dare_plugins.dream.sampler import ALGORITHMS, diffusion_generate

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def special_tokens(config: dict) -> SpecialTokens:
    """Special ids from config.json (Dream: mask 151666, bos = eos = pad = 151643)."""
    missing = [k for k in ("mask_token_id", "eos_token_id") if config.get(k) is None]
    if missing:
        raise ValueError(f"Dream config.json lacks {', '.join(missing)}")
    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = config.get("pad_token_id")
    return SpecialTokens(
        mask_id=int(config["mask_token_id"]),
        eos_id=int(eos),
        pad_id=int(eos if pad is None else pad),
        bos_id=None if config.get("bos_token_id") is None else int(config["bos_token_id"]),
    )


def load_tokenizer(folder: Path):
    """Dream's tokenizer (the Qwen2 byte-level BPE) from local files, without remote code.

    tokenizer_config.json names a custom ``DreamTokenizer`` (remote code, not shipped);
    ``Qwen2TokenizerFast`` reads the same vocab.json / merges.txt / added tokens / chat template.
    """
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(str(folder), local_files_only=True)


FAMILY = ModelFamily(
    name="dream",
    model_types=("Dream",),
    build=build,
    special_tokens=special_tokens,
    default_sampler="dream",
    shifted_logits=True,
    attention="bidirectional",
    lora_target_modules=LORA_TARGET_MODULES,
    load_tokenizer=load_tokenizer,
)

SAMPLER = Sampler(
    name="dream",
    fn=diffusion_generate,
    families=("dream",),
    description=(
        "Dream's reference diffusion_generate: shifted logits, algs "
        + ", ".join(ALGORITHMS)
        + "; left-padded batches with a 4D mask and tok_idx positions"
    ),
)

FAST_SAMPLER = Sampler(
    name="dream_fast",
    fn=fast_diffusion_generate,
    families=("dream",),
    description=(
        "Fast-dLLM-style Dream decoding: semi-AR block_length, cache none/prefix/dual, threshold or "
        "factor parallel commits, stop_at_eos; block_length=max_new_tokens, cache='none', no "
        "threshold/factor equals the reference 'dream' sampler"
    ),
)


@hookimpl
def register_model_families(register):
    register(FAMILY)


@hookimpl
def register_samplers(register):
    register(SAMPLER)
    register(FAST_SAMPLER)


__all__ = [
    "DreamModel", "build", "tiny_config", "diffusion_generate", "fast_diffusion_generate", "special_tokens",
    "load_tokenizer",
    "register_model_families", "register_samplers",
]
