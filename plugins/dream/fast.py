"""Fast-dLLM-style decoding for Dream: semi-autoregressive blocks, KV caching, parallel commits.

``fast_diffusion_generate`` (registered as the ``dream_fast`` sampler) extends Dream's reference
``diffusion_generate`` (``dare_plugins.dream.sampler``) the way NVlabs/Fast-dLLM extends it
(``dream/model/generation_utils_block.py``), with dare's own implementation:

* **Blocks** (``block_length``, default = the whole generation): the generation is decoded block
  by block, left to right; a step only commits masked positions of the current block (later
  blocks stay masked and are still attended to).
* **Cache** (``cache``): ``"none"`` runs the full sequence every step. ``"prefix"``: the first step
  of every block is a full forward that also stores every layer's keys/values; the next steps of
  the block run only the window from the position before the block to the end of the sequence,
  attending to the cached keys/values of the earlier positions. ``"dual"``: the next steps run only
  the position before the block and the block itself, attending to cached keys/values on both
  sides (prefix and suffix); the cache is rebuilt at every block boundary.
* **Parallel commits** (``threshold`` / ``factor``): instead of the reference's step schedule,
  each step commits every masked position of the current block whose confidence (probability of
  the chosen token) is ``>= threshold`` (as Fast-dLLM's code), or the positions Fast-dLLM's ``factor`` rule admits; always
  at least the most confident one, so a block of L positions takes at most L steps and the step
  count follows the model's confidence (``steps`` is then not used).
* **Early stop** (``stop_at_eos``): a row is finished once it has committed an EOS with every
  earlier generated position committed; its remaining masks after that EOS become EOS (what
  Dream itself produces there: its pad id is its EOS id) with ``unmask_step`` -1, and the row
  leaves every later forward.

Dream's logits are shifted (raw row i scores token i + 1). The token at a block's first position
is scored by the row just before the block, so every cached window starts one position before
the block (that position is always a real token: the last prompt token or a committed one); its
keys/values are recomputed there too. Fast-dLLM instead commits the block's first token from the
cache-building forward unconditionally and never needs that row afterwards; dare applies the same
commit rule at every step, including the cache-building one.

Exact and approximate settings
------------------------------
* Exact = the reference sampler: ``block_length = max_new_tokens`` (the default), ``cache="none"``,
  ``threshold=None``, ``factor=None``, ``stop_at_eos=False``: identical tokens, ``unmask_step``
  and ``nfe`` for every ``alg``, greedy or not (the same random draws from the global RNG or
  the given generator), for prompts without mask tokens (see the end).
* No approximation, different schedule: several blocks with ``cache="none"`` and no
  threshold/factor. Every step sees the full current sequence; each block gets
  ``steps / num_blocks`` steps of the ``alg`` schedule on ``linspace(1, eps, steps_per_block + 1)``.
* Approximate: ``cache="prefix"`` / ``"dual"`` reuse keys/values computed before the current
  block's latest commits (Dream attends bidirectionally, so the cached positions would have
  changed too; they are refreshed at the next block boundary). The cache-building step is the
  full forward, and a window run on the sequence the cache was built from gives the full
  forward's logits up to float rounding (~1e-6 in float32). ``threshold`` / ``factor`` commit
  several tokens from one forward. ``stop_at_eos`` replaces what a finished row would still have
  generated after its EOS.

Only the generation is decoded: mask tokens inside a prompt stay masks (the reference sampler
also fills them, as part of its single all-positions schedule; Fast-dLLM's block code does not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dare.protocol import GenerationOutput
from dare_plugins.dream.modeling import DreamModel, rotary_tables
from dare_plugins.dream.sampler import (
    DEFAULT_THRESHOLD, _validate, prepare_inputs, sample_tokens,
)

CACHE_MODES = ("none", "prefix", "dual")
PARALLEL_ALGS = ("origin", "maskgit_plus", "confidence_threshold")  # algs a threshold/factor run accepts


def threshold_selection(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions to commit under the threshold rule: (B, L) confidences (-inf = not a candidate)
    -> (B, L) bool. Every candidate with confidence ``>= threshold``, and in every row with a
    candidate at least its most confident one."""
    candidate = confidence > -torch.inf
    chosen = candidate & (confidence >= threshold)
    best = confidence.argmax(dim=-1, keepdim=True)
    chosen.scatter_(-1, best, candidate.gather(-1, best) | chosen.gather(-1, best))
    return chosen


