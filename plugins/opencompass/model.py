"""``DareOpenCompassModel``: a dare model as an OpenCompass model (generation only).

OpenCompass is optional: this module imports without it, and the class is built on first
access (``from dare_plugins.opencompass.model import DareOpenCompassModel``), which raises an
``ImportError`` saying how to install OpenCompass when it is missing.

How a prompt reaches the sampler:

* chat mode (default when the tokenizer has a chat template): OpenCompass's prompt rounds
  (``HUMAN`` / ``BOT`` / ``SYSTEM``; few-shot examples included) become chat messages
  (user / assistant; ``SYSTEM`` is sent as user, as OpenCompass's own chat models do),
  consecutive messages of one role are joined with a newline, and the chat template is
  applied by ``dare.data.encode_prompt`` (with the generation prompt);
* plain mode (no chat template, or ``chat=False``): OpenCompass flattens the rounds into
  one string, which is tokenised as is.

Prompts of a batch are left-padded with the family's pad id and sent to
``dare.generate(model, ids, attention_mask=..., sampler=..., **sampler_args)``; only the
completion is decoded, cut at the first end token (EOS, the family's mask id and the
tokenizer's end-of-turn tokens), then at the first of OpenCompass's stop strings.

The completion length is ``max_out_len`` (the dataset's ``max_out_len``) unless
``sampler_args`` names a length (``gen_length`` / ``max_new_tokens`` / ``max_length``),
which then wins: diffusion samplers cost per generated position, and some need the length
to be a multiple of their block length. Generic names map onto each sampler's own as in
``dare generate`` (``gen_length`` -> Dream's ``max_new_tokens``, ``steps`` -> SDAR's
``denoising_steps``).
"""
from __future__ import annotations

import functools

INSTALL_HINT = (
    "OpenCompass is not installed. Install it beside dare's pinned packages with\n"
    "  pip install --no-deps opencompass==0.5.4 mmengine-lite==0.11.0rc3\n"
    "  pip install -c constraints.txt -r requirements/opencompass.txt\n"
    "(from the dare checkout; see docs/opencompass.md)"
)

NOT_BY_LIKELIHOOD = (
    "DareOpenCompassModel evaluates diffusion LLMs by generation only: perplexity / "
    "log-likelihood based OpenCompass datasets (PPLInferencer, LLInferencer, ...) are not "
    "supported; use a dataset config with GenInferencer (the *_gen_* configs)."
)

LENGTH_KEYS = ("gen_length", "max_new_tokens", "max_length")
# end-of-turn tokens of the supported families' chat templates (LLaDA, Qwen-based Dream/SDAR)
END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>")
ROLES = {"HUMAN": "user", "BOT": "assistant", "SYSTEM": "system"}
# OpenCompass's default meta template for chat models (huggingface_above_v4_33._get_meta_template)
CHAT_META_TEMPLATE = dict(round=[
    dict(role="HUMAN", api_role="HUMAN"),
    dict(role="SYSTEM", api_role="HUMAN"),  # system prompts go in as user turns
    dict(role="BOT", api_role="BOT", generate=True),
])


def require_opencompass():
    """``opencompass.models.base.BaseModel``, or an ImportError that says how to install it."""
    try:
        from opencompass.models.base import BaseModel
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT}\n(import failed: {exc})") from exc
    return BaseModel


