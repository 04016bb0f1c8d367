"""Fast-dLLM-style decoding for LLaDA: KV caching and parallel unmasking (sampler ``llada_fast``).

Same blocks and remasking as the reference sampler (``dare_plugins.llada.sampler``), plus the
two accelerations of Fast-dLLM (Wu et al., 2025, NVlabs/Fast-dLLM ``llada/generate.py``):

* ``cache``: ``"none"`` runs the full model every step (the reference). ``"prefix"`` runs one
  full forward at the start of every block, which builds the KV cache and whose logits serve
  that block's first step; the block's later steps run only positions ``block start .. end``
  (the block and the masked suffix) against the cached keys / values of the prefix.
  ``"dual"`` also caches the suffix: later steps run only the block's own tokens. The cache is
  rebuilt at every block boundary.
* ``threshold``: commit every masked position of the current block whose confidence is
  ``>= threshold`` (the reference ``get_transfer_index`` keeps those not below it), and at
  least the most confident one. ``factor``: commit the ``n`` most confident positions, ``n``
  the number of leading sorted confidences ``c_1 >= c_2 >= ...`` with
  ``c_n >= 1 - factor / (n + 1)``, i.e. ``(n + 1) * (1 - c_n) <= factor``, at least one.
  With either, a block ends as soon as it has no masks, and ``steps / num_blocks`` is an
  upper bound on its steps (step ``i`` commits at least ``ceil(masks_left / steps_left)``,
  which is 1 whenever ``steps >= gen_length``, i.e. exactly Fast-dLLM's rule then). Without
  either, the reference's linear schedule (``get_num_transfer_tokens``) is used.

Exactness: with ``cache="none"``, no threshold / factor and temperature 0 (``stop_at_eos=False``)
the output equals the reference sampler's: same model calls, same ops on the same tensors
(tokens, ``unmask_step`` and ``nfe``; nfe as long as ``steps <= gen_length``, beyond which the
reference spends steps that commit nothing and this sampler stops the block instead).
Every cached mode is an approximation: under bidirectional attention every position's keys /
values depend on the tokens committed since the cache was built. Only the first step of each
block (the full forward) is exact; see docs/rollout.md.

Work is limited to what is needed: rows whose current block has no masks (or that finished,
``stop_at_eos``) leave the forward batch; the LM head runs only on the masked positions of the
current block in the cached modes; Gumbel noise (float64, as the reference) is drawn only for
the candidate (masked) positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dare.protocol import GenerationOutput
from dare_plugins.llada.modeling import LLaDAModelLM
from dare_plugins.llada.sampler import (
    LLADA_EOT_ID, REMASKING, _config, _device, _validate, add_gumbel_noise, initial_canvas, get_num_transfer_tokens,
)

CACHE_MODES = ("none", "prefix", "dual")


def find_llada(model: torch.nn.Module) -> LLaDAModelLM:
    """The ``LLaDAModelLM`` inside ``model`` (itself, or wrapped by peft / DDP ...)."""
    for module in model.modules():
        if isinstance(module, LLaDAModelLM):
            return module
    raise ValueError("cache='prefix' / 'dual' need dare's LLaDAModelLM (load the model with dare.load_model); "
                     f"got {type(model).__name__}")


def _ranks(confidence: torch.Tensor) -> torch.Tensor:
    """(R, n) rank of each entry in its row by decreasing confidence (ties: lower index first)."""
    order = confidence.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(confidence.shape[1], device=order.device).expand_as(order))
    return ranks


def select_topk(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(R, n) bool: the ``k[r]`` most confident entries of each row, chosen by ``torch.topk``
    as the reference does (so ties resolve the same way)."""
    transfer = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    if bool((k == k[0]).all()):
        transfer.scatter_(1, torch.topk(confidence, int(k[0]), dim=1).indices, True)
    else:  # rows with different counts (not met in practice: a block starts fully masked)
        for r in range(confidence.shape[0]):
            transfer[r, torch.topk(confidence[r], int(k[r])).indices] = True
    return transfer


def select_threshold(confidence: torch.Tensor, threshold: float, min_count: torch.Tensor | int = 1) -> torch.Tensor:
    """(R, n) bool: candidates (finite confidence) with confidence ``>= threshold``, plus the
    ``min_count`` (per row, at least 1) most confident ones."""
    candidate = torch.isfinite(confidence)
    min_count = torch.as_tensor(min_count, device=confidence.device).clamp(min=1)
    forced = _ranks(confidence) < min_count.reshape(-1, 1)
    return candidate & ((confidence >= threshold) | forced)