def factor_selection(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """Positions to commit under Fast-dLLM's factor rule: (B, L) confidences (-inf = not a
    candidate) -> (B, L) bool.

    With the candidates' confidences sorted in decreasing order c_1 >= c_2 >= ..., commit the n
    most confident, n the largest count with (k + 1) * (1 - c_k) <= factor for every k <= n (the
    left side grows with k, so this is the largest n satisfying it), and at least one. Fast-dLLM's
    loop also commits the least confident candidate when only that one fails; dare does not.
    """
    ordered, order = confidence.sort(dim=-1, descending=True)
    ordered = ordered.to(torch.promote_types(ordered.dtype, torch.float32))  # exact counts in bf16 too
    n = torch.arange(1, confidence.shape[-1] + 1, device=confidence.device, dtype=ordered.dtype)
    ok = ((n + 1) * (1 - ordered) <= factor) & (ordered > -torch.inf)
    ok[:, 0] = ordered[:, 0] > -torch.inf  # at least one where there is a candidate
    count = ok.long().cumprod(dim=-1).sum(dim=-1, keepdim=True)
    ranked = torch.arange(confidence.shape[-1], device=confidence.device)[None] < count
    return torch.zeros_like(ranked).scatter_(-1, order, ranked)


def _dream_core(model: torch.nn.Module) -> DreamModel:
    """The native DreamModel under ``model`` (itself, or the model inside a peft wrapper)."""
    if isinstance(model, DreamModel):
        return model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else None
    if isinstance(inner, DreamModel):  # peft: the adapters live inside the base model's modules
        return inner
    raise ValueError("cache='prefix' / 'dual' needs a native Dream model (dare.load_model); use cache='none'")


def _check_args(block_length, gen_len, cache, threshold, factor, stop_at_eos, alg, alg_temp):
    if block_length is None:
        block_length = gen_len
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"block_length must be a positive int, got {block_length!r}")
    if gen_len % block_length:
        raise ValueError(f"max_new_tokens ({gen_len}) must be divisible by block_length ({block_length})")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}; got {cache!r}")
    if threshold is not None and factor is not None:
        raise ValueError("give threshold or factor, not both")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
        raise ValueError(f"factor must be a positive number or None, got {factor!r}")
    if not isinstance(stop_at_eos, bool):
        raise ValueError(f"stop_at_eos must be a bool, got {stop_at_eos!r}")
    if threshold is not None or factor is not None:
        if alg not in PARALLEL_ALGS:
            raise ValueError(
                f"threshold / factor rank positions by the chosen token's probability; alg={alg!r} is not "
                f"compatible (use one of {', '.join(PARALLEL_ALGS)})"
            )
        if alg_temp:
            raise ValueError("threshold / factor commit deterministically by confidence; alg_temp must be 0 or None")
    return block_length


