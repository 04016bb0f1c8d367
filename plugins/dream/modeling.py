"""Dream (Dream-v0-Instruct-7B) in plain PyTorch.

A Qwen2-style transformer run with *bidirectional* attention: token embedding, N blocks of
(RMSNorm -> GQA self-attention with RoPE and Q/K/V biases -> residual, RMSNorm -> SwiGLU MLP
-> residual), a final RMSNorm and an untied ``lm_head``. Parameter names equal the Hugging Face
checkpoint's (``model.layers.N.self_attn.q_proj.weight`` ...), so a checkpoint folder loads with
``load_state_dict(strict=True)`` and a saved one loads in the original code.

Dream logits are *next-token* logits: ``logits[:, i]`` scores the token at position ``i + 1``
(it was initialised from an autoregressive model). ``forward`` returns them unshifted, as the
original does; the sampler shifts them.

Numerics follow the reference (``modeling_dream.py``, SDPA attention): RMSNorm computes in
float32 and casts back before the weight multiply; RoPE tables are computed in float32 from
``position_ids`` and cast to the activation dtype; attention is
``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=False``.

``DreamModel.forward_cached`` (with ``new_kv_cache`` / ``DreamKVCache``) runs a window of the
sequence against cached keys/values of the rest, for the Fast-dLLM-style ``dream_fast`` sampler
(``dare_plugins.dream.fast``); ``forward`` does not use it and is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dare.protocol import ModelOutput

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def tiny_config(**overrides) -> dict:
    """A complete Dream config.json dict (real field names and special ids) with tiny sizes.

    Every field of the real Dream-v0-Instruct-7B config is present; only the sizes are small.
    ``overrides`` replace or add fields, e.g. ``tiny_config(vocab_size=1000, mask_token_id=999)``.
    """
    config = {
        "_name_or_path": "Dream-org/Dream-v0-Instruct-7B",
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "mask_token_id": 151666,
        "max_position_embeddings": 256,
        "max_window_layers": 2,
        "model_type": "Dream",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 151643,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.46.2",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 152064,
    }
    config.update(overrides)
    return config


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, L, head_dim) for ``position_ids`` (B, L), computed in float32."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    device_type = position_ids.device.type if position_ids.device.type in ("cuda", "cpu") else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        freqs = position_ids.float()[..., None] * inv_freq  # (B, L, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); cos/sin: (B, L, D)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden = config["hidden_size"]
        self.num_heads = config["num_attention_heads"]
        self.num_kv_heads = config.get("num_key_value_heads") or self.num_heads
        self.head_dim = hidden // self.num_heads
        if self.head_dim * self.num_heads != hidden:
            raise ValueError(
                f"hidden_size ({hidden}) must be divisible by num_attention_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        self.dropout = float(config.get("attention_dropout", 0.0) or 0.0)
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x, cos, sin, attn_mask):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # GQA: each K/V head serves `groups` consecutive query heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if attn_mask is not None and q.device.type == "cuda":
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0, is_causal=False
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def forward_cached(self, x, cos, sin, attn_mask, cache_k, cache_v, start: int):
        """Attention of the window ``x`` (positions ``start .. start + n``) over a whole-sequence cache.

        The window's keys/values (after RoPE, one per KV head) are written into ``cache_k`` /
        ``cache_v`` (B, H_kv, N, D) at ``start:start + n`` in place; the queries then attend to all
        N cached positions (the window's fresh ones and the cached rest). With the whole sequence
        as the window and an empty cache this is exactly ``forward`` (same operations, same order).
        """
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache_k[:, :, start:start + n] = k
        cache_v[:, :, start:start + n] = v
        k, v = cache_k, cache_v
        groups = self.num_heads // self.num_kv_heads
        if n == k.shape[2]:  # the whole sequence: the same calls as `forward`
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            if attn_mask is not None and q.device.type == "cuda":
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        else:  # a window: grouped-query attention without materialising repeated K/V
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False,
                                                 enable_gqa=groups > 1)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        act = config.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; known: {', '.join(sorted(_ACTIVATIONS))}")
        self.act = _ACTIVATIONS[act]
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        eps = config.get("rms_norm_eps", 1e-6)
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps)

    def forward(self, x, cos, sin, attn_mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, cos, sin, attn_mask, cache_k, cache_v, start: int):
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, attn_mask, cache_k, cache_v, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBackbone(nn.Module):
    """The ``model.`` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, config: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"], config.get("pad_token_id"))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config["num_hidden_layers"]))
        self.norm = RMSNorm(config["hidden_size"], config.get("rms_norm_eps", 1e-6))


def attention_bias(attention_mask: torch.Tensor | str | None, batch: int, length: int) -> torch.Tensor | None:
    """Turn the mask forms the original accepts into an SDPA ``attn_mask`` (True = attend).

    None or a string (the sampler's ``"full"``) -> None; a 2D (B, L) padding mask (1 = real)
    -> a boolean key mask (B, 1, 1, L); a 4D (B, 1, L, L) mask: boolean/integer -> boolean,
    floating -> passed through as an additive bias (as SDPA treats it).
    """
    if attention_mask is None or isinstance(attention_mask, str):
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}; expected ({batch}, {length})")
        if bool(attention_mask.bool().all()):
            return None
        return attention_mask.bool()[:, None, None, :]
    if attention_mask.dim() == 4:
        if attention_mask.shape[-2:] != (length, length) or attention_mask.shape[0] not in (1, batch):
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}; expected ({batch}, 1, {length}, {length})"
            )
        return attention_mask if attention_mask.is_floating_point() else attention_mask.bool()
    raise ValueError(f"attention_mask must be 2D (B, L) or 4D (B, 1, L, L); got {attention_mask.dim()}D")