def to_messages(prompt) -> str | list[dict]:
    """An OpenCompass prompt (a string, or a PromptList of ``{"role", "prompt"}`` items) as
    chat messages; consecutive items of one role are joined with a newline."""
    if isinstance(prompt, str):
        return prompt
    messages: list[dict] = []
    for item in prompt:
        if isinstance(item, str):
            role, content = "user", item
        else:
            role, content = ROLES.get(item.get("role"), "user"), item.get("prompt") or ""
        if not content:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def cut_at_stop_strings(text: str, stops) -> str:
    for stop in stops or ():
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _json_value(value):
    """Sampler arguments as plain JSON data (generators and tensors are left out)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return repr(value)


@functools.lru_cache(maxsize=1)
def model_class():
    """Build (once) the OpenCompass model class and register it in OpenCompass's MODELS
    registry under ``DareOpenCompassModel``, so configs may use ``type="DareOpenCompassModel"``."""
    BaseModel = require_opencompass()
    import torch
    from opencompass.models.base_api import APITemplateParser
    from opencompass.registry import MODELS

    import dare
    from dare.cli import sampler_kwargs
    from dare.data import encode_prompt, left_pad
    from dare.generation import family_name
    from dare.plugins import registry as default_registry

    class DareOpenCompassModel(BaseModel):
        """A dare checkpoint (or loaded model + tokenizer) as an OpenCompass model.

        path: checkpoint folder; loaded with ``dare.load_model`` / ``dare.load_tokenizer``
            unless ``model`` (and ``tokenizer``) are given (in-process use, e.g. from a worker).
        sampler / sampler_args: a registered sampler name (None: the family's default) and its
            keyword arguments (the sampler's own names, or ``dare generate``'s generic ones).
        batch_size: prompts per ``dare.generate`` call.
        chat: apply the chat template (None: when the tokenizer has one).
        max_seq_len: for OpenCompass's prompt truncation (default: the model config's
            maximum sequence length, else 2048).
        """

        is_api = False

        def __init__(self, path: str | None = None, model=None, tokenizer=None, sampler: str | None = None,
                     sampler_args: dict | None = None, batch_size: int = 8, chat: bool | None = None,
                     max_seq_len: int | None = None, dtype: str = "float32", device: str | None = None,
                     meta_template: dict | None = None, generation_kwargs: dict | None = None, registry=None):
            if model is None:
                if path is None:
                    raise ValueError("DareOpenCompassModel needs a checkpoint path or a loaded model")
                from dare.checkpoint import DTYPES_BY_NAME

                if dtype not in DTYPES_BY_NAME:
                    raise ValueError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES_BY_NAME)}")
                model = dare.load_model(path, dtype=DTYPES_BY_NAME[dtype], device=device or "cpu",
                                        registry=registry)
            if tokenizer is None:
                if path is None:
                    raise ValueError("DareOpenCompassModel got a model without a tokenizer (pass tokenizer=)")
                tokenizer = dare.load_tokenizer(path, registry=registry)
            config = getattr(model, "hf_config", None) or {}
            if max_seq_len is None:
                max_seq_len = config.get("max_sequence_length") or config.get("max_position_embeddings") or 2048
            super().__init__(path=str(path) if path is not None else f"<in-process {type(model).__name__}>",
                             max_seq_len=int(max_seq_len), meta_template=meta_template,
                             generation_kwargs=dict(generation_kwargs or {}))
            self.model, self.tokenizer, self.batch_size = model, tokenizer, int(batch_size)
            if self.batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else bool(chat)
            if self.chat:
                self.template_parser = APITemplateParser(meta_template or CHAT_META_TEMPLATE)
            self._registry = registry
            reg = registry or default_registry()
            family = reg.families.get(family_name(model))
            entry = reg.samplers.get(sampler or family.default_sampler)
            if family.name not in entry.families:
                raise ValueError(f"sampler {entry.name!r} does not support family {family.name!r} "
                                 f"(it supports: {', '.join(entry.families)})")
            self.family, self.sampler, self._sampler_fn = family.name, entry.name, entry.fn
            self.sampler_args = dict(sampler_args or {})
            sampler_kwargs(entry.fn, self.sampler_args)  # reject unknown arguments now, not mid-run
            special = family.special_tokens(config)
            self.pad_id = special.pad_id
            vocab = tokenizer.get_vocab()
            ends = {special.eos_id, special.mask_id, getattr(tokenizer, "eos_token_id", None)}
            ends |= {vocab[t] for t in END_TOKENS if t in vocab}
            self.end_ids = {int(t) for t in ends if t is not None}
            self.last_sampler_args: dict = {}

        # --- prompts -------------------------------------------------------------------
        def prompt_ids(self, prompt) -> list[int]:
            """Token ids of one prompt (a string or an OpenCompass PromptList)."""
            if self.chat:
                return encode_prompt(self.tokenizer, to_messages(prompt))
            return self.tokenizer(str(prompt), add_special_tokens=False).input_ids

        def sampler_call_args(self, max_out_len: int | None) -> dict:
            given = dict(self.sampler_args)
            if max_out_len is not None and not any(k in given for k in LENGTH_KEYS):
                given["gen_length"] = int(max_out_len)
            return sampler_kwargs(self._sampler_fn, given)

        def completion_text(self, ids: list[int]) -> str:
            for i, tid in enumerate(ids):
                if tid in self.end_ids:
                    ids = ids[:i]
                    break
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        # --- OpenCompass API -----------------------------------------------------------
        def generate(self, inputs, max_out_len: int | None = None, stopping_criteria=(), **kwargs) -> list[str]:
            """Completions of ``inputs`` (strings or PromptLists) by the dare sampler."""
            kw = self.sampler_call_args(max_out_len)
            self.last_sampler_args = _json_value(kw)
            device = next(self.model.parameters()).device
            outputs: list[str] = []
            for start in range(0, len(inputs), self.batch_size):
                chunk = inputs[start:start + self.batch_size]
                batch = left_pad([self.prompt_ids(p) for p in chunk], self.pad_id)
                mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
                out = dare.generate(self.model, batch.input_ids.to(device), attention_mask=mask,
                                    sampler=self.sampler, registry=self._registry, **kw)
                width = batch.input_ids.shape[1]
                for row in out.sequences[:, width:].tolist():
                    outputs.append(cut_at_stop_strings(self.completion_text(row), stopping_criteria))
            return outputs

        def get_token_len(self, prompt) -> int:
            return len(self.prompt_ids(prompt))

        def encode(self, prompt) -> torch.Tensor:
            return torch.tensor([self.prompt_ids(prompt)], dtype=torch.long)

        def decode(self, tokens) -> str:
            if isinstance(tokens, torch.Tensor):
                tokens = tokens.reshape(-1).tolist()
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

        def get_ppl(self, inputs, mask_length=None):
            raise NotImplementedError(NOT_BY_LIKELIHOOD)

        def get_ppl_tokenwise(self, inputs, label=None, mask_length=None):
            raise NotImplementedError(NOT_BY_LIKELIHOOD)

        def get_loglikelihood(self, inputs, conts, mask_length=None):
            raise NotImplementedError(NOT_BY_LIKELIHOOD)

    DareOpenCompassModel.__module__ = __name__
    DareOpenCompassModel.__qualname__ = "DareOpenCompassModel"
    MODELS.register_module(name="DareOpenCompassModel", module=DareOpenCompassModel, force=True)
    return DareOpenCompassModel


def __getattr__(name: str):
    if name == "DareOpenCompassModel":
        return model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# DareOpenCompassModel is served by __getattr__ (built on first access)
__all__ = ["model_class", "require_opencompass", "to_messages", "INSTALL_HINT",
           "NOT_BY_LIKELIHOOD"]