def factor_counts(confidence: torch.Tensor, factor: float) -> torch.Tensor:
    """(R,) the factor rule's count per row: the number of leading sorted confidences with
    ``c_n >= 1 - factor / (n + 1)`` (n = 1, 2, ...), at least 1 (0 for a row without
    candidates). Non-candidates have confidence -inf."""
    ordered = confidence.to(torch.float64).sort(dim=1, descending=True).values
    n = torch.arange(1, confidence.shape[1] + 1, dtype=torch.float64, device=confidence.device)
    passes = ordered >= 1 - factor / (n + 1)
    leading = passes.long().cumprod(dim=1).sum(dim=1)
    candidates = torch.isfinite(confidence).sum(dim=1)
    return torch.minimum(leading.clamp(min=1), candidates)


def select_factor(confidence: torch.Tensor, factor: float, min_count: torch.Tensor | int = 1) -> torch.Tensor:
    """(R, n) bool: the ``max(factor_counts, min_count)`` most confident candidates per row."""
    count = torch.maximum(factor_counts(confidence, factor),
                          torch.as_tensor(min_count, device=confidence.device))
    return torch.isfinite(confidence) & (_ranks(confidence) < count.reshape(-1, 1))


def finished_rows(generated: torch.Tensor, mask_id: int, end_ids: tuple[int, ...]) -> torch.Tensor:
    """(R,) bool: rows whose first end token (EOS / EoT) is committed with every earlier
    generated position committed."""
    committed = generated != mask_id
    is_end = committed & torch.isin(generated, torch.tensor(end_ids, device=generated.device))
    length = generated.shape[1]
    first_open = torch.where(committed.all(dim=1), length, (~committed).int().argmax(dim=1))
    first_end = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), length)
    return first_end < first_open


