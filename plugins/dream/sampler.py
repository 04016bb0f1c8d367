"""Dream's reference diffusion sampler (``DreamGenerationMixin.diffusion_generate`` / ``_sample``).

The prompt is right-padded with ``max_new_tokens`` mask tokens; every step runs the model on
the whole sequence, shifts the logits right by one (Dream predicts the *next* token, so the
prediction for position i is the raw logit row i-1; position 0 reuses its own row), and commits
some masked positions:

* ``origin``: each masked position is committed independently with probability
  ``1 - s/t`` (``t, s`` consecutive values of ``linspace(1, eps, steps + 1)``; all remaining at
  the last step), drawing a uniform number per masked position every step, also when greedy.
* ``maskgit_plus`` / ``topk_margin`` / ``entropy``: every masked position gets a token and a
  confidence (top-1 probability / top-1 minus top-2 probability / negative entropy); the
  ``int(n_masked * (1 - s/t))`` most confident are committed (all remaining at the last step;
  ``n_masked`` is the batch mean). With ``alg_temp > 0`` the positions are drawn without
  replacement from ``softmax(confidence / alg_temp)`` instead of taken by top-k.
* ``confidence_threshold`` (DARE's addition, batch size 1): ``max_new_tokens / steps`` positions
  are scheduled per step; the most confident is always committed, the other scheduled ones only
  when their confidence reaches ``threshold``, otherwise they are carried to the next step; at
  the last step, a below-threshold token adds one more step (with nothing newly scheduled).

Randomness: with ``generator=None`` every draw (``origin``'s uniforms, categorical sampling at
``temperature > 0``, ``alg_temp`` position sampling) comes from the global torch RNG in the
reference's order, so a ``torch.manual_seed`` reproduces the reference run. Passing a
``torch.Generator`` (on the device of ``prompt_ids``) makes the same draws from it instead.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dare.protocol import GenerationOutput

ALGORITHMS = ("origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold")
DEFAULT_MAX_LENGTH = 20  # DreamGenerationConfig's max_length when neither length is given
DEFAULT_THRESHOLD = 0.9  # the reference's `kwargs.get("threshold", 0.9)`


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (nucleus)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses top_p
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (ties with the k-th are kept)."""
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, margin_confidence: bool = False, neg_entropy: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) per row of ``logits`` (N, V), as the reference ``sample_tokens``.

    top-p / top-k filtering applies also when greedy (it changes the confidences, not the
    argmax). Confidence is the probability of the chosen token, or top1 - top2 probability
    (``margin_confidence``), or sum p log p (``neg_entropy``).
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            # exactly torch.distributions.Categorical(probs).sample(), with an optional generator
            dist = torch.distributions.Categorical(probs=probs)
            x0 = torch.multinomial(dist.probs.reshape(-1, probs.shape[-1]), 1, True, generator=generator)
            x0 = x0.T.reshape(dist.batch_shape)
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except (ValueError, RuntimeError):  # the reference falls back to argmax on any failure
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        # the reference sorts the whole vocabulary; the two largest values are the same numbers
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _hf_config(model: torch.nn.Module) -> dict:
    cfg = getattr(model, "hf_config", None)
    if cfg is None:  # a peft wrapper
        cfg = getattr(getattr(getattr(model, "base_model", None), "model", None), "hf_config", None)
    if cfg is None:
        raise ValueError("model has no 'hf_config'; load it with dare.load_model")
    return cfg


def _resolve_length(prompt_len: int, max_new_tokens, max_length, max_pos) -> int:
    """Total length as the reference's ``_prepare_generated_length`` computes it."""
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        total = prompt_len + max_new_tokens  # takes precedence over max_length, as in the reference
    elif max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ValueError(f"max_length must be an int, got {max_length!r}")
        total = max_length
        if total <= prompt_len:
            raise ValueError(
                f"max_length ({max_length}) must exceed the prompt length ({prompt_len}); "
                "increase max_length or set max_new_tokens"
            )
    else:
        total = prompt_len + DEFAULT_MAX_LENGTH
        if max_pos is not None:
            total = min(total, max_pos)
        if total <= prompt_len:
            raise ValueError(
                f"prompt length {prompt_len} leaves no room under max_position_embeddings ({max_pos}); "
                "set max_new_tokens"
            )
    if max_pos is not None and total > max_pos:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {total - prompt_len} = {total} exceeds the "
            f"model's max_position_embeddings ({max_pos})"
        )
    return total


