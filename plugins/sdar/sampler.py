"""SDAR's block-diffusion sampler (JetAstra/SDAR ``generate.py``: ``block_diffusion_generate``).

The sequence is cut into blocks of ``block_length`` tokens counted from position 0. Whole prompt
blocks are prefilled into the KV cache with the block-causal mask; then each block holding masks
is denoised in at most ``denoising_steps`` forward passes over that block alone (attending to the
cache), and once it has no masks left one more forward with ``store_kv=True`` appends its keys and
values to the cache. Per step, tokens are sampled from (temperature, top-k, top-p)-filtered
probabilities and a remasking strategy decides which masked positions keep their sample. Every
mask is passed explicitly and built from ``block_length`` (as the reference's), which may differ
from the config's ``block_size``:

* ``sequential``: the first ``n`` masked positions (``n`` from the step's schedule);
* ``low_confidence_static``: the ``n`` masked positions whose sampled token is most probable;
* ``low_confidence_dynamic`` (the reference's default): every masked position whose sampled
  token's probability is ``> confidence_threshold`` when there are at least ``n`` of them, else
  the static choice, so a step commits at least ``n >= 1`` tokens (parallel decoding);
* ``low_confidence_factor`` (dare's, Fast-dLLM's factor rule, Wu et al. 2025): with the masked
  confidences sorted in descending order ``c_1 >= c_2 >= ...``, commit the ``n`` most confident
  positions for the largest ``n`` with ``(n + 1) * (1 - c_n) <= factor``, at least one; steps
  continue until the block has no masks (``denoising_steps`` does not bound them);
* ``entropy_bounded`` (see below).

The confidence is the probability of the sampled token under the distribution it was drawn from
(the reference's ``x0_p``). Greedy decoding (``top_k=1`` or ``temperature=0``) makes that
distribution one-hot, so every confidence is exactly 1 and both threshold rules commit the whole
block in its first step, as the reference does.

Differences from the reference, all on paths where it is undefined or wasteful:

* batches: the reference handles one prompt. Here prompts are left-padded (``attention_mask``)
  and each row keeps its own block grid: a row is shifted by whole blocks so that every row's
  first block with masks starts in the same forward pass; padding is never attended. Every forward
  then carries every unfinished row in its own block: a row denoises its block, or (no masks left,
  a later block follows) stores it and moves on to its next block at once, never waiting for the
  other rows; so a batch takes as many forwards as its slowest row, and every row makes exactly
  the forwards it makes alone. Under greedy decoding every row equals that row generated alone
  (sampling draws differ, as the random numbers are drawn for the whole batch at once);
* work that nothing reads is not done: the prompt blocks of all rows are prefilled in one packed
  forward without padding (rows' prompt blocks share lanes, each attending only its own row), into
  a preallocated cache (:class:`~dare_plugins.sdar.modeling.SDARStaticCache`, written per row at
  the row's own columns); prefill and KV-store forwards compute no logits; a greedy step (or any
  step of a batch of several rows) computes logits of the masked positions only; a row that has
  met a stop token or finished its last block leaves every later forward (and the cache);
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
  ``temperature=1.0, top_k=1``, which gives the same tokens). Greedy steps take the argmax without
  drawing random numbers (the reference's ``multinomial`` over one-hot probabilities returns the
  same token); only a tie for the top logit falls back to the reference's draw among the tied.

Sampling (not greedy) with one row follows the reference's draws: one ``torch.multinomial`` over
every position of the block per step, so a seeded default generator reproduces a reference run.
With several rows (which the reference does not handle) tokens are drawn at the masked positions
only, one ``torch.multinomial`` over all of them per step: the same distribution, without logits or
random numbers for positions already committed (whose samples would be discarded).

``GenerationOutput.sequences`` is (B, P + gen_length): the reference returns x up to the end of
the last block; the tokens beyond ``P + gen_length`` are dropped. After a stop, the positions of
later blocks stay ``mask_id`` (the reference leaves them masked too; the block holding the stop
token is fully decoded). ``unmask_step[b, i]`` counts the denoising forward passes in which row b
still had masks before the one that unmasked position i (for one row: the global index of the
denoising call, store calls not counted; -1: never unmasked). ``nfe`` counts every model forward
(prefill, denoising and KV-store calls; a batched forward counts once, whatever its rows do).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dare.protocol import GenerationOutput
from dare_plugins.sdar.modeling import SDARCache, SDARStaticCache

STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic", "low_confidence_factor",
              "entropy_bounded")


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


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def greedy_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 1, top_p: float = 1.0,
                  generator: torch.Generator | None = None, need_entropy: bool = False):
    """(tokens, token_probs, entropy or None) for logits (N, V) under greedy settings (``top_k=1``
    or ``temperature=0``): what :func:`sample_tokens` returns, without its draw.

    The filtered distribution is one-hot on the top logit (probability exactly 1, entropy 0), so the
    reference's draw always returns the argmax; positions whose top logit is tied go through
    :func:`sample_tokens`, which draws among the tied tokens as the reference does.
    """
    z = logits.float()
    if temperature not in (0, 1.0):
        z = z / temperature  # the same rounding as sample_tokens, so the same ties
    if z.shape[-1] > 1:
        top2, idx = torch.topk(z, 2, dim=-1)
        tokens, tied = idx[:, 0], top2[:, 0] == top2[:, 1]
    else:
        tokens, tied = z.argmax(-1), torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    probs = torch.ones(tokens.shape, dtype=torch.float32, device=z.device)
    entropy = torch.zeros_like(probs) if need_entropy else None
    if bool(tied.any()):
        t, p, full = sample_tokens(logits[tied], temperature, top_k, top_p, generator)
        tokens[tied], probs[tied] = t, p
        if need_entropy:
            entropy[tied] = _entropy(full)
    return tokens, probs, entropy


def get_num_transfer_tokens(block_length: int, steps: int) -> torch.Tensor:
    """Tokens to unmask at each step: ``block_length`` spread evenly, remainder first."""
    base, rem = divmod(block_length, steps)
    counts = torch.full((steps,), base, dtype=torch.int64)
    counts[:rem] += 1
    return counts


def _first_by_rank(order: torch.Tensor, count: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Bool like ``masked``: the first ``count`` (per row, (..., 1)) positions of ``order``."""
    rank = torch.arange(order.shape[-1], device=order.device)
    return torch.zeros_like(masked).scatter(-1, order, rank < count) & masked