def _predict(logits: torch.Tensor, temperature: float, remasking: str, generator: torch.Generator | None,
             eos: int, eot: int, logits_eos_inf: bool, confidence_eos_eot_inf: bool):
    """Predicted tokens (N,) and their low-confidence scores (N,) (None for ``random``) for
    logits (N, V), with the reference's operations."""
    if logits_eos_inf:
        logits[:, eos] = -torch.inf
    x0 = add_gumbel_noise(logits, temperature, generator).argmax(dim=-1)
    if remasking != "low_confidence":
        return x0, None
    if confidence_eos_eot_inf:  # as the reference: both at temperature 0, EoT only otherwise
        logits = logits.clone()
        logits[:, [eos, eot] if temperature == 0 else [eot]] = -torch.inf
    lp = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return x0, F.softmax(lp, dim=-1).gather(-1, x0[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0,
             remasking: str = "low_confidence", mask_id: int | None = None,
             generator: torch.Generator | None = None, cache: str = "none", threshold: float | None = None,
             factor: float | None = None, logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False,
             eos_id: int | None = None, eot_id: int | None = None, stop_at_eos: bool = False) -> GenerationOutput:
    """Generate ``gen_length`` tokens after ``prompt_ids`` (B, P) with Fast-dLLM's accelerations.

    steps, gen_length, block_length, temperature, remasking, mask_id, logits_eos_inf,
    confidence_eos_eot_inf, eos_id, eot_id, attention_mask (left padding): as the reference
    sampler ``dare_plugins.llada.sampler.generate`` (no ``cfg_scale``).
    cache: ``"none"`` / ``"prefix"`` / ``"dual"`` (see the module docstring).
    threshold / factor: parallel decoding rules (at most one); both None: linear schedule.
    generator: torch.Generator for the Gumbel noise (temperature > 0; drawn only for the
        masked positions of the current block) and ``random`` remasking (a (rows, L) draw per
        step, as the reference); None: the global RNG.
    stop_at_eos: once a row's generated tokens hold a committed EOS / EoT with every earlier
        position committed, fill its remaining masks with EOS (``unmask_step`` stays -1
        there) and drop the row from later forwards. An approximation: the reference may
        still commit other tokens after that EOS. Off by default.

    Returns ``GenerationOutput(sequences (B, P + gen_length), unmask_step (B, gen_length),
    nfe)``: ``unmask_step`` the 0-based global step that committed each position (with the
    linear schedule ``block * steps_per_block + i`` as the reference; with threshold / factor
    a running count of steps), ``nfe`` the number of model calls including the
    cache-building ones.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache={cache!r}; expected one of {', '.join(map(repr, CACHE_MODES))}")
    if threshold is not None and factor is not None:
        raise ValueError("set either threshold or factor (parallel decoding rules), not both")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in [0, 1]")
    if factor is not None and not float(factor) > 0.0:
        raise ValueError(f"factor={factor} must be positive")
    config = _config(model)
    mask_id = int(config["mask_token_id"] if mask_id is None else mask_id)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    batch, prompt_len = prompt_ids.shape
    _validate(config, prompt_len, steps, gen_length, block_length, remasking)
    lm = find_llada(model) if cache != "none" else None
    device = _device(model)

    total = prompt_len + gen_length
    x, attention_mask = initial_canvas(prompt_ids, attention_mask, gen_length, mask_id, device)
    vocab = config.get("embedding_size") or config["vocab_size"]
    eos = int(config["eos_token_id"] if eos_id is None else eos_id)
    eot = int(config.get("eot_token_id", LLADA_EOT_ID) if eot_id is None else eot_id)
    for name, tid, used in (("eos_id", eos, logits_eos_inf or confidence_eos_eot_inf or stop_at_eos),
                            ("eot_id", eot, confidence_eos_eot_inf)):
        if used and not 0 <= tid < vocab:
            raise ValueError(f"{name}={tid} is outside the model's vocabulary of {vocab}")

    adaptive = threshold is not None or factor is not None
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    unmask_step = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    all_rows = torch.arange(batch, device=device)
    nfe = step = 0
    for block in range(num_blocks):
        start = prompt_len + block * block_length
        end = start + block_length
        rows = all_rows if not finished.any() else all_rows[~finished]
        if rows.numel() == 0:
            break
        if not adaptive:
            num_transfer = get_num_transfer_tokens(x[rows, start:end] == mask_id, steps_per_block)
        # candidates: masked positions in [low, end). cache="none" sees the whole row, like the
        # reference (so masks left before the block, e.g. where the model predicted the mask
        # token itself, stay candidates); the cached modes see the current block only.
        low = 0 if cache == "none" else start
        first_gen = max(low, prompt_len)
        kv = None
        for i in range(steps_per_block):
            whole = rows.numel() == batch
            xr = x if whole else x[rows]
            candidates = xr[:, low:end] == mask_id
            if cache == "none" or kv is None:
                am = attention_mask if attention_mask is None or whole else attention_mask[rows]
                if cache == "none":
                    logits = model(xr, attention_mask=am).logits[:, low:end][candidates]
                else:  # block start: full forward, builds the cache
                    wanted = torch.zeros_like(xr, dtype=torch.bool)
                    wanted[:, low:end] = candidates
                    out = lm.forward_cached(xr, attention_mask=am, logits_mask=wanted)
                    logits, kv = out.logits, out.past_key_values
            else:
                stop = total if cache == "prefix" else end
                wanted = torch.zeros((rows.numel(), stop - start), dtype=torch.bool, device=device)
                wanted[:, :block_length] = candidates
                logits = lm.forward_cached(xr[:, start:stop], cache=kv, start=start, logits_mask=wanted).logits
            nfe += 1

            x0, conf = _predict(logits, temperature, remasking, generator, eos, eot, logits_eos_inf,
                                confidence_eos_eot_inf)
            if conf is None:  # random remasking: the reference's (B, L) uniform draw
                conf = torch.rand(xr.shape, device=device, generator=generator)[:, low:end][candidates]
            confidence = torch.full(candidates.shape, -torch.inf, dtype=conf.dtype, device=device)
            confidence[candidates] = conf
            if not adaptive:  # topk over the whole row, as the reference (same tie-breaking)
                row_conf = torch.full(xr.shape, -torch.inf, dtype=conf.dtype, device=device)
                row_conf[:, low:end] = confidence
                transfer = select_topk(row_conf, num_transfer[:, i])[:, low:end]
            else:
                steps_left = steps_per_block - i
                min_count = (candidates.sum(dim=1) + steps_left - 1) // steps_left
                transfer = (select_threshold(confidence, threshold, min_count) if factor is None
                            else select_factor(confidence, factor, min_count))

            current = xr[:, low:end]
            predicted = current.clone()
            predicted[candidates] = x0
            new_window = torch.where(transfer, predicted, current)
            at = step if adaptive else block * steps_per_block + i
            transfer = transfer[:, first_gen - low:]  # generated positions only
            if whole:
                x[:, low:end] = new_window
                unmask_step[:, first_gen - prompt_len:end - prompt_len][transfer] = at
            else:
                x[rows, low:end] = new_window
                span = unmask_step[rows, first_gen - prompt_len:end - prompt_len]
                unmask_step[rows, first_gen - prompt_len:end - prompt_len] = span.masked_fill(transfer, at)
            step += 1

            open_rows = (new_window[:, start - low:] == mask_id).any(dim=1)
            if stop_at_eos:
                done = finished_rows(x[rows, prompt_len:], mask_id, (eos, eot))
                if bool(done.any()):
                    done_rows = rows[done]
                    generated = x[done_rows, prompt_len:]
                    x[done_rows, prompt_len:] = generated.masked_fill(generated == mask_id, eos)
                    finished[done_rows] = True
                    open_rows &= ~done
            if not bool(open_rows.any()):
                break
            if not bool(open_rows.all()):
                rows = rows[open_rows]
                if kv is not None:
                    kv.select(open_rows)
                if not adaptive:
                    num_transfer = num_transfer[open_rows]
    return GenerationOutput(sequences=x, unmask_step=unmask_step, nfe=nfe)


__all__ = ["CACHE_MODES", "REMASKING", "generate", "find_llada", "select_topk", "select_threshold",
           "select_factor", "factor_counts", "finished_rows"]
