"""LLaDA (LLaDA-8B-Instruct architecture) as a plain PyTorch module.

A bidirectional Llama-style transformer (the OLMo-derived ``LLaDAModelLM`` of the reference
``modeling_llada.py``), built from the raw ``config.json`` dict with the checkpoint's own
parameter names::

    model.transformer.wte.weight                         token embedding (embedding_size, d_model)
    model.transformer.blocks.N.attn_norm.weight          RMSNorm before attention
    model.transformer.blocks.N.{q,k,v}_proj.weight       attention projections (GQA: k/v smaller)
    model.transformer.blocks.N.attn_out.weight           attention output projection
    model.transformer.blocks.N.ff_norm.weight            RMSNorm before the MLP
    model.transformer.blocks.N.{ff_proj,up_proj}.weight  SwiGLU gate / up projections
    model.transformer.blocks.N.ff_out.weight             MLP down projection
    model.transformer.ln_f.weight                        final RMSNorm
    model.transformer.ff_out.weight                      LM head (absent with weight_tying)

Per block (``block_type: llama``)::

    x = x + attn_out(SDPA(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))    n = attn_norm(x)
    x = x + ff_out(act(ff_proj(m)) * up_proj(m))                            m = ff_norm(x)

Numerics follow the reference: RMSNorm normalises in float32 and casts back before the weight;
rotary tables are computed in float32 on the fly (positions 0..L-1 unless ``position_ids``) and,
with ``rope_full_precision``, q/k are rotated in float32 and cast back; attention is full
(non-causal) SDPA with the default 1/sqrt(head_dim) scale.

``LLaDAModelLM.forward_cached`` is a separate, inference-only path with a KV cache
(``LLaDACache``) for the ``llada_fast`` sampler (Fast-dLLM's prefix / dual cache); ``forward``
does not use it and is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dare.protocol import ModelOutput

# ``model.transformer.ff_out`` (the LM head) and the per-block ``ff_out`` share a suffix, so a
# peft ``target_modules`` *list* cannot name the block one without the head; this regex (peft
# accepts a string ``target_modules`` as a full-match regex) adapts every block linear layer.
LORA_TARGET_REGEX = r".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)"

_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def tiny_config(**overrides) -> dict:
    """A complete LLaDA-8B-Instruct style config.json dict with tiny sizes, for tests.

    Same fields as the real config (only sizes shrunk). ``embedding_size`` follows
    ``vocab_size`` and the special ids sit at the top of the vocabulary (mask = V-1,
    eos = pad = V-2) unless given explicitly.
    """
    vocab = int(overrides.get("vocab_size", 256))
    config = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": 32,
        "embedding_dropout": 0.0,
        "embedding_size": vocab,
        "eos_token_id": vocab - 2,
        "flash_attention": False,
        "flash_attn_varlen": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": vocab - 1,
        "max_sequence_length": 256,
        "mlp_hidden_size": 64,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "pad_token_id": vocab - 2,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "torch_dtype": "float32",
        "transformers_version": "4.51.2",
        "use_cache": False,
        "vocab_size": vocab,
        "weight_tying": False,
    }
    config.update(overrides)
    return config


def n_kv_heads(config: dict) -> int:
    """``LLaDAConfig.effective_n_kv_heads``: n_kv_heads, else 1 with multi_query_attention."""
    n_heads, n_kv, mqa = config["n_heads"], config.get("n_kv_heads"), config.get("multi_query_attention")
    if n_kv is None:
        return 1 if mqa else n_heads
    if mqa is not None and n_kv != (1 if mqa else n_heads):
        raise ValueError("LLaDA config: set either `multi_query_attention` or `n_kv_heads`, not both")
    return n_kv


def _check_supported(config: dict) -> None:
    unsupported = {
        "block_type": config.get("block_type", "llama") != "llama",
        "alibi": bool(config.get("alibi")),
        "rope": not config.get("rope", True),
        "attention_layer_norm": bool(config.get("attention_layer_norm")),
        "layer_norm_type": config.get("layer_norm_type", "rms") not in ("rms", "gemma_rms"),
        "activation_type": config.get("activation_type", "silu") not in _ACTIVATIONS,
    }
    bad = [f"{k}={config.get(k)!r}" for k, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"LLaDA config options not supported by dare's llada family: {', '.join(bad)}")
    if config["d_model"] % config["n_heads"] or config["n_heads"] % n_kv_heads(config):
        raise ValueError("LLaDA config: d_model must divide by n_heads, and n_heads by n_kv_heads")


class RMSNorm(nn.Module):
    """Reference RMSLayerNorm: normalise in float32, cast back, then scale (gemma: 1 + w)."""

    def __init__(self, config: dict):
        super().__init__()
        d = config["d_model"]
        self.eps = config.get("rms_norm_eps", 1e-5)
        self.gemma = config.get("layer_norm_type", "rms") == "gemma_rms"
        affine = config.get("layer_norm_with_affine", True)
        use_bias = config.get("bias_for_layer_norm")
        use_bias = config.get("include_bias", False) if use_bias is None else use_bias
        self.weight = nn.Parameter(torch.ones(d)) if affine else None
        self.bias = nn.Parameter(torch.zeros(d)) if affine and use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        if self.weight is None:
            return x
        x = x * (1 + self.weight) if self.gemma else self.weight * x
        return x if self.bias is None else x + self.bias


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of shape positions.shape + (head_dim,), in float32 (reference RotaryEmbedding)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.sin(), angles.cos()


def apply_rotary(t: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin, where rotate_half([a, b]) = [-b, a] over the last dim."""
    a, b = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-b, a), dim=-1) * sin