class DreamKVCache:
    """Keys and values of every layer for a whole sequence, for cached (Fast-dLLM style) decoding.

    ``keys[l]`` / ``values[l]``: (B, H_kv, N, head_dim), keys after RoPE. Built by
    ``DreamModel.forward_cached`` on the whole sequence (``DreamModel.new_kv_cache`` gives the
    empty buffers); a later ``forward_cached`` on a window overwrites the window's slots in place
    and reads every other slot as cached. Dream attention is bidirectional, so cached entries
    are only exact while the tokens they saw are unchanged (see ``dare_plugins.dream.fast``).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = list(keys), list(values)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> "DreamKVCache":
        """A cache of the given batch rows only (e.g. dropping finished rows)."""
        return DreamKVCache([k[rows] for k in self.keys], [v[rows] for v in self.values])


def _key_mask(attention_mask: torch.Tensor | None, batch: int, window: int, length: int):
    """SDPA mask for a window of ``window`` queries over ``length`` cached keys (True = attend).

    None; a 2D (B, N) padding mask over the whole cached sequence (1 = real) -> (B, 1, 1, N);
    a 4D (B, 1, W, N) mask: boolean/integer -> boolean, floating -> additive bias.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}; expected ({batch}, {length})")
        if bool(attention_mask.bool().all()):
            return None
        return attention_mask.bool()[:, None, None, :]
    if attention_mask.dim() == 4:
        if attention_mask.shape[-1] != length or attention_mask.shape[-2] not in (1, window) \
                or attention_mask.shape[0] not in (1, batch):
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}; expected ({batch}, 1, {window}, {length})"
            )
        return attention_mask if attention_mask.is_floating_point() else attention_mask.bool()
    raise ValueError(f"attention_mask must be 2D (B, N) or 4D (B, 1, W, N); got {attention_mask.dim()}D")


