"""The ``sdar`` plugin: the SDAR model family (SDAR-1.7B/4B/8B-Chat) and its block-diffusion sampler.

SDAR's logits are position-aligned: in training the logits of the noisy copy of position i are
scored against the clean token i (``labels[logits_to_keep_half]`` in the reference), and the
sampler reads the logits of the masked positions themselves, so ``shifted_logits=False``.
"""
from __future__ import annotations

import json
from pathlib import Path

from dare import hookimpl
from dare.registry import ModelFamily, Sampler, SpecialTokens
from dare_plugins.sdar.modeling import SDARForCausalLM, build, tiny_config
from dare_plugins.sdar.sampler import block_diffusion_generate
from dare_plugins.sdar.training import denoiser_logits

__all__ = ["SDARForCausalLM", "block_diffusion_generate", "tiny_config", "special_tokens", "load_tokenizer"]

ENDOFTEXT = 151643  # <|endoftext|>: SDAR's bos = eos = pad


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def special_tokens(config: dict) -> SpecialTokens:
    """Ids from config.json; it has no ``pad_token_id``, so padding uses eos (as the tokenizer)."""
    if config.get("mask_token_id") is None:
        raise ValueError("SDAR config.json has no 'mask_token_id'")
    eos = _first(config.get("eos_token_id")) or ENDOFTEXT
    bos = _first(config.get("bos_token_id")) or ENDOFTEXT
    pad = _first(config.get("pad_token_id"))
    return SpecialTokens(mask_id=int(config["mask_token_id"]), eos_id=int(eos),
                         pad_id=int(eos if pad is None else pad), bos_id=int(bos))


def load_tokenizer(folder: Path):
    """The Qwen2 byte-level BPE from vocab.json + merges.txt, without remote code.

    The upstream ``special_tokens_map.json`` lists ``<MASK>`` while ``tokenizer_config.json``
    declares ``mask_token: <|MASK|>``; the mask is pinned to config.json's ``mask_token_id``.
    """
    from transformers import Qwen2TokenizerFast

    folder = Path(folder)
    tokenizer = Qwen2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    config_file = folder / "config.json"
    mask_id = json.loads(config_file.read_text()).get("mask_token_id") if config_file.is_file() else None
    if mask_id is not None and tokenizer.mask_token_id != mask_id:
        token = tokenizer.convert_ids_to_tokens(int(mask_id))
        if token is not None:
            tokenizer.mask_token = token
    return tokenizer


@hookimpl
def register_model_families(register):
    register(ModelFamily(
        name="sdar",
        model_types=("sdar",),
        build=build,
        special_tokens=special_tokens,
        default_sampler="sdar",
        shifted_logits=False,
        attention="block_causal",
        block_size=lambda config: config["block_size"],
        lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        load_tokenizer=load_tokenizer,
        denoiser_logits=denoiser_logits,
    ))


@hookimpl
def register_samplers(register):
    register(Sampler(
        name="sdar",
        fn=block_diffusion_generate,
        families=("sdar",),
        description="SDAR block diffusion with an exact KV cache (JetAstra/SDAR block_diffusion_generate): "
                    "sequential, low_confidence_static, parallel decoding with low_confidence_dynamic "
                    "(confidence_threshold) or low_confidence_factor (factor, Fast-dLLM's rule), and "
                    "entropy_bounded (eb_threshold) remasking; left-padded batches decode in one pass per "
                    "step (packed prefill, preallocated cache, finished rows leave the batch)",
    ))
