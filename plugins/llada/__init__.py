"""llada plugin: the LLaDA model family (LLaDA-8B-Instruct architecture) and its sampler.

Registers the ``llada`` model family (config ``model_type: "llada"``), the ``llada``
sampler (ML-GSAI/LLaDA's reference ``generate``: semi-autoregressive blocks, low-confidence
or random remasking, Gumbel temperature, classifier-free guidance, left-padded batches) and
the ``llada_fast`` sampler (Fast-dLLM's prefix / dual KV cache and threshold / factor
parallel decoding, ``plugins/llada/fast.py``).
"""
from __future__ import annotations

from dare import hookimpl
from dare.registry import ModelFamily, Sampler, SpecialTokens

from dare_plugins.llada import fast
from dare_plugins.llada.modeling import LORA_TARGET_REGEX, LLaDACache, LLaDAModelLM, build, tiny_config
from dare_plugins.llada.sampler import REMASKING, generate

# peft matches list entries as name suffixes, and "ff_out" would also match the LM head
# `model.transformer.ff_out`, so the per-block MLP down projection is left out of the default
# list; use LORA_TARGET_REGEX (a full-match regex string for peft) to adapt it as well.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj")


def special_tokens(config: dict) -> SpecialTokens:
    """Special ids from config.json (LLaDA-8B-Instruct: mask 126336, eos = pad = 126081).

    config.json has no ``bos_token_id`` (the tokenizer's ``<|startoftext|>`` is 126080), so
    ``bos_id`` is None unless the config names one.
    """
    missing = [k for k in ("mask_token_id", "eos_token_id") if config.get(k) is None]
    if missing:
        raise ValueError(f"LLaDA config.json lacks {', '.join(missing)}")
    eos, pad, bos = config["eos_token_id"], config.get("pad_token_id"), config.get("bos_token_id")
    return SpecialTokens(
        mask_id=int(config["mask_token_id"]),
        eos_id=int(eos),
        pad_id=int(eos if pad is None else pad),
        bos_id=None if bos is None else int(bos),
    )


FAMILY = ModelFamily(
    name="llada",
    model_types=("llada",),
    build=build,
    special_tokens=special_tokens,
    default_sampler="llada",
    shifted_logits=False,
    attention="bidirectional",
    lora_target_modules=LORA_TARGET_MODULES,
)

SAMPLER = Sampler(
    name="llada",
    fn=generate,
    families=("llada",),
    description=(
        "LLaDA's reference generate: semi-autoregressive blocks, remasking "
        + " / ".join(REMASKING)
        + ", Gumbel temperature, classifier-free guidance, left-padded batches"
    ),
)

FAST_SAMPLER = Sampler(
    name="llada_fast",
    fn=fast.generate,
    families=("llada",),
    description=(
        "Fast-dLLM-style LLaDA decoding: cache = none / prefix / dual (KV cache rebuilt per block), "
        "threshold or factor parallel unmasking, optional stop_at_eos; cache='none' without "
        "threshold / factor at temperature 0 equals the llada sampler"
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
    "LLaDAModelLM", "LLaDACache", "build", "tiny_config", "generate", "fast", "special_tokens",
    "LORA_TARGET_MODULES", "LORA_TARGET_REGEX", "register_model_families", "register_samplers",
]