class DreamModel(nn.Module):
    """Dream-v0 from its raw config.json dict; ``forward`` returns ``ModelOutput(logits)``."""

    def __init__(self, config: dict):
        super().__init__()
        rope_scaling = config.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {rope_scaling!r} is not supported (only the default RoPE)")
        self.hf_config = config
        self.family = "dream"
        self.model = DreamBackbone(config)
        self.tied = bool(config.get("tie_word_embeddings", False))
        # With tied embeddings the checkpoint has no lm_head.weight (HF drops the duplicate),
        # so there is no separate parameter: the output projection reuses embed_tokens.weight.
        self.lm_head = None if self.tied else nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, **_):
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None, **kw) -> ModelOutput:
        """input_ids (B, L); attention_mask None | (B, L) padding mask | (B, 1, L, L) mask;
        position_ids (B, L) or None (= 0..L-1).

        Position ids are used as given, like upstream HF Dream, whose sampler passes its
        ``tok_idx`` (real tokens numbered from 0 in left-padded rows). DARE's copy of
        ``modeling_dream.py`` instead overwrites them with ``arange(L)``; RoPE depends only
        on relative positions and pad keys are masked, so real-token logits agree (~3e-5).
        """
        b, n = input_ids.shape
        cfg = self.hf_config
        h = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device)[None].expand(b, n)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(b, n)
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        cos, sin = rotary_tables(position_ids, head_dim, float(cfg.get("rope_theta", 10000.0)), h.dtype)
        mask = attention_bias(attention_mask, b, n)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask)
        h = self.model.norm(h)
        if self.lm_head is None:
            logits = F.linear(h, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(h)
        return ModelOutput(logits=logits)

    def new_kv_cache(self, batch: int, length: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> DreamKVCache:
        """Empty (uninitialised) KV buffers for ``batch`` sequences of ``length`` tokens."""
        cfg = self.hf_config
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg["hidden_size"] // heads
        weight = self.model.embed_tokens.weight
        dtype = dtype or weight.dtype
        device = device if device is not None else weight.device
        shape = (batch, kv_heads, length, head_dim)
        n = len(self.model.layers)
        return DreamKVCache([torch.empty(shape, dtype=dtype, device=device) for _ in range(n)],
                            [torch.empty(shape, dtype=dtype, device=device) for _ in range(n)])

    def forward_cached(self, input_ids: torch.Tensor, cache: DreamKVCache, start: int = 0, attention_mask=None,
                       position_ids: torch.Tensor | None = None,
                       logits_index: tuple[torch.Tensor, torch.Tensor] | None = None,
                       rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        """Forward of the window ``input_ids`` (B, W) = sequence positions ``start .. start + W``
        against ``cache`` (length N), updating the window's cache slots in place.

        With ``start=0`` and W = N (an empty ``new_kv_cache``) this fills the cache and its logits
        equal ``forward``'s. ``attention_mask``: None, a (B, N) padding mask over the whole
        sequence, or a 4D (B, 1, W, N) mask; ``position_ids`` (B, W): the window's positions
        (default ``start .. start + W``). ``logits_index`` = (rows, cols) into the window: only
        those hidden states go through the final norm and LM head, and ``logits`` is (len(rows), V);
        otherwise (B, W, V). ``rotary``: the window's precomputed ``rotary_tables`` (cos, sin), each
        (B, W, head_dim), instead of computing them from ``position_ids``. Inference only (no
        gradient checkpointing).
        """
        b, n = input_ids.shape
        cfg = self.hf_config
        total = cache.length
        if cache.batch_size != b:
            raise ValueError(f"cache holds {cache.batch_size} rows; input_ids has {b}")
        if start < 0 or start + n > total:
            raise ValueError(f"window [{start}, {start + n}) does not fit the cache length {total}")
        h = self.model.embed_tokens(input_ids)
        if rotary is not None:
            cos, sin = rotary
        else:
            if position_ids is None:
                position_ids = torch.arange(start, start + n, device=input_ids.device)[None].expand(b, n)
            elif position_ids.dim() == 1:
                position_ids = position_ids[None].expand(b, n)
            head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
            cos, sin = rotary_tables(position_ids, head_dim, float(cfg.get("rope_theta", 10000.0)), h.dtype)
        mask = _key_mask(attention_mask, b, n, total)
        for layer, k, v in zip(self.model.layers, cache.keys, cache.values):
            h = layer.forward_cached(h, cos, sin, mask, k, v, start)
        if logits_index is not None:
            h = h[logits_index[0], logits_index[1]]
        h = self.model.norm(h)
        if self.lm_head is None:
            logits = F.linear(h, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(h)
        return ModelOutput(logits=logits)


def build(config: dict) -> DreamModel:
    return DreamModel(config)


__all__ = ["DreamModel", "DreamKVCache", "build", "tiny_config", "attention_bias", "rotary_tables"]