def prepare_inputs(model, prompt_ids, attention_mask, mask_token_id, max_new_tokens, max_length):
    """Checked inputs of a Dream sampler: (config, mask id, prompt_ids (B, P), attention_mask
    or None, number of tokens to generate)."""
    config = _hf_config(model)
    if mask_token_id is None:
        mask_token_id = config.get("mask_token_id")
        if mask_token_id is None:
            raise ValueError("mask_token_id: not given and the model config has no 'mask_token_id'")
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty (B, P) tensor, got shape {tuple(prompt_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}"
            )
    total = _resolve_length(prompt_ids.shape[1], max_new_tokens, max_length, config.get("max_position_embeddings"))
    return config, mask_token_id, prompt_ids, attention_mask, total - prompt_ids.shape[1]


def _validate(alg, steps, eps, temperature, top_p, top_k, alg_temp):
    if alg not in ALGORITHMS:
        raise ValueError(f"alg must be one of {', '.join(ALGORITHMS)}; got {alg!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0.0 <= float(eps) <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps!r}")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if alg_temp is not None and alg_temp < 0:
        raise ValueError(f"alg_temp must be >= 0, got {alg_temp!r}")


@torch.no_grad()
def diffusion_generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    steps: int = 512,
    eps: float = 1e-3,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    alg: str = "origin",
    alg_temp: float | None = None,
    threshold: float | None = None,
    generator: torch.Generator | None = None,
    mask_token_id: int | None = None,
    output_history: bool = False,
    return_dict_in_generate: bool = False,
    generation_tokens_hook_func: Callable | None = None,
    generation_logits_hook_func: Callable | None = None,
) -> GenerationOutput:
    """Dream's ``diffusion_generate`` on a native Dream model.

    prompt_ids: (B, P) int64, left-padded when rows differ in length; attention_mask: (B, P),
    1 on real tokens (needed for padded batches). Lengths: ``max_new_tokens`` wins over
    ``max_length`` (total length); with neither, 20 new tokens (capped by
    max_position_embeddings) as the reference's default generation config. ``mask_token_id``
    defaults to the model config's. ``threshold`` (default 0.9) is used by
    ``alg='confidence_threshold'`` only (ignored otherwise, as in the reference). ``output_history`` / ``return_dict_in_generate`` are
    accepted for call compatibility and ignored (a ``GenerationOutput`` is always returned).
    The hook functions are the reference's: ``tokens_hook(step, x, logits) -> x`` (called once
    with ``step=None`` before the loop) and ``logits_hook(step, x, logits) -> logits``.

    Returns ``GenerationOutput(sequences (B, P + G), unmask_step (B, G), nfe)``; no early stop
    at eos (the reference generates every position).
    """
    del output_history, return_dict_in_generate
    _validate(alg, steps, eps, temperature, top_p, top_k, alg_temp)
    config, mask_token_id, prompt_ids, attention_mask, gen_len = prepare_inputs(
        model, prompt_ids, attention_mask, mask_token_id, max_new_tokens, max_length)
    batch, prompt_len = prompt_ids.shape
    full_logits = generation_tokens_hook_func is not None or generation_logits_hook_func is not None
    tokens_hook = generation_tokens_hook_func or (lambda step, x, logits: x)
    logits_hook = generation_logits_hook_func or (lambda step, x, logits: logits)
    device = prompt_ids.device

    x = F.pad(prompt_ids, (0, gen_len), value=mask_token_id)
    if attention_mask is not None and bool((attention_mask == 0).any()):
        mask2d = F.pad(attention_mask, (0, gen_len), value=1)  # generated slots are real tokens
        tok_idx = mask2d.long().cumsum(-1) - 1  # real tokens numbered from 0 in every row
        tok_idx.masked_fill_(mask2d == 0, 1)
        keep = mask2d.bool()
        attn = keep[:, None, None, :] & keep[:, None, :, None]  # (B, 1, N, N): real query x real key
    else:
        tok_idx, attn = None, None  # the reference's attention_mask="full"

    timesteps = torch.linspace(1, eps, steps + 1, device=device)
    unmask_step = torch.full((batch, gen_len), -1, dtype=torch.long, device=device)
    x = tokens_hook(None, x, None)

    if alg == "confidence_threshold":
        if batch != 1:
            raise ValueError(f"alg='confidence_threshold' needs batch size 1 (prompt_ids has {batch} rows)")
        n_masked = int((x == mask_token_id).sum())
        if n_masked % steps:
            raise ValueError(
                f"alg='confidence_threshold' needs the number of masked positions ({n_masked}) "
                f"divisible by steps ({steps})"
            )
        per_step = n_masked // steps
        carried = 0
        if threshold is None:
            threshold = DEFAULT_THRESHOLD

    nfe, i = 0, 0
    while i < steps:
        mask_index = x == mask_token_id
        logits = model(x, attention_mask=attn, position_ids=tok_idx).logits
        nfe += 1
        if full_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # row i now predicts token i
            logits = logits_hook(i, x, logits)
            mask_logits = logits[mask_index]
        else:  # the same rows, without copying the whole shifted (B, N, V) tensor
            rows, cols = mask_index.nonzero(as_tuple=True)
            mask_logits = logits[rows, (cols - 1).clamp(min=0)]

        if alg == "origin":
            t, s = timesteps[i], timesteps[i + 1]
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.full_like(x[mask_index], mask_token_id)
            transfer = torch.rand(x0.shape, device=device, generator=generator) < p_transfer
            _, x0[transfer] = sample_tokens(mask_logits[transfer], temperature, top_p, top_k, generator=generator)
            x[mask_index] = x0.clone()
        elif alg == "confidence_threshold":
            confidence, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, generator=generator)
            proposal = torch.full_like(x, mask_token_id)
            proposal[mask_index] = x0
            full_conf = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_conf[mask_index] = confidence
            n_now = per_step + carried
            carried = 0
            top_conf, top_idx = torch.topk(full_conf, n_now)
            transfer = torch.zeros_like(x, dtype=torch.bool)
            transfer[0, top_idx[0]] = True
            low = top_conf[0, 1:] < threshold  # the most confident one is always committed
            n_low = int(low.sum())
            if n_low:
                transfer[0, top_idx[0, 1:][low]] = False
                carried += n_low
                if i >= steps - 1:  # last step: one extra step for the carried tokens
                    per_step = 0
                    steps += 1
            x[transfer] = proposal[transfer]
        else:
            t, s = timesteps[i], timesteps[i + 1]
            confidence, x0 = sample_tokens(
                mask_logits, temperature, top_p, top_k, margin_confidence=alg == "topk_margin",
                neg_entropy=alg == "entropy", generator=generator,
            )
            num_mask = mask_index.sum() / mask_index.shape[0]  # batch mean, float as in the reference
            n_now = int(num_mask * (1 - s / t)) if i < steps - 1 else int(num_mask)
            full_conf = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_conf[mask_index] = confidence
            if n_now > 0:
                if alg_temp is None or alg_temp == 0:
                    _, idx = torch.topk(full_conf, n_now)
                else:
                    weights = F.softmax(full_conf / alg_temp, dim=-1)
                    idx = torch.multinomial(weights, num_samples=n_now, generator=generator)
                proposal = torch.full_like(x, mask_token_id)
                proposal[mask_index] = x0
                rows = torch.arange(batch, device=device)[:, None].expand_as(idx)
                x[rows, idx] = proposal[rows, idx]

        x = tokens_hook(i, x, logits)
        newly = mask_index[:, prompt_len:] & (x[:, prompt_len:] != mask_token_id)
        unmask_step[newly] = i
        i += 1

    return GenerationOutput(sequences=x, unmask_step=unmask_step, nfe=nfe)


__all__ = ["diffusion_generate", "sample_tokens", "top_p_logits", "top_k_logits", "ALGORITHMS"]
