"""Native PyTorch SDAR (SDAR-1.7B/4B/8B-Chat): a Qwen3-style decoder trained for block diffusion.

Parameter names equal the Hugging Face checkpoint's, so a folder loads here and in the original
remote code alike. The math follows the reference ``modeling_sdar.py`` (JetAstra/SDAR, DARE):

* RMSNorm in float32, ``x * rsqrt(mean(x^2) + eps) * w``, cast back to the input dtype (the
  reference calls flash-attn's ``rms_norm_fn``, which computes exactly this);
* per-head RMSNorm on queries and keys (``q_norm``/``k_norm``) *before* RoPE;
* RoPE tables in float32 computed in ``forward``, then cast to the activation dtype;
* GQA attention with scale ``head_dim ** -0.5`` (``head_dim`` comes from the config and need
  not equal ``hidden_size / num_attention_heads``);
* SwiGLU MLP; logits are position-aligned (position i scores token i, no shift).

Attention masks (boolean, True = may attend; other dtypes are converted with ``.bool()`` as the
reference does, so a 0/1 float mask works and an additive 0/-inf mask does NOT):

* ``(Lq, Lk)``, ``(B or 1, Lq, Lk)`` or ``(B or 1, 1, Lq, Lk)`` where ``Lk`` = cached length + Lq;
* an all-True mask is the decoding case (a block attending to the whole KV cache and itself);
* ``None`` means the block-causal mask of the config's ``block_size`` over cached + current
  positions. The reference fails on ``None`` in eval mode (``torch.all(None)``); the block-causal
  default is what its sampler always passes, so a plain ``model(input_ids)`` scores a clean
  sequence the way SDAR sees it at inference;
* a flex-attention ``BlockMask`` (GPU) is passed to ``flex_attention`` unchanged.

KV cache (:class:`SDARCache`): keys/values of committed tokens, per layer. As in the reference,
``store_kv=True`` appends the current tokens' keys/values to the cache (the prefill and a finished
block), while ``store_kv=False`` only reads it (denoising steps of the current block).
:class:`SDARStaticCache` holds the same keys/values in buffers preallocated once (no ``torch.cat``
per block), addressable per row, so that rows of a batch can decode different blocks in one
forward (the batched sampler).

``logits_to_keep`` (as in Hugging Face models) limits the output projection to the positions whose
logits are read: the sampler's prefill and KV-store forwards need none, a greedy denoising step
only the masked positions.

Training uses the same forward on the concatenated ``[noisy | clean]`` sequence of length 2L with
:func:`block_diffusion_training_mask` (see :func:`build_training_inputs`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dare.protocol import ModelOutput

__all__ = [
    "SDARForCausalLM", "SDARCache", "SDARStaticCache", "tiny_config", "block_causal_mask", "block_diff_mask",
    "block_diffusion_training_mask", "build_training_inputs",
]

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def tiny_config(**overrides) -> dict:
    """A complete SDAR config.json dict (every field of SDAR-1.7B-Chat's) with tiny sizes."""
    config = {
        "architectures": ["SDARForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_implementation": "flex_attention",
        "bos_token_id": 151643,
        "debug": False,
        "eos_token_id": 151643,
        "block_size": 4,
        "mask_token_id": 151669,
        "ep_size": 1,
        "fuse_cross_entropy": True,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "max_window_layers": 2,
        "micro_forward": False,
        "model_type": "sdar",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "skip_checkpoint": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.52.4",
        "use_cache": False,
        "use_deepep": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    config.update(overrides)
    return config


# --- masks -----------------------------------------------------------------------------------


def block_causal_mask(length: int, block_size: int, device: torch.device | str | None = None,
                      key_length: int | None = None) -> torch.Tensor:
    """(length, key_length) bool: query i may attend key j iff ``j // block_size <= i // block_size``.

    The queries are the *last* ``length`` of ``key_length`` positions (default: the same
    positions), which is the mask a block sees when earlier positions sit in a KV cache. This is
    the reference sampler's ``tril(ones(nb, nb)).repeat_interleave(bs, 0).repeat_interleave(bs, 1)``
    sliced to the sequence: attention is bidirectional inside a block and causal across blocks.
    """
    key_length = length if key_length is None else key_length
    q = torch.arange(key_length - length, key_length, device=device)
    k = torch.arange(key_length, device=device)
    return (k[None, :] // block_size) <= (q[:, None] // block_size)


def block_diff_mask(b, h, q_idx, kv_idx, block_size=None, n=None):
    """The reference's training mask over ``[x_t (n tokens) | x_0 (n tokens)]``, elementwise.

    Same signature as the reference (usable as a flex-attention ``mask_mod`` through
    ``functools.partial``). Query/key ``idx < n`` are noisy tokens, ``>= n`` clean ones; each side
    has its own block index. A query may attend a key iff

    * block diagonal: same block and same side (noisy<->noisy or clean<->clean);
    * offset block-causal: a noisy query attends clean keys of strictly earlier blocks;
    * block-causal: a clean query attends clean keys of its own and earlier blocks.

    Clean tokens never attend noisy ones.
    """
    x0_q = q_idx >= n
    x0_kv = kv_idx >= n
    block_q = torch.where(x0_q, (q_idx - n) // block_size, q_idx // block_size)
    block_kv = torch.where(x0_kv, (kv_idx - n) // block_size, kv_idx // block_size)
    diagonal = (block_q == block_kv) & (x0_q == x0_kv)
    offset_causal = (block_q > block_kv) & x0_kv & ~x0_q
    causal = (block_q >= block_kv) & x0_kv & x0_q
    return diagonal | offset_causal | causal


def block_diffusion_training_mask(lengths: int | Sequence[int], block_size: int,
                                  device: torch.device | str | None = None) -> torch.Tensor:
    """Bool training mask for one row: ``(2n, 2n)`` for one sequence of ``n`` tokens.

    With a list of lengths (packed samples) it is the reference's ``block_attn_mask`` row:
    the block-diagonal stack of each sample's mask over the layout
    ``[noisy_1, clean_1, noisy_2, clean_2, ...]``.
    """
    if isinstance(lengths, int):
        lengths = [lengths]
    masks = []
    for n in lengths:
        idx = torch.arange(2 * n, device=device)
        masks.append(block_diff_mask(None, None, idx[:, None], idx[None, :], block_size, n))
    return torch.block_diag(*masks)


def build_training_inputs(input_ids: torch.Tensor, noisy_input_ids: torch.Tensor, block_size: int,
                          attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None):
    """Inputs for one block-diffusion training forward of right-padded rows.

    input_ids, noisy_input_ids: (B, L) clean and noised tokens; attention_mask: (B, L), 1 on real
    tokens (right padding 0). Returns ``(ids (B, 2L), position_ids (B, 2L), mask (B, 1, 2L, 2L))``
    for ``model(ids, attention_mask=mask, position_ids=position_ids)``; the logits of the noisy
    half, ``logits[:, :L]``, score the clean tokens at the same positions (no shift).

    Equivalent, on real tokens, to the reference (which makes the padding tail a separate packed
    sample): padding keys are excluded; padding queries attend only themselves (never NaN).
    """
    bsz, length = input_ids.shape
    device = input_ids.device
    if position_ids is None:
        position_ids = torch.arange(length, device=device).expand(bsz, length)
    ids = torch.cat([noisy_input_ids, input_ids], dim=1)
    pos = torch.cat([position_ids, position_ids], dim=1)
    mask = block_diffusion_training_mask(length, block_size, device)[None, None]
    mask = mask.expand(bsz, 1, 2 * length, 2 * length)
    if attention_mask is not None:
        valid = attention_mask.bool().repeat(1, 2)
        eye = torch.eye(2 * length, dtype=torch.bool, device=device)
        mask = (mask & valid[:, None, None, :]) | eye
    return ids, pos, mask


# --- KV cache --------------------------------------------------------------------------------


class SDARCache:
    """Exact KV cache of committed positions for block decoding.

    ``keys[l]`` / ``values[l]``: (B, num_key_value_heads, T, head_dim) of layer ``l``, keys after
    ``k_norm`` and RoPE, for the first T positions of every row. Forward with ``store_kv=True``
    appends the current positions (prefill, or a finished block); ``store_kv=False`` attends over
    cache + current positions without storing (a denoising step). Nothing is ever overwritten, so
    a block's cache entries are exactly what a full-sequence block-causal forward would compute.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor, store: bool):
        """Keys/values to attend to for ``layer``: cached ones followed by the current ones."""
        if layer < len(self.keys):
            key = torch.cat([self.keys[layer], key], dim=-2)
            value = torch.cat([self.values[layer], value], dim=-2)
            if store:
                self.keys[layer], self.values[layer] = key, value
        elif store:
            if layer != len(self.keys):
                raise ValueError(f"SDARCache: layer {layer} stored before layer {len(self.keys)}")
            self.keys.append(key)
            self.values.append(value)
        return key, value


class SDARStaticCache:
    """:class:`SDARCache` in buffers preallocated once, addressable per row, for batched decoding.

    ``keys[l]`` / ``values[l]``: (batch_size, num_key_value_heads, max_length, head_dim) buffers,
    zero-filled at the first forward (zeros keep never-written, masked slots finite).

    * Appending (``columns`` None), as :class:`SDARCache`: a forward writes its keys/values right
      after the ``get_seq_length()`` committed positions and attends to ``[0, committed + L)``;
      ``store_kv=True`` commits them, ``store_kv=False`` leaves them as scratch that the next
      forward overwrites. No ``torch.cat`` of the whole cache per block.
    * Per-row columns (``columns`` (B, L) and ``span`` set by the caller for one forward): row b's
      current keys/values are written to buffer columns ``columns[b]`` and every row attends to
      columns ``[0, span)`` (the caller's attention mask says which of them each row may see). So
      rows may decode different blocks in one forward; which written columns are committed is the
      caller's bookkeeping (``store_kv`` is not used).

    Committed entries are never rewritten, so they are exactly those a full-sequence block-causal
    forward computes. :meth:`keep` drops rows for good (finished sequences); :meth:`load` fills
    slots from another cache (a packed prefill).
    """

    def __init__(self, batch_size: int, max_length: int):
        self.batch_size = batch_size
        self.max_length = max_length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []      # committed length per layer when appending
        self.columns: torch.Tensor | None = None
        self.span: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self) -> int:
        """Keys before the current tokens: the committed length, or ``span - L`` in column mode."""
        if self.columns is not None:
            return self.span - self.columns.shape[-1]
        return self.lengths[0] if self.lengths else 0

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only buffer ``rows`` (in that order); the others are freed."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.batch_size = int(rows.numel())

    def _allocate(self, key: torch.Tensor, value: torch.Tensor) -> None:
        shape = (self.batch_size, key.shape[1], self.max_length, key.shape[-1])
        self.keys.append(key.new_zeros(shape))
        self.values.append(value.new_zeros(shape))
        self.lengths.append(0)

    def load(self, source: SDARCache, src_rows: torch.Tensor, src_cols: torch.Tensor, rows: torch.Tensor,
             cols: torch.Tensor, length: int) -> None:
        """Copy ``source``'s entries ``[src_rows, :, src_cols]`` to ``[rows, :, cols]`` of every layer
        and set the committed length (a packed prefill scattered to each row's own columns)."""
        for layer, (key, value) in enumerate(zip(source.keys, source.values)):
            if layer == len(self.keys):
                self._allocate(key, value)
            self.keys[layer][rows, :, cols] = key[src_rows, :, src_cols]
            self.values[layer][rows, :, cols] = value[src_rows, :, src_cols]
            self.lengths[layer] = length

    def attend(self, layer: int, key: torch.Tensor, value: torch.Tensor, store: bool):
        """Keys/values for ``layer``, the current ones included (see the class docstring)."""
        if layer == len(self.keys):
            self._allocate(key, value)
        elif layer > len(self.keys):
            raise ValueError(f"SDARStaticCache: layer {layer} before layer {len(self.keys)}")
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if key.shape[0] != buf_k.shape[0]:
            raise ValueError(f"SDARStaticCache: a batch of {key.shape[0]} rows for a cache of {buf_k.shape[0]}")
        if self.columns is not None:
            if self.span > self.max_length:
                raise ValueError(f"SDARStaticCache: span {self.span} exceeds max_length {self.max_length}")
            rows = torch.arange(key.shape[0], device=key.device)[:, None]
            buf_k[rows, :, self.columns] = key.transpose(1, 2)
            buf_v[rows, :, self.columns] = value.transpose(1, 2)
            return buf_k[:, :, :self.span], buf_v[:, :, :self.span]
        past, length = self.lengths[layer], key.shape[-2]
        if past + length > self.max_length:
            raise ValueError(f"SDARStaticCache: {past} cached + {length} new positions exceed "
                             f"max_length {self.max_length}")
        buf_k[:, :, past:past + length] = key
        buf_v[:, :, past:past + length] = value
        if store:
            self.lengths[layer] = past + length
        return buf_k[:, :, :past + length], buf_v[:, :, :past + length]


# --- modules ---------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin: (B, L, head_dim) in ``dtype``, computed in float32 (default RoPE)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class SDARAttention(nn.Module):
    def __init__(self, config: dict, layer_idx: int):
        super().__init__()
        hidden = config["hidden_size"]
        self.layer_idx = layer_idx
        self.num_heads = config["num_attention_heads"]
        self.num_kv_heads = config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or hidden // self.num_heads
        self.scaling = self.head_dim ** -0.5
        bias = bool(config.get("attention_bias", False))
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config["rms_norm_eps"])
        self.k_norm = RMSNorm(self.head_dim, config["rms_norm_eps"])

    def forward(self, x, cos, sin, mask, cache: SDARCache | None, store_kv: bool):
        bsz, length, _ = x.shape
        shape = (bsz, length, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.attend(self.layer_idx, k, v, store_kv)
        if mask is not None and not isinstance(mask, torch.Tensor):  # flex-attention BlockMask
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=mask, scale=self.scaling, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, length, -1))


class SDARMLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        act = config.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"SDAR config: hidden_act {act!r} is not supported "
                             f"(supported: {', '.join(sorted(_ACTIVATIONS))})")
        self.act = _ACTIVATIONS[act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SDARDecoderLayer(nn.Module):
    def __init__(self, config: dict, layer_idx: int):
        super().__init__()
        self.self_attn = SDARAttention(config, layer_idx)
        self.mlp = SDARMLP(config)
        self.input_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])

    def forward(self, x, cos, sin, mask, cache=None, store_kv=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, store_kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class SDARModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"],
                                         config.get("pad_token_id"))
        self.layers = nn.ModuleList(SDARDecoderLayer(config, i) for i in range(config["num_hidden_layers"]))
        self.norm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])


class SDARForCausalLM(nn.Module):
    """SDAR from the raw config.json dict; see the module docstring for masks and the cache.

    With ``tie_word_embeddings`` the output projection reuses ``model.embed_tokens.weight`` and no
    ``lm_head.weight`` parameter exists (tied checkpoints do not store it).
    """

    def __init__(self, config: dict):
        super().__init__()
        rope_scaling = config.get("rope_scaling")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"SDAR config: rope_scaling {rope_scaling!r} is not supported (only default RoPE)")
        self.hf_config = config
        self.family = "sdar"
        self.gradient_checkpointing = False
        self.model = SDARModel(config)
        self.tied = bool(config.get("tie_word_embeddings", False))
        if not self.tied:
            self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def gradient_checkpointing_enable(self, **_):
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def _mask(self, attention_mask, bsz: int, length: int, past: int, device):
        key_length = past + length
        if attention_mask is None:
            return block_causal_mask(length, self.hf_config["block_size"], device, key_length)[None, None]
        if not isinstance(attention_mask, torch.Tensor):
            return attention_mask  # flex-attention BlockMask
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()
        if mask.dim() == 2:
            mask = mask[None, None]
        elif mask.dim() == 3:
            mask = mask[:, None]
        if mask.dim() != 4 or mask.shape[-2:] != (length, key_length) or mask.shape[0] not in (1, bsz) \
                or mask.shape[1] != 1:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not fit {length} queries and "
                f"{key_length} keys ({past} cached): pass (Lq, Lk), (B, Lq, Lk) or (B, 1, Lq, Lk), "
                "True = may attend"
            )
        if bool(mask.all()):
            return None  # decoding: attend to everything (the reference's flash-attn path)
        return mask

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids: torch.Tensor | None = None,
                past_key_values: SDARCache | SDARStaticCache | None = None, use_cache: bool = False,
                store_kv: bool = False, logits_to_keep: int | torch.Tensor = 0, **kw) -> ModelOutput:
        """Logits (B, L, V) in the parameter dtype; ``past_key_values`` is the cache when used.

        position_ids default to ``past + arange(L)``. ``use_cache`` (or ``store_kv``) without a
        cache creates a new :class:`SDARCache`; keys/values are appended only with ``store_kv``.
        ``logits_to_keep``: ``0`` (default) all positions; an int n > 0 the last n positions; a 1D
        index tensor those positions, (B, len(index), V) (an empty one: no output projection at
        all); a (B, L) bool tensor the True positions only, flattened in row-major order: (N, V).
        """
        # HF-style flags that do not change the result are accepted; anything else is an error.
        bad = [k for k, v in kw.items()
               if not (k == "return_dict" or (k in ("output_attentions", "output_hidden_states",
                                                    "cache_position") and (v is None or v is False)))]
        if bad:
            raise TypeError(f"SDARForCausalLM.forward got unsupported argument(s): {', '.join(sorted(bad))}")
        cache = past_key_values
        if cache is None and (use_cache or store_kv):
            cache = SDARCache()
        bsz, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=device)[None].expand(bsz, length)
        elif position_ids.dim() == 1:
            position_ids = position_ids[None].expand(bsz, length)
        mask = self._mask(attention_mask, bsz, length, past, device)

        h = self.model.embed_tokens(input_ids)
        head_dim = self.model.layers[0].self_attn.head_dim if len(self.model.layers) else 1
        cos, sin = rope_tables(position_ids, head_dim, float(self.hf_config.get("rope_theta", 10000.0)), h.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, cache, store_kv)
        h = self.model.norm(h)
        if isinstance(logits_to_keep, torch.Tensor):
            h = h[logits_to_keep] if logits_to_keep.dtype == torch.bool else h[:, logits_to_keep]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, self.model.embed_tokens.weight) if self.tied else self.lm_head(h)
        return ModelOutput(logits=logits, past_key_values=cache)


def build(config: dict) -> SDARForCausalLM:
    """``ModelFamily.build``: the module from a config.json dict (no tensors besides parameters)."""
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "block_size")
               if k not in config]
    if missing:
        raise ValueError(f"SDAR config.json lacks required field(s): {', '.join(missing)}")
    return SDARForCausalLM(config)