def entropy_bounded_select(entropy: torch.Tensor, masked: torch.Tensor, eb_threshold: float) -> torch.Tensor:
    """Positions (bool, like ``masked``; (L,) or (R, L)) to unmask: lowest entropy first while the
    running sum is ``<= eb_threshold``; at least one masked position per row."""
    ent = torch.where(masked, entropy, torch.inf)
    sorted_ent, order = torch.sort(ent, dim=-1, stable=True)
    keep = (torch.cumsum(sorted_ent, -1) <= eb_threshold).sum(-1, keepdim=True).clamp_min(1)
    return _first_by_rank(order, keep, masked)


def factor_select(confidence: torch.Tensor, masked: torch.Tensor, factor: float) -> torch.Tensor:
    """Fast-dLLM's factor rule: positions (bool, like ``masked``; (L,) or (R, L)) to unmask.

    With the masked confidences sorted in descending order ``c_1 >= c_2 >= ...``, the ``n`` most
    confident positions for the largest ``n`` with ``(n + 1) * (1 - c_n) <= factor``; at least one
    masked position per row. (The condition holding for ``n`` implies it for every smaller ``n``,
    so the largest such ``n`` is the length of the run of successes from ``n = 1``.)
    """
    conf = torch.where(masked, confidence.float(), -torch.inf)
    sorted_conf, order = torch.sort(conf, dim=-1, descending=True, stable=True)
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=torch.float32)
    ok = ((n + 1) * (1 - sorted_conf) <= factor) & (sorted_conf > -torch.inf)
    keep = ok.long().cumprod(-1).sum(-1, keepdim=True).clamp_min(1)
    return _first_by_rank(order, keep, masked)


def threshold_select(confidence: torch.Tensor, masked: torch.Tensor, n: int | torch.Tensor,
                     confidence_threshold: float) -> torch.Tensor:
    """The reference's ``low_confidence_dynamic`` for rows (R, L): every masked position with
    confidence ``> confidence_threshold`` when there are at least ``min(n, masks left)`` of them,
    else the ``min(n, masks left)`` most confident (always at least one when ``n >= 1``). ``n``: an
    int or one count per row (R,)."""
    conf = torch.where(masked, confidence, -torch.inf)
    high = conf > confidence_threshold
    enough = high.sum(-1) >= torch.clamp(masked.sum(-1), max=n)
    return torch.where(enough[..., None], high, _top_n(conf, masked, n))


