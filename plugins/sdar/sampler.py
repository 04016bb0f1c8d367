"""SDAR's block-diffusion sampler (JetAstra/SDAR ``generate.py``: ``block_diffusion_generate``).

The sequence is cut into blocks of ``block_length`` tokens counted from position 0. Whole prompt
blocks are prefilled into the KV cache with the block-causal mask; then each block holding masks
is denoised in at most ``denoising_steps`` forward passes over that block alone (attending to the
cache), and once it has no masks left one more forward with ``store_kv=True`` appends its keys and
values to the cache. Per step, tokens are sampled from (temperature, top-k, top-p)-filtered
probabilities and a remasking strategy decides which masked positions keep their sample.

Differences from the reference, all on paths where it is undefined or wasteful:

* batches: the reference handles one prompt. Here prompts are left-padded (``attention_mask``)
  and each row keeps its own block grid: a row is shifted by whole blocks so that every row's
  first block with masks is decoded in the same forward pass; padding is never attended; a row
  that has met a stop token is frozen (no more unmasking) while others continue. Under greedy
  decoding every row equals that row generated alone (sampling draws differ, as the random
  numbers are drawn for the whole batch at once);
* when a step's scheduled count exceeds the masks left in the block, the reference's ``topk``
  also picks non-masked positions and overwrites already committed (or prompt) tokens; here the
  count is capped at the masks left;
* ``entropy_bounded``: the reference's branch uses an undefined variable; it is implemented as the
  EB-sampler (Ben-Hamu et al., 2025) describes it: masked positions are unmasked in order of
  increasing entropy of their sampling distribution while the running sum of entropies stays
  ``<= eb_threshold``, at least one per step; steps continue until the block has no masks
  (``denoising_steps`` does not bound them);
* the KV-store forward of the last block (or after a stop) is skipped: nothing would read it;
* ``temperature=0`` is accepted as greedy (the reference divides by it; its greedy setting is
  ``temperature=1.0, top_k=1``, which gives the same tokens).

``GenerationOutput.sequences`` is (B, P + gen_length): the reference returns x up to the end of
the last block; the tokens beyond ``P + gen_length`` are dropped. ``unmask_step[b, i]`` counts the
denoising forward passes in which row b still had masks before the one that unmasked position i
(for one row: the global index of the denoising call, store calls not counted). ``nfe`` counts
every model forward (prefill, denoising and KV-store calls).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dare.protocol import GenerationOutput
from dare_plugins.sdar.modeling import block_causal_mask

STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded")


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_logits(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest prefix of tokens (by probability) whose mass reaches ``p``."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None):
    """(tokens, token_probs, probs) for logits (B, L, V), drawing as the reference does.

    One ``torch.multinomial`` over the (B*L, V) probabilities, so a seeded default generator
    reproduces the reference's draws for one row.
    """
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    logits = logits.reshape(-1, vocab).float()
    if temperature == 0:
        top_k = 1
    elif temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = top_k_logits(logits, top_k)
    if top_p < 1.0:
        logits = top_p_logits(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator)
    token_probs = torch.gather(probs, -1, tokens)
    return tokens.view(shape), token_probs.view(shape), probs.view(*shape, vocab)


def get_num_transfer_tokens(block_length: int, steps: int) -> torch.Tensor:
    """Tokens to unmask at each step: ``block_length`` spread evenly, remainder first."""
    base, rem = divmod(block_length, steps)
    counts = torch.full((steps,), base, dtype=torch.int64)
    counts[:rem] += 1
    return counts


def entropy_bounded_select(entropy: torch.Tensor, masked: torch.Tensor, eb_threshold: float) -> torch.Tensor:
    """Positions (bool, like ``masked``) to unmask: lowest entropy first while the running sum is
    ``<= eb_threshold``; at least one masked position."""
    ent = torch.where(masked, entropy, torch.inf)
    sorted_ent, order = torch.sort(ent)
    n_masked = int(masked.sum())
    keep = int((torch.cumsum(sorted_ent[:n_masked], 0) <= eb_threshold).sum())
    keep = max(1, keep)
    select = torch.zeros_like(masked)
    select[order[:keep]] = True
    return select


def _select(strategy: str, masked: torch.Tensor, x0_p: torch.Tensor, probs: torch.Tensor, n: int,
            confidence_threshold: float, eb_threshold: float | None) -> torch.Tensor:
    """Which positions of one block (1D bool) to unmask this step; ``n`` is the scheduled count."""
    n = min(n, int(masked.sum()))
    select = torch.zeros_like(masked)
    if strategy == "sequential":
        first = int(masked.nonzero()[0])
        select[first:first + n] = True
        return select & masked
    if strategy == "entropy_bounded":
        p = probs.float()
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
        return entropy_bounded_select(entropy, masked, eb_threshold)
    confidence = torch.where(masked, x0_p, -torch.inf)
    if strategy == "low_confidence_dynamic":
        high = confidence > confidence_threshold
        if int(high.sum()) >= n:
            return high
    select[torch.topk(confidence, n).indices] = True
    return select


def _check(model, prompt_ids, attention_mask, gen_length, block_length, denoising_steps, temperature,
           top_k, top_p, remasking_strategy, confidence_threshold, eb_threshold):
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (B, P) with P > 0, got shape {tuple(prompt_ids.shape)}")
    if block_length <= 0:
        raise ValueError(f"block_length must be positive, got {block_length}")
    if gen_length <= 0 or gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
    if not 0 < denoising_steps <= block_length:
        raise ValueError(f"denoising_steps ({denoising_steps}) must be in 1..block_length ({block_length})")
    if remasking_strategy not in STRATEGIES:
        raise ValueError(f"unknown remasking_strategy {remasking_strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if remasking_strategy == "entropy_bounded" and (eb_threshold is None or eb_threshold < 0):
        raise ValueError("remasking_strategy 'entropy_bounded' needs eb_threshold >= 0")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 <= confidence_threshold <= 1:
        raise ValueError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    if attention_mask is not None:
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt_ids shape "
                             f"{tuple(prompt_ids.shape)}")
        am = attention_mask.bool()
        if (am[:, 1:] < am[:, :-1]).any() or not am[:, -1].all():
            raise ValueError("attention_mask must describe left padding (0s, then 1s to the end of each row)")
    max_pos = model.hf_config.get("max_position_embeddings")
    lengths = prompt_ids.shape[1] if attention_mask is None else int(attention_mask.bool().sum(1).max())
    total = -(-(lengths + gen_length) // block_length) * block_length
    if max_pos is not None and total > max_pos:
        raise ValueError(f"prompt ({lengths}) + gen_length ({gen_length}), rounded up to whole blocks of "
                         f"{block_length} = {total}, exceeds max_position_embeddings ({max_pos})")


@torch.no_grad()
def block_diffusion_generate(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             mask_id: int | None = None, gen_length: int = 128, block_length: int = 4,
                             denoising_steps: int = 4, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0, remasking_strategy: str = "low_confidence_dynamic",
                             confidence_threshold: float = 0.85, eb_threshold: float | None = None,
                             stopping_criteria_idx=None, generator: torch.Generator | None = None,
                             ) -> GenerationOutput:
    """Generate ``gen_length`` tokens after each (left-padded) prompt by block diffusion.

    prompt_ids: (B, P) int64, left-padded; attention_mask: (B, P), 1 on real tokens (None: all
    real). ``mask_id`` defaults to the config's ``mask_token_id``. ``stopping_criteria_idx``: a
    token id or list of ids; a row stops after the block in which one of them appears in its
    generated part (its remaining positions stay ``mask_id``). Greedy: ``temperature=1.0, top_k=1``
    (as in the reference) or ``temperature=0``. See the module docstring for the strategies.
    """
    config = model.hf_config
    mask_id = config["mask_token_id"] if mask_id is None else int(mask_id)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    _check(model, prompt_ids, attention_mask, gen_length, block_length, denoising_steps, temperature, top_k,
           top_p, remasking_strategy, confidence_threshold, eb_threshold)
    if isinstance(stopping_criteria_idx, int):
        stopping_criteria_idx = [stopping_criteria_idx]
    stops = torch.tensor(list(stopping_criteria_idx or []), dtype=torch.long)

    was_training = model.training
    model.eval()
    device = prompt_ids.device
    bsz, width = prompt_ids.shape
    bl = block_length
    real = torch.ones_like(prompt_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths = real.sum(1).tolist()                         # P_i
    first = [p // bl for p in lengths]                     # local index of the first block with masks
    n_blocks = [-(-(p + gen_length) // bl) for p in lengths]
    prefill_blocks = max(first)                            # F: global index of every row's first decode block
    shift = [prefill_blocks - f for f in first]            # whole blocks of internal left padding per row
    total_blocks = max(s + n for s, n in zip(shift, n_blocks))
    start = [s * bl for s in shift]                        # column of each row's position 0

    x = torch.full((bsz, total_blocks * bl), mask_id, dtype=torch.long, device=device)
    valid = torch.zeros_like(x, dtype=torch.bool)          # not internal padding
    positions = torch.zeros_like(x)
    unmask_step = torch.full((bsz, gen_length), -1, dtype=torch.long, device=device)
    pad_id = config.get("pad_token_id", config.get("eos_token_id"))
    pad_id = (pad_id[0] if isinstance(pad_id, list) else pad_id) or 0  # never attended
    for i in range(bsz):
        x[i, :start[i]] = pad_id
        x[i, start[i]:start[i] + lengths[i]] = prompt_ids[i, width - lengths[i]:]
        valid[i, start[i]:] = True
        positions[i, start[i]:] = torch.arange(x.shape[1] - start[i], device=device)
    gen_begin = torch.tensor([s + p for s, p in zip(start, lengths)], device=device)
    padded = not bool(valid.all())

    cache = None
    nfe = 0
    prefill = prefill_blocks * bl
    if prefill > 0:
        mask = torch.eye(prefill, dtype=torch.bool, device=device) | \
            (block_causal_mask(prefill, bl, device)[None] & valid[:, None, :prefill])
        out = model(x[:, :prefill], attention_mask=mask[:, None], position_ids=positions[:, :prefill],
                    use_cache=True, store_kv=True)
        cache = out.past_key_values
        nfe += 1

    schedule = get_num_transfer_tokens(bl, denoising_steps).tolist()
    done = [False] * bsz
    steps_taken = [0] * bsz
    for blk in range(prefill_blocks, total_blocks):
        lo, hi = blk * bl, (blk + 1) * bl
        # rows that take part: not stopped and inside their own sequence
        active = [not done[i] and blk < shift[i] + n_blocks[i] for i in range(bsz)]
        if not any(active):
            break
        key_mask = None
        if padded:
            key_mask = valid[:, None, None, :hi].expand(bsz, 1, bl, hi)
        cur = x[:, lo:hi].clone()
        cur_pos = positions[:, lo:hi]
        step = 0
        while True:
            masked = (cur == mask_id) & torch.tensor(active, device=device)[:, None]
            if not masked.any():
                break
            logits = model(cur, attention_mask=key_mask, position_ids=cur_pos, past_key_values=cache,
                           store_kv=False).logits
            nfe += 1
            x0, x0_p, probs = sample_tokens(logits, temperature, top_k, top_p, generator)
            for i in range(bsz):
                if not masked[i].any():
                    continue
                n = schedule[step] if step < len(schedule) else 1
                select = _select(remasking_strategy, masked[i], x0_p[i], probs[i], n, confidence_threshold,
                                 eb_threshold)
                cur[i, select] = x0[i, select]
                cols = torch.nonzero(select).flatten() + lo - gen_begin[i]
                cols = cols[(cols >= 0) & (cols < gen_length)]
                unmask_step[i, cols] = steps_taken[i]
                steps_taken[i] += 1
            step += 1
        x[:, lo:hi] = cur
        if len(stops):
            for i in range(bsz):
                if active[i]:
                    gen = x[i, gen_begin[i]:gen_begin[i] + gen_length]
                    done[i] = bool(torch.isin(gen, stops.to(device)).any())
        if any(not done[i] and blk + 1 < shift[i] + n_blocks[i] for i in range(bsz)):
            # a later block will read this one: append its keys/values to the cache
            cache = model(cur, attention_mask=key_mask, position_ids=cur_pos, past_key_values=cache,
                          store_kv=True).past_key_values
            nfe += 1

    sequences = torch.full((bsz, width + gen_length), mask_id, dtype=torch.long, device=device)
    sequences[:, :width] = prompt_ids
    for i in range(bsz):
        begin = int(gen_begin[i])
        sequences[i, width:] = x[i, begin:begin + gen_length]
    if was_training:
        model.train()
    return GenerationOutput(sequences=sequences, unmask_step=unmask_step, nfe=nfe)