@torch.no_grad()
def fast_diffusion_generate(
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
    block_length: int | None = None,
    cache: str = "none",
    threshold: float | None = None,
    factor: float | None = None,
    stop_at_eos: bool = False,
    generator: torch.Generator | None = None,
    mask_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> GenerationOutput:
    """Dream generation with blocks, KV cache and threshold/factor parallel decoding (Fast-dLLM).

    The reference arguments (``max_new_tokens`` / ``max_length``, ``steps``, ``eps``,
    ``temperature``, ``top_p``, ``top_k``, ``alg``, ``alg_temp``, ``generator``,
    ``mask_token_id``) mean what they mean in ``dare_plugins.dream.sampler.diffusion_generate``;
    left-padded batches take an ``attention_mask`` (B, P) and use the reference's ``tok_idx``
    positions. New:

    * ``block_length``: semi-autoregressive block size (default: the whole generation); must
      divide the generation length. Without threshold/factor, ``steps`` must be divisible by the
      number of blocks and each block runs ``steps / num_blocks`` steps of the ``alg`` schedule.
    * ``cache``: ``"none"`` | ``"prefix"`` | ``"dual"`` (module docstring).
    * ``threshold`` (in [0, 1]) or ``factor`` (> 0): parallel commits by confidence (the chosen
      token's probability; ``alg`` must be ``origin``, ``maskgit_plus`` or ``confidence_threshold``
      and ``alg_temp`` unset). Without them, ``alg='confidence_threshold'`` is DARE's per-step
      rule with its default threshold 0.9 (batch size 1), exactly as the reference sampler.
      Rows decide independently; a row whose current block is full skips the forwards until
      the next block.
    * ``stop_at_eos``: finish rows at a committed EOS whose earlier positions are all committed
      (approximate, default off); ``eos_token_id`` defaults to the config's.

    Returns ``GenerationOutput(sequences (B, P + G), unmask_step (B, G), nfe)``: ``unmask_step``
    is the global step (= forward index) of each commit, -1 for EOS filled in by ``stop_at_eos``;
    ``nfe`` counts batched forwards, full or cached window alike.
    """
    _validate(alg, steps, eps, temperature, top_p, top_k, alg_temp)
    config, mask_token_id, prompt_ids, attention_mask, gen_len = prepare_inputs(
        model, prompt_ids, attention_mask, mask_token_id, max_new_tokens, max_length)
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + gen_len
    block_length = _check_args(block_length, gen_len, cache, threshold, factor, stop_at_eos, alg, alg_temp)
    num_blocks = gen_len // block_length
    parallel = threshold is not None or factor is not None
    if not parallel and steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be divisible by the number of blocks ({num_blocks})")
    if not parallel and alg == "confidence_threshold" and batch != 1:
        raise ValueError(f"alg='confidence_threshold' needs batch size 1 (prompt_ids has {batch} rows)")
    if stop_at_eos and eos_token_id is None:
        eos_token_id = config.get("eos_token_id")
        if isinstance(eos_token_id, (list, tuple)):
            eos_token_id = eos_token_id[0] if eos_token_id else None
        if eos_token_id is None:
            raise ValueError("stop_at_eos: eos_token_id not given and the model config has no 'eos_token_id'")
    core = _dream_core(model) if cache != "none" else None
    device = prompt_ids.device

    x = F.pad(prompt_ids, (0, gen_len), value=mask_token_id)
    if attention_mask is not None and bool((attention_mask == 0).any()):
        mask2d = F.pad(attention_mask, (0, gen_len), value=1)  # generated slots are real tokens
        tok_idx = mask2d.long().cumsum(-1) - 1  # the reference's positions: real tokens from 0
        tok_idx.masked_fill_(mask2d == 0, 1)
        keys = mask2d.bool()  # key padding mask for the cached windows (their queries are all real)
        attn = keys[:, None, None, :] & keys[:, None, :, None]  # the reference's (B, 1, N, N) mask
    else:
        tok_idx = keys = attn = None

    # per-row model inputs, sliced to the rows of each forward
    per_row = {"attn": attn, "tok_idx": tok_idx, "keys": keys, "cos": None, "sin": None}
    if core is not None:  # RoPE tables of every position, sliced for each cached window
        cfg = core.hf_config
        positions = tok_idx if tok_idx is not None else torch.arange(total, device=device)[None].expand(batch, total)
        per_row["cos"], per_row["sin"] = rotary_tables(
            positions, cfg["hidden_size"] // cfg["num_attention_heads"], float(cfg.get("rope_theta", 10000.0)),
            core.model.embed_tokens.weight.dtype,
        )

    steps_per_block = steps // num_blocks
    timesteps = torch.linspace(1, eps, steps_per_block + 1, device=device)
    unmask_step = torch.full((batch, gen_len), -1, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)  # stop_at_eos
    nfe = 0

    for block in range(num_blocks):
        start = prompt_len + block * block_length
        end = start + block_length
        win_start = start - 1  # the row before the block scores the block's first token
        win_end = total if cache == "prefix" else end
        # rows of this block's forwards: global indices (None = every row)
        rows = None if not bool(finished.any()) else (~finished).nonzero(as_tuple=True)[0]
        if rows is not None and rows.numel() == 0:
            break
        live = per_row if rows is None else {k: None if v is None else v[rows] for k, v in per_row.items()}
        kv = None
        j, block_steps = 0, steps_per_block
        per_step = carried = 0
        while True:
            xa = x if rows is None else x[rows]
            block_masked = xa[:, start:end] == mask_token_id
            if parallel:
                pending = block_masked.any(dim=-1)
                if not bool(pending.any()):
                    break
                if not bool(pending.all()):  # rows whose block is full wait for the next block
                    kept = pending.nonzero(as_tuple=True)[0]
                    rows = kept if rows is None else rows[kept]
                    live = {k: None if v is None else v[kept] for k, v in live.items()}
                    kv = None if kv is None else kv.select(kept)
                    xa, block_masked = x[rows], block_masked[kept]
            elif j >= block_steps:
                break
            r, c = block_masked.nonzero(as_tuple=True)  # row-major, as the reference's mask order
            if cache == "none":
                logits = model(xa, attention_mask=live["attn"], position_ids=live["tok_idx"]).logits
                mask_logits = logits[r, start + c - 1]
            elif kv is None:  # first step of the block: full forward, (re)build the cache
                kv = core.new_kv_cache(xa.shape[0], total, device=device)
                mask_logits = core.forward_cached(
                    xa, kv, 0, attention_mask=live["attn"], logits_index=(r, start + c - 1),
                    rotary=(live["cos"], live["sin"]),
                ).logits
            else:
                rotary = (live["cos"][:, win_start:win_end], live["sin"][:, win_start:win_end])
                mask_logits = core.forward_cached(
                    xa[:, win_start:win_end], kv, win_start, attention_mask=live["keys"], logits_index=(r, c),
                    rotary=rotary,
                ).logits
            nfe += 1
            step = nfe - 1
            view = xa[:, start:end]  # in-place writes land in xa

            if parallel:
                confidence, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, generator=generator)
                full_conf = torch.full(view.shape, -torch.inf, dtype=confidence.dtype, device=device)
                full_conf[r, c] = confidence
                chosen = (threshold_selection(full_conf, threshold) if threshold is not None
                          else factor_selection(full_conf, factor))
                proposal = torch.full_like(view, mask_token_id)
                proposal[r, c] = x0
                view[chosen] = proposal[chosen]
            elif alg == "origin":
                t, s = timesteps[j], timesteps[j + 1]
                p_transfer = 1 - s / t if j < block_steps - 1 else 1
                x0 = torch.full_like(r, mask_token_id)
                transfer = torch.rand(x0.shape, device=device, generator=generator) < p_transfer
                _, x0[transfer] = sample_tokens(mask_logits[transfer], temperature, top_p, top_k, generator=generator)
                view[r, c] = x0
            elif alg == "confidence_threshold":  # DARE's rule (reference sampler), per block
                if j == 0:
                    n_masked = int(block_masked.sum())
                    if n_masked % block_steps:
                        raise ValueError(
                            f"alg='confidence_threshold' needs the masked positions of each block ({n_masked}) "
                            f"divisible by its steps ({block_steps})"
                        )
                    per_step, carried = n_masked // block_steps, 0
                confidence, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, generator=generator)
                full_conf = torch.full(xa.shape, -torch.inf, dtype=confidence.dtype, device=device)
                full_conf[r, start + c] = confidence
                top_conf, top_idx = torch.topk(full_conf, per_step + carried)
                carried = 0
                low = top_conf[0, 1:] < DEFAULT_THRESHOLD  # the most confident is always committed
                n_low = int(low.sum())
                commit = torch.cat([top_idx[0, :1], top_idx[0, 1:][~low]])
                if n_low:
                    carried = n_low
                    if j >= block_steps - 1:  # last step: one more step for the carried tokens
                        per_step = 0
                        block_steps += 1
                proposal = torch.full_like(xa[0], mask_token_id)
                proposal[start + c] = x0
                xa[0, commit] = proposal[commit]
            else:  # maskgit_plus / topk_margin / entropy
                t, s = timesteps[j], timesteps[j + 1]
                confidence, x0 = sample_tokens(
                    mask_logits, temperature, top_p, top_k, margin_confidence=alg == "topk_margin",
                    neg_entropy=alg == "entropy", generator=generator,
                )
                num_mask = block_masked.sum() / block_masked.shape[0]  # batch mean, as the reference
                n_now = int(num_mask * (1 - s / t)) if j < block_steps - 1 else int(num_mask)
                if n_now > 0:
                    full_conf = torch.full(xa.shape, -torch.inf, dtype=confidence.dtype, device=device)
                    full_conf[r, start + c] = confidence
                    if alg_temp is None or alg_temp == 0:
                        _, idx = torch.topk(full_conf, n_now)
                    else:
                        weights = F.softmax(full_conf / alg_temp, dim=-1)
                        idx = torch.multinomial(weights, num_samples=n_now, generator=generator)
                    proposal = torch.full_like(xa, mask_token_id)
                    proposal[r, start + c] = x0
                    ri = torch.arange(xa.shape[0], device=device)[:, None].expand_as(idx)
                    picked = proposal[ri, idx]
                    # never write a mask over a committed token (a row with fewer masks than n_now)
                    xa[ri, idx] = torch.where(picked == mask_token_id, xa[ri, idx], picked)

            newly = block_masked & (view != mask_token_id)
            nr, nc = newly.nonzero(as_tuple=True)
            unmask_step[nr if rows is None else rows[nr], start - prompt_len + nc] = step
            j += 1

            done = None
            if stop_at_eos:
                gen = xa[:, prompt_len:]
                committed = gen != mask_token_id
                hit = (gen == eos_token_id) & committed.long().cumprod(dim=-1).bool()
                done = hit.any(dim=-1)
                if bool(done.any()):
                    first = hit.long().argmax(dim=-1, keepdim=True)
                    after = torch.arange(gen_len, device=device)[None] > first
                    gen[done[:, None] & after & ~committed] = eos_token_id
                else:
                    done = None
            if rows is not None:
                x[rows] = xa
            if done is not None:  # finished rows leave every later forward
                kept = (~done).nonzero(as_tuple=True)[0]
                finished[done.nonzero(as_tuple=True)[0] if rows is None else rows[done]] = True
                if kept.numel() == 0:
                    break
                rows = kept if rows is None else rows[kept]
                live = {k: None if v is None else v[kept] for k, v in live.items()}
                kv = None if kv is None else kv.select(kept)

    return GenerationOutput(sequences=x, unmask_step=unmask_step, nfe=nfe)


__all__ = ["fast_diffusion_generate", "threshold_selection", "factor_selection", "CACHE_MODES"]