def _top_n(conf: torch.Tensor, masked: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """The ``min(n, masks left)`` most confident masked positions of each row (``conf`` is -inf
    off the mask, so a row with fewer masks than ``n`` gets all of them; torch.topk's choice among
    ties is the one the reference's per-row ``topk`` makes). ``n``: an int or (R,) counts."""
    width = conf.shape[-1]
    if not isinstance(n, torch.Tensor):
        idx = torch.topk(conf, min(n, width), dim=-1).indices
        return torch.zeros_like(masked).scatter(-1, idx, True) & masked
    select = torch.zeros_like(masked)
    for count in n.unique().tolist():  # the schedule has at most three distinct counts
        rows = (n == count).nonzero().flatten()
        idx = torch.topk(conf[rows], min(count, width), dim=-1).indices
        select[rows] = torch.zeros_like(masked[rows]).scatter(-1, idx, True)
    return select & masked


def _select(strategy: str, masked: torch.Tensor, confidence: torch.Tensor, entropy: torch.Tensor | None,
            n: int | torch.Tensor, confidence_threshold: float, eb_threshold: float | None,
            factor: float) -> torch.Tensor:
    """Which positions of the rows' current blocks (R, L) to unmask; ``n`` is the scheduled count
    (an int, or one per row (R,): rows may be at different steps of their blocks)."""
    if strategy == "sequential":
        cols = torch.arange(masked.shape[-1], device=masked.device)
        first = torch.where(masked, cols, masked.shape[-1]).min(-1, keepdim=True).values
        limit = first + (n[:, None] if isinstance(n, torch.Tensor) else n)
        return masked & (cols >= first) & (cols < limit)
    if strategy == "entropy_bounded":
        return entropy_bounded_select(entropy, masked, eb_threshold)
    if strategy == "low_confidence_factor":
        return factor_select(confidence, masked, factor)
    if strategy == "low_confidence_dynamic":
        return threshold_select(confidence, masked, n, confidence_threshold)
    return _top_n(torch.where(masked, confidence, -torch.inf), masked, n)


def _check(model, prompt_ids, attention_mask, gen_length, block_length, denoising_steps, temperature,
           top_k, top_p, remasking_strategy, confidence_threshold, eb_threshold, factor):
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
    if not factor > 0 or factor == float("inf"):
        raise ValueError(f"factor must be a positive number, got {factor}")
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


def _pack_lanes(blocks: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows (by index) with ``blocks[i] > 0`` packed into lanes of
    ``capacity`` blocks; each lane lists its rows in placement order."""
    lanes: list[list[int]] = []
    fill: list[int] = []
    for row in sorted((i for i, b in enumerate(blocks) if b > 0), key=lambda i: -blocks[i]):
        for lane, used in enumerate(fill):
            if used + blocks[row] <= capacity:
                lanes[lane].append(row)
                fill[lane] += blocks[row]
                break
        else:
            lanes.append([row])
            fill.append(blocks[row])
    return lanes


def _packed_prefill(model, cache: SDARStaticCache, x, positions, shift: list[int], prefill_blocks: int,
                    bl: int, pad_id: int) -> None:
    """Prefill every row's prompt blocks (columns ``[shift_i * bl, prefill_blocks * bl)``, no padding
    there) in one forward: rows share lanes of ``prefill_blocks * bl`` slots, a slot attends the
    slots of its own row in its own and earlier blocks (the block-causal mask), and the keys and
    values are scattered to the rows' own cache columns. One row is one lane: the reference's
    prefill."""
    device = x.device
    lanes = _pack_lanes([prefill_blocks - s for s in shift], prefill_blocks)
    width = prefill_blocks * bl
    slot_row = torch.full((len(lanes), width), -1, dtype=torch.long)
    slot_col = torch.zeros((len(lanes), width), dtype=torch.long)
    for lane, rows in enumerate(lanes):
        offset = 0
        for row in rows:
            cols = torch.arange(shift[row] * bl, width)
            slot_row[lane, offset:offset + len(cols)] = row
            slot_col[lane, offset:offset + len(cols)] = cols
            offset += len(cols)
    slot_row, slot_col = slot_row.to(device), slot_col.to(device)
    used = slot_row >= 0
    row_idx = slot_row.clamp_min(0)
    ids = torch.where(used, x[row_idx, slot_col], pad_id)
    pos = torch.where(used, positions[row_idx, slot_col], 0)
    block = slot_col // bl
    mask = (slot_row[:, :, None] == slot_row[:, None, :]) & used[:, :, None] & \
        (block[:, None, :] <= block[:, :, None])
    mask |= torch.eye(width, dtype=torch.bool, device=device)  # empty slots attend themselves only
    packed = SDARCache()
    model(ids, attention_mask=mask[:, None], position_ids=pos, past_key_values=packed, store_kv=True,
          logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    lane_idx, slot_idx = used.nonzero(as_tuple=True)
    cache.load(packed, lane_idx, slot_idx, slot_row[lane_idx, slot_idx], slot_col[lane_idx, slot_idx], width)


@torch.no_grad()
def block_diffusion_generate(model, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             mask_id: int | None = None, gen_length: int = 128, block_length: int = 4,
                             denoising_steps: int = 4, temperature: float = 1.0, top_k: int = 0,
                             top_p: float = 1.0, remasking_strategy: str = "low_confidence_dynamic",
                             confidence_threshold: float = 0.85, eb_threshold: float | None = None,
                             factor: float = 1.0, stopping_criteria_idx=None,
                             generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate ``gen_length`` tokens after each (left-padded) prompt by block diffusion.

    prompt_ids: (B, P) int64, left-padded; attention_mask: (B, P), 1 on real tokens (None: all
    real). ``mask_id`` defaults to the config's ``mask_token_id``. ``stopping_criteria_idx``: a
    token id or list of ids; a row stops after the block in which one of them appears in its
    generated part (its remaining positions stay ``mask_id``). Greedy: ``temperature=1.0, top_k=1``
    (as in the reference) or ``temperature=0``. ``factor`` is used by ``low_confidence_factor``.
    See the module docstring for the strategies.
    """
    config = model.hf_config
    mask_id = config["mask_token_id"] if mask_id is None else int(mask_id)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    _check(model, prompt_ids, attention_mask, gen_length, block_length, denoising_steps, temperature, top_k,
           top_p, remasking_strategy, confidence_threshold, eb_threshold, factor)
    if isinstance(stopping_criteria_idx, int):
        stopping_criteria_idx = [stopping_criteria_idx]

    was_training = model.training
    model.eval()
    device = prompt_ids.device
    stops = torch.tensor(list(stopping_criteria_idx or []), dtype=torch.long, device=device)
    bsz, width = prompt_ids.shape
    bl = block_length
    real = torch.ones_like(prompt_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    lengths_list = real.sum(1).tolist()                    # P_i
    first = [p // bl for p in lengths_list]                # local index of the first block with masks
    n_blocks = [-(-(p + gen_length) // bl) for p in lengths_list]
    prefill_blocks = max(first)                            # global index of every row's first decode block
    shift = [prefill_blocks - f for f in first]            # whole blocks of internal left padding per row
    end_block = [s + n for s, n in zip(shift, n_blocks)]   # global index after each row's last block
    total = max(end_block) * bl

    lengths = torch.tensor(lengths_list, device=device)
    start = torch.tensor(shift, device=device) * bl        # column of each row's position 0
    cols = torch.arange(total, device=device)
    valid = cols >= start[:, None]                         # not internal padding
    positions = (cols - start[:, None]).clamp_min(0)
    pad_id = config.get("pad_token_id", config.get("eos_token_id"))
    pad_id = (pad_id[0] if isinstance(pad_id, list) else pad_id) or 0  # never attended
    in_prompt = valid & (cols < (start + lengths)[:, None])
    src = (cols - start[:, None] + (width - lengths)[:, None]).clamp(0, width - 1)
    x = torch.where(in_prompt, prompt_ids.gather(1, src), torch.where(valid, mask_id, pad_id))
    gen_begin = start + lengths
    unmask_step = torch.full((bsz, gen_length), -1, dtype=torch.long, device=device)
    steps_taken = torch.zeros(bsz, dtype=torch.long, device=device)
    greedy = temperature == 0 or top_k == 1
    # one row sampling: draw at every position of the block, as the reference (same random stream);
    # greedy or several rows (no reference stream to follow): only the masked positions
    reference_draws = not greedy and bsz == 1
    need_entropy = remasking_strategy == "entropy_bounded"
    no_logits = torch.empty(0, dtype=torch.long, device=device)

    cache = SDARStaticCache(bsz, total)
    nfe = 0
    if prefill_blocks > 0:
        _packed_prefill(model, cache, x, positions, shift, prefill_blocks, bl, pad_id)
        nfe += 1

    # n for a row's k-th step in a block; steps beyond the schedule unmask one token
    schedule = torch.cat([get_num_transfer_tokens(bl, denoising_steps), torch.ones(1, dtype=torch.long)]).to(device)
    # Every live row takes part in every forward, each in its own block: denoising it (it has masks)
    # or storing it (no masks left, a later block follows). A row that stops or ends leaves.
    live = torch.arange(bsz, device=device)                # original row of each cache row
    blk = torch.full((bsz,), prefill_blocks, dtype=torch.long, device=device)
    step = torch.zeros(bsz, dtype=torch.long, device=device)  # denoising steps taken in the current block
    storing = torch.zeros(bsz, dtype=torch.bool, device=device)
    end_block_t = torch.tensor(end_block, device=device)
    block_cols = torch.arange(bl, device=device)
    key_cols = torch.arange(total, device=device)
    cur = x[:, prefill_blocks * bl:(prefill_blocks + 1) * bl].clone()
    while live.numel():
        cols = blk[:, None] * bl + block_cols              # (r, bl) columns of each row's block
        hi = blk * bl + bl
        span = int(hi.max())
        masked = (cur == mask_id) & ~storing[:, None]
        key_mask = valid[live, :span] & (key_cols[:span] < hi[:, None])  # its cache and its block
        if reference_draws:  # one row: the whole block when denoising, as the reference draws
            keep = no_logits if bool(storing[0]) else 0
        else:
            keep = masked
        cache.columns, cache.span = cols, span
        try:
            logits = model(cur, attention_mask=key_mask[:, None, None, :].expand(len(live), 1, bl, span),
                           position_ids=positions[live].gather(1, cols), past_key_values=cache,
                           store_kv=bool(storing.all()), logits_to_keep=keep).logits
        finally:
            cache.columns = cache.span = None
        nfe += 1
        denoised = ~storing
        d = denoised.nonzero().flatten()
        if d.numel():
            m = masked[d]
            if reference_draws:
                x0, x0_p, probs = sample_tokens(logits, temperature, top_k, top_p, generator)
                entropy = _entropy(probs) if need_entropy else None
            else:  # logits of the masked positions only: (N, V)
                if greedy:
                    tok, p, ent = greedy_tokens(logits, temperature, top_k, top_p, generator, need_entropy)
                else:
                    tok, p, probs = sample_tokens(logits, temperature, top_k, top_p, generator)
                    ent = _entropy(probs) if need_entropy else None
                x0 = torch.full_like(m, mask_id, dtype=torch.long).masked_scatter(m, tok)
                x0_p = torch.zeros(m.shape, dtype=torch.float32, device=device).masked_scatter(m, p)
                entropy = None if ent is None else torch.zeros_like(x0_p).masked_scatter(m, ent)
            n = schedule[step[d].clamp(max=len(schedule) - 1)]
            select = _select(remasking_strategy, m, x0_p, entropy, n, confidence_threshold, eb_threshold, factor)
            cur[d] = torch.where(select, x0, cur[d])
            rows = live[d]
            gcol = cols[d] - gen_begin[rows, None]
            record = select & (gcol >= 0) & (gcol < gen_length)
            r, c = record.nonzero(as_tuple=True)
            unmask_step[rows[r], gcol[r, c]] = steps_taken[rows[r]]
            steps_taken[rows] += 1
            step[d] += 1
        stored = storing.nonzero().flatten()
        if stored.numel():                                 # committed: on to the next block
            blk[stored] += 1
            step[stored] = 0
            storing[stored] = False
            cur[stored] = x[live[stored]].gather(1, blk[stored, None] * bl + block_cols)
        complete = denoised & ~(cur == mask_id).any(-1)    # blocks with no masks left
        if not bool(complete.any()):
            continue
        c = complete.nonzero().flatten()
        x[live[c, None], cols[c]] = cur[c]
        finished = complete & (blk + 1 >= end_block_t[live])
        if len(stops):
            gcol = cols - gen_begin[live, None]
            in_gen = (gcol >= 0) & (gcol < gen_length)
            finished |= complete & (torch.isin(cur, stops) & in_gen).any(-1)
        storing |= complete & ~finished                    # a later block reads this one: store it next
        if bool(finished.any()):                           # finished rows leave every later forward
            kept = (~finished).nonzero().flatten()
            live, blk, step, storing, cur = live[kept], blk[kept], step[kept], storing[kept], cur[kept]
            cache.keep(kept)

    idx = gen_begin[:, None] + torch.arange(gen_length, device=device)
    sequences = torch.cat([prompt_ids, x.gather(1, idx)], dim=1)
    if was_training:
        model.train()
    return GenerationOutput(sequences=sequences, unmask_step=unmask_step, nfe=nfe)