class LLaDABlock(nn.Module):
    """One ``LLaDALlamaBlock``: pre-norm bidirectional attention + gated MLP."""

    def __init__(self, config: dict):
        super().__init__()
        d, n_heads = config["d_model"], config["n_heads"]
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads(config), d // n_heads
        hidden = config.get("mlp_hidden_size") or config["mlp_ratio"] * d
        bias = bool(config.get("include_bias", False))
        qkv_bias = bias or bool(config.get("include_qkv_bias", False))
        kv_dim = self.n_kv_heads * self.head_dim
        self.rope_theta = float(config.get("rope_theta", 10000.0))
        self.rope_full_precision = config.get("rope_full_precision", True)
        self.attention_dropout = float(config.get("attention_dropout", 0.0))
        self.residual_dropout = float(config.get("residual_dropout", 0.0))
        self.act = _ACTIVATIONS[config.get("activation_type", "silu")]

        self.attn_norm = RMSNorm(config)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = RMSNorm(config)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.residual_dropout, self.training) if self.residual_dropout else x

    def project(self, x: torch.Tensor, sin: torch.Tensor,
                cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q (B, H, L, hd) and k, v (B, H_kv, L, hd) of the normalised input ``x``."""
        B, L, D = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_full_precision:
            q = apply_rotary(q.float(), sin, cos).to(q.dtype)
            k = apply_rotary(k.float(), sin, cos).to(k.dtype)
        else:
            q = apply_rotary(q, sin.to(q.dtype), cos.to(q.dtype))
            k = apply_rotary(k, sin.to(k.dtype), cos.to(k.dtype))
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               gqa_by_repeat: bool = True) -> torch.Tensor:
        """attn_out(SDPA(q, k, v)): queries (B, H, Lq, hd) over keys (B, H_kv, Lk, hd).

        GQA repeats the kv heads (the reference's way) unless ``gqa_by_repeat=False``, which
        lets SDPA broadcast them (no copy of a long cache).
        """
        B, _, Lq, _ = q.shape
        gqa = self.n_kv_heads != self.n_heads
        if gqa and gqa_by_repeat:  # GQA: kv head h serves query heads h*g .. h*g+g-1
            groups = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        p = self.attention_dropout if self.training else 0.0
        extra = {"enable_gqa": True} if gqa and not gqa_by_repeat else {}
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=False, **extra)
        return self.attn_out(att.transpose(1, 2).reshape(B, Lq, self.n_heads * self.head_dim))

    def attention(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.project(x, sin, cos)
        return self.attend(q, k, v, mask)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ff_norm(x)
        return x + self._dropout(self.ff_out(self.act(self.ff_proj(h)) * self.up_proj(h)))

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self._dropout(self.attention(self.attn_norm(x), sin, cos, mask))
        return self.mlp(x)

    def forward_cached(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, mask: torch.Tensor | None,
                       cache: "LLaDACache", layer: int, start: int | None) -> torch.Tensor:
        """The block for ``x`` at positions ``start .. start + n - 1`` against ``cache``.

        ``start=None``: ``x`` is the whole sequence; its keys / values become layer ``layer``
        of the cache (same ops as ``forward``). Otherwise they overwrite the cache there, and
        the queries attend to every cached position (masked by ``mask``).
        """
        q, k, v = self.project(self.attn_norm(x), sin, cos)
        if start is None:
            cache.keys.append(k)
            cache.values.append(v)
            att = self.attend(q, k, v, mask)
        else:
            keys, values = cache.keys[layer], cache.values[layer]
            keys[:, :, start:start + k.shape[2]] = k
            values[:, :, start:start + v.shape[2]] = v
            att = self.attend(q, keys, values, mask, gqa_by_repeat=False)
        return self.mlp(x + self._dropout(att))


class LLaDAModel(nn.Module):
    """Holds ``transformer`` (a ModuleDict) so parameter names match the checkpoint."""

    def __init__(self, config: dict):
        super().__init__()
        d = config["d_model"]
        vocab = config.get("embedding_size") or config["vocab_size"]
        layers = {
            "wte": nn.Embedding(vocab, d),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config["n_layers"])),
            "ln_f": RMSNorm(config),
        }
        if not config.get("weight_tying", False):
            layers["ff_out"] = nn.Linear(d, vocab, bias=bool(config.get("include_bias", False)))
        self.transformer = nn.ModuleDict(layers)


class LLaDAModelLM(nn.Module):
    """LLaDA mask predictor: ``forward(input_ids) -> ModelOutput(logits (B, L, embedding_size))``.

    Position i's logits score the token at position i (unshifted). ``gradient_checkpointing``
    (attribute, default False) recomputes each block in the backward pass when training.
    """

    def __init__(self, config: dict):
        super().__init__()
        _check_supported(config)
        self.hf_config = config
        self.family = "llada"
        self.gradient_checkpointing = False
        self.model = LLaDAModel(config)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    def gradient_checkpointing_enable(self, **_) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kw) -> ModelOutput:
        """Logits for ``input_ids`` (B, L).

        attention_mask: None (full bidirectional attention); (B, L) with 1 on real tokens and
            0 on padding (no query attends to a padded key, as the reference's additive bias);
            or (B|1, 1|H, L, L), boolean (True = may attend) or additive float.
        position_ids: (B, L) or (L,) rotary positions; default 0..L-1 for every row, as the
            reference (which has no such input), also for left-padded rows.
        Other keyword arguments (e.g. ``use_cache``, ``return_dict``) are accepted and ignored.
        """
        B, L = input_ids.shape
        x = self._embed(input_ids)
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)
        sin, cos = self._rotary(position_ids)
        mask = attention_bias(attention_mask, B, L, x.dtype)

        for block in self.model.transformer.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, sin, cos, mask, use_reentrant=False)
            else:
                x = block(x, sin, cos, mask)
        return ModelOutput(logits=self._head(x))

    def forward_cached(self, input_ids: torch.Tensor, cache: "LLaDACache | None" = None, start: int = 0,
                       attention_mask: torch.Tensor | None = None,
                       logits_mask: torch.Tensor | None = None) -> ModelOutput:
        """KV-cached forward (inference only; the default ``forward`` is untouched by it).

        ``cache=None`` (building): ``input_ids`` (B, L) is the whole sequence, run exactly as
        ``forward`` (positions 0..L-1, ``attention_mask`` a 2D (B, L) padding mask or None);
        every layer's rotated keys and values are kept in the returned
        ``past_key_values`` (an ``LLaDACache``).

        ``cache`` given (decoding): ``input_ids`` (B, n) are the tokens at positions
        ``start .. start + n - 1`` (rotary positions too). Their keys / values overwrite the
        cache there, in place, and their queries attend to all L cached positions with the
        cache's padding mask, i.e. positions outside the window are seen as they were when
        the cache was built (or last written). ``attention_mask`` must be None here. The
        result equals ``forward`` on the whole sequence for the window whenever the cached
        entries are still what a full forward would compute.

        logits_mask: optional (B, n) bool; the LM head then runs only on the True positions
            and ``logits`` is (N, V) in row-major order of those positions; default
            (B, n, V) for every input position.
        """
        B, n = input_ids.shape
        x = self._embed(input_ids)
        if cache is None:
            if attention_mask is not None and attention_mask.dim() != 2:
                raise ValueError("forward_cached takes a 2D (B, L) padding attention_mask or None")
            mask = attention_bias(attention_mask, B, n, x.dtype)
            cache, layer_start = LLaDACache(mask), None
            positions = torch.arange(n, device=input_ids.device)
        else:
            if attention_mask is not None:
                raise ValueError("forward_cached: the padding mask is fixed when the cache is built")
            if cache.batch_size != B or not 0 <= start <= cache.length - n:
                raise ValueError(f"forward_cached: window of {n} tokens at {start} for a batch of {B} does not "
                                 f"fit the cache ({cache.batch_size} rows, {cache.length} positions)")
            mask, layer_start = cache.mask, start
            positions = torch.arange(start, start + n, device=input_ids.device)
        sin, cos = self._rotary(positions)
        for i, block in enumerate(self.model.transformer.blocks):
            x = block.forward_cached(x, sin, cos, mask, cache, i, layer_start)
        if logits_mask is not None:
            x = x[logits_mask]
        return ModelOutput(logits=self._head(x), past_key_values=cache)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.hf_config
        x = self.model.transformer.wte(input_ids)
        if cfg.get("input_emb_norm"):
            x = x * cfg["d_model"] ** 0.5
        if cfg.get("embedding_dropout"):
            x = F.dropout(x, cfg["embedding_dropout"], self.training)
        return x

    def _rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.hf_config
        sin, cos = rotary_tables(position_ids, cfg["d_model"] // cfg["n_heads"], float(cfg.get("rope_theta", 10000.0)))
        if sin.dim() == 3:  # per-row positions (B, L): broadcast over heads
            sin, cos = sin[:, None], cos[:, None]
        return sin, cos

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (tied to ``wte`` with weight_tying)."""
        cfg = self.hf_config
        t = self.model.transformer
        x = t.ln_f(x)
        logits = F.linear(x, t.wte.weight) if "ff_out" not in t else t.ff_out(x)
        if cfg.get("scale_logits"):
            logits = logits * (1 / cfg["d_model"] ** 0.5)
        return logits


class LLaDACache:
    """Keys / values of every layer for a whole sequence, as ``forward_cached`` keeps them.

    keys, values: per layer (B, H_kv, L, head_dim), keys already rotated (rotary positions
        0..L-1). mask: the SDPA key mask (B, 1, 1, L) bool, or None (no padding).
    """

    def __init__(self, mask: torch.Tensor | None = None):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = mask

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> "LLaDACache":
        """Keep only batch ``rows`` (an index or bool tensor), in place; returns self."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        if self.mask is not None:
            self.mask = self.mask[rows]
        return self


def attention_bias(attention_mask: torch.Tensor | None, batch: int, length: int,
                   dtype: torch.dtype) -> torch.Tensor | None:
    """The SDPA ``attn_mask`` for a forward's ``attention_mask`` (see ``LLaDAModelLM.forward``).

    A 2D padding mask becomes a boolean key mask (B, 1, 1, L): valid in any dtype, unlike the
    reference's ``finfo(float32).min`` bias, and equal to it in float32. An all-ones mask means
    no mask (the reference's ``0.0 in attention_mask`` test). A row without any real token
    attends everywhere (what the reference's all-``min`` bias amounts to) instead of NaN.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, length)}")
        keep = attention_mask.bool()
        if bool(keep.all()):
            return None
        keep = keep | ~keep.any(dim=-1, keepdim=True)
        return keep[:, None, None, :]
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 2D (B, L) or 4D (B, H, L, L), got {attention_mask.dim()}D")
    if attention_mask.dtype == torch.bool:
        return attention_mask | ~attention_mask.any(dim=-1, keepdim=True)
    return attention_mask.to(dtype).clamp(min=torch.finfo(dtype).min)


def build(config: dict) -> LLaDAModelLM:
    """``ModelFamily.build``: the module for a raw LLaDA config.json dict."""
    return LLaDAModelLM(config)
