"""SDAR fast rollout: parallel decoding rules, the batched sampler's work, the static KV cache."""
from __future__ import annotations

import pytest
import torch

import dare
import dare_plugins.sdar.sampler as sdar_sampler
from dare_plugins.sdar.modeling import SDARCache, SDARForCausalLM, SDARStaticCache, block_causal_mask, tiny_config
from dare_plugins.sdar.sampler import block_diffusion_generate, factor_select, threshold_select

MASK = 63  # mask id of the in-code tiny models
GREEDY = dict(temperature=1.0, top_k=1)
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [31, 32, 33, 34, 35, 36],
           [41], [51, 52, 53, 54, 55, 56, 57, 58, 59, 1, 2, 3, 4, 5, 6, 7, 8, 9]]


def tiny_model(seed: int = 0, **overrides) -> SDARForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=64, mask_token_id=MASK, bos_token_id=0, eos_token_id=0, **overrides)
    model = SDARForCausalLM(config)
    with torch.no_grad():  # sharper attention and logits than the default init
        model.model.embed_tokens.weight.normal_()
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(2.0)
            layer.self_attn.k_norm.weight.fill_(2.0)
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        am[i, width - len(p):] = 1
    return ids, am


class Recorder(torch.nn.Module):
    """Wraps a model; records (batch size, number of input positions, store_kv) of every forward."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.hf_config = model.hf_config
        self.calls = []

    def forward(self, ids, **kw):
        self.calls.append((ids.shape[0], ids.shape[1], bool(kw.get("store_kv"))))
        return self.inner(ids, **kw)


@pytest.fixture
def soft_greedy(monkeypatch):
    """Greedy tokens with non-degenerate confidences: the argmax and its unfiltered softmax
    probability (with top_k=1 the reference's confidence is always exactly 1, so the threshold
    rules would commit whole blocks at once). Deterministic, so batch == rows alone is testable."""
    def fake(logits, temperature=1.0, top_k=1, top_p=1.0, generator=None, need_entropy=False):
        probs = logits.float().softmax(-1)
        conf, tokens = probs.max(-1)
        return tokens, conf, None
    monkeypatch.setattr(sdar_sampler, "greedy_tokens", fake)


# --- the selection rules on hand-made confidences ----------------------------------------------


def test_factor_rule_on_hand_made_confidences():
    conf = torch.tensor([0.9, 0.99, 0.5, 0.8, 1.0])
    masked = torch.tensor([True, True, True, True, False])
    # masked, sorted: c = 0.99, 0.9, 0.8, 0.5 -> (n+1)(1-c_n) = 0.02, 0.3, 0.8, 2.5
    assert factor_select(conf, masked, 1.0).tolist() == [True, True, False, True, False]
    assert factor_select(conf, masked, 0.5).tolist() == [True, True, False, False, False]
    assert factor_select(conf, masked, 0.29).tolist() == [False, True, False, False, False]  # 0.3 > 0.29 fails
    assert factor_select(conf, masked, 0.01).tolist() == [False, True, False, False, False]  # at least one
    assert factor_select(conf, masked, 3.0).tolist() == [True, True, True, True, False]  # never unmasked ones
    # rows at once, each with its own count
    rows = factor_select(torch.stack([conf, conf.flip(0)]), torch.stack([masked, masked.flip(0)]), 0.5)
    assert rows.tolist() == [[True, True, False, False, False], [False, False, False, True, True]]


def test_factor_rule_is_the_largest_n():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        conf = torch.rand(8, generator=gen) ** 0.3
        masked = torch.rand(8, generator=gen) < 0.7
        masked[int(torch.randint(0, 8, (1,), generator=gen))] = True
        factor = float(torch.rand(1, generator=gen)) * 3
        c = conf[masked].sort(descending=True).values
        good = [n for n in range(1, len(c) + 1) if (n + 1) * (1 - float(c[n - 1])) <= factor]
        n = max(good, default=1)
        select = factor_select(conf, masked, factor)
        assert int(select.sum()) == n and not (select & ~masked).any()
        assert float(conf[select].min()) >= float(c[n - 1])  # the n most confident


def test_threshold_rule_on_hand_made_confidences():
    conf = torch.tensor([[0.95, 0.2, 0.9, 0.1, 0.99]])
    masked = torch.tensor([[True, True, True, True, False]])
    assert threshold_select(conf, masked, 1, 0.85).tolist() == [[True, False, True, False, False]]
    assert threshold_select(conf, masked, 1, 0.99).tolist() == [[True, False, False, False, False]]  # >= 1
    assert threshold_select(conf, masked, 3, 0.85).tolist() == [[True, True, True, False, False]]  # schedule
    assert threshold_select(conf, masked, 1, 0.0).tolist() == [[True, True, True, True, False]]


# --- the rules inside generation ---------------------------------------------------------------


@pytest.mark.parametrize("strategy, extra", [
    ("low_confidence_dynamic", {"confidence_threshold": 0.3}),
    ("low_confidence_factor", {"factor": 1.0}),
])
def test_every_step_commits_at_least_one_and_all_above_threshold(monkeypatch, strategy, extra):
    seen = []
    select = sdar_sampler._select

    def recording(strategy, masked, confidence, *args):
        chosen = select(strategy, masked, confidence, *args)
        seen.append((masked.clone(), confidence.clone(), chosen.clone()))
        return chosen
    monkeypatch.setattr(sdar_sampler, "_select", recording)
    ids, am = left_pad(PROMPTS)
    block_diffusion_generate(tiny_model(), ids, attention_mask=am, gen_length=16, block_length=8, denoising_steps=8,
                             remasking_strategy=strategy, generator=torch.Generator().manual_seed(0), **extra)
    assert seen
    parallel = 0
    for masked, conf, chosen in seen:
        assert masked.any(-1).all()  # only rows with masks left take part in a step
        assert (chosen.sum(-1) >= 1).all() and not (chosen & ~masked).any()
        if strategy == "low_confidence_dynamic":
            assert not (masked & (conf > 0.3) & ~chosen).any()  # every masked position above it
        else:
            n = chosen.sum(-1)
            c = torch.where(masked, conf, -1.0).sort(-1, descending=True).values
            cn = c.gather(-1, (n - 1)[:, None]).squeeze(-1)
            assert ((n == 1) | ((n + 1) * (1 - cn) < 1.0)).all()
        parallel += int((chosen.sum(-1) > 1).sum())
    assert parallel > 0  # the rule did commit several tokens in one step somewhere


@pytest.mark.parametrize("strategy, extra", [
    ("low_confidence_dynamic", {"confidence_threshold": 0.5}),
    ("low_confidence_factor", {"factor": 1.0}),
])
def test_threshold_needs_fewer_forwards_than_the_static_schedule(strategy, extra):
    model = tiny_model(seed=1)
    prompt = torch.tensor([PROMPTS[1]])
    kwargs = dict(gen_length=32, block_length=8, denoising_steps=8)
    static = block_diffusion_generate(model, prompt, remasking_strategy="low_confidence_static",
                                      generator=torch.Generator().manual_seed(0), **kwargs)
    fast = block_diffusion_generate(model, prompt, remasking_strategy=strategy,
                                    generator=torch.Generator().manual_seed(0), **kwargs, **extra)
    assert not (fast.sequences == MASK).any()
    assert fast.nfe < static.nfe
    # greedy (top_k=1): every confidence is exactly 1, so each block takes one denoising step
    greedy = block_diffusion_generate(model, prompt, remasking_strategy=strategy, **kwargs, **extra, **GREEDY)
    assert greedy.nfe == 1 + 5 + 4 and (greedy.unmask_step[0] == torch.arange(32).add(3) // 8).all()


def test_threshold_fewer_forwards_with_soft_greedy(soft_greedy):
    model = tiny_model(seed=1)
    prompt = torch.tensor([PROMPTS[1]])
    kwargs = dict(gen_length=32, block_length=8, denoising_steps=8, **GREEDY)
    static = block_diffusion_generate(model, prompt, remasking_strategy="low_confidence_static", **kwargs)
    for strategy, extra in [("low_confidence_dynamic", {"confidence_threshold": 0.5}),
                            ("low_confidence_factor", {"factor": 1.0})]:
        fast = block_diffusion_generate(model, prompt, remasking_strategy=strategy, **kwargs, **extra)
        assert fast.nfe < static.nfe, strategy


# --- batches: rows equal rows alone, and no work on rows that have nothing to do ---------------


def assert_rows_alone(model, prompts, batch, **kwargs):
    ids, _ = left_pad(prompts)
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        alone = dare.generate(model, torch.tensor([p]), **kwargs)
        assert torch.equal(batch.sequences[i, width - len(p):], alone.sequences[0]), i
        assert torch.equal(batch.sequences[i, :width], ids[i]), i
        assert torch.equal(batch.unmask_step[i], alone.unmask_step[0]), i


@pytest.mark.parametrize("strategy, block, steps", [
    ("low_confidence_dynamic", 4, 4), ("low_confidence_factor", 4, 4),
    ("low_confidence_dynamic", 8, 2), ("low_confidence_factor", 8, 8),
])
def test_batch_equals_rows_alone_greedy(strategy, block, steps):
    model = tiny_model(seed=2)
    ids, am = left_pad(PROMPTS)
    kwargs = dict(gen_length=16, block_length=block, denoising_steps=steps, remasking_strategy=strategy,
                  confidence_threshold=0.5, factor=1.0, **GREEDY)
    batch = dare.generate(model, ids, attention_mask=am, **kwargs)
    assert not (batch.sequences == MASK).any()
    assert_rows_alone(model, PROMPTS, batch, **kwargs)


@pytest.mark.parametrize("strategy", ["low_confidence_dynamic", "low_confidence_factor", "low_confidence_static",
                                      "sequential"])
def test_batch_equals_rows_alone_soft_greedy_and_wastes_no_row_forwards(soft_greedy, strategy):
    """With confidences that differ per row, rows need different numbers of steps per block; each
    row moves on as soon as its block is done, so the batch runs exactly the row-forwards the rows
    run alone (apart from the one packed prefill), in as many forwards as the slowest row."""
    model = tiny_model(seed=2)
    ids, am = left_pad(PROMPTS)
    kwargs = dict(gen_length=16, block_length=8, denoising_steps=8, remasking_strategy=strategy,
                  confidence_threshold=0.5, factor=1.0, **GREEDY)
    recorder = Recorder(model)
    batch = block_diffusion_generate(recorder, ids, attention_mask=am, **kwargs)
    assert_rows_alone(model, PROMPTS, batch, **kwargs)
    batch_rows = sum(b for b, _, _ in recorder.calls[1:])
    alone_rows, alone_calls = 0, []
    for p in PROMPTS:
        alone = Recorder(model)
        block_diffusion_generate(alone, torch.tensor([p]), **kwargs)
        prefilled = len(p) >= 8
        alone_rows += sum(b for b, _, _ in alone.calls[int(prefilled):])
        alone_calls.append(alone.calls)
    assert batch_rows == alone_rows
    assert batch.nfe == len(recorder.calls)
    # rows never wait for each other: the batch takes as many forwards as its slowest row
    assert batch.nfe == 1 + max(len(c) - int(len(p) >= 8) for c, p in zip(alone_calls, PROMPTS))


def test_packed_prefill_computes_no_padding_blocks():
    model = tiny_model(seed=3)
    prompts = [[5] * 17, [6] * 9, [7] * 8, [8] * 3, [9] * 1]  # 4, 2, 2, 0, 0 prompt blocks of 4
    ids, am = left_pad(prompts)
    recorder = Recorder(model)
    kwargs = dict(gen_length=8, block_length=4, remasking_strategy="sequential", **GREEDY)
    batch = block_diffusion_generate(recorder, ids, attention_mask=am, **kwargs)
    lanes, width, store = recorder.calls[0]
    assert store and width == 16 and lanes == 2  # 4 + 2 + 2 blocks in lanes of 4 (not 5 rows x 4)
    assert_rows_alone(model, prompts, batch, **kwargs)


def test_stopped_rows_leave_every_later_forward():
    model = tiny_model(seed=1)
    kwargs = dict(gen_length=24, block_length=4, denoising_steps=4, remasking_strategy="sequential", **GREEDY)
    prompt = [11, 12, 13, 14, 15, 16]
    full = dare.generate(model, torch.tensor([prompt]), **kwargs)
    stop = int(full.sequences[0, 6 + 4])  # a token of the row's second generated block
    prompts = [prompt, [51, 52, 53, 54], [61, 62, 63 - 1, 60, 59, 58, 57, 56, 55]]
    ids, am = left_pad(prompts)
    recorder = Recorder(model)
    batch = block_diffusion_generate(recorder, ids, attention_mask=am, stopping_criteria_idx=[stop], **kwargs)
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        alone = dare.generate(model, torch.tensor([p]), stopping_criteria_idx=[stop], **kwargs)
        assert torch.equal(batch.sequences[i, width - len(p):], alone.sequences[0]), i
        assert torch.equal(batch.unmask_step[i], alone.unmask_step[0]), i
    # row 0 stopped: later blocks stay mask_id (as the reference leaves them) and are never computed
    gen0 = batch.sequences[0, width:]
    stop_at = int((gen0 == stop).nonzero()[0])
    end = (len(prompt) + stop_at) // 4 * 4 + 4 - len(prompt)  # end of the stopping block (generated index)
    assert (gen0[end:] == MASK).all() and (batch.unmask_step[0, end:] == -1).all()
    sizes = [b for b, _, _ in recorder.calls[1:]]
    assert sizes[0] == 3 and sizes[-1] < 3  # rows leave the batch once they stop


# --- exactness details ------------------------------------------------------------------------


def test_block_length_other_than_the_config_block_size():
    """Decoding attends the whole cache and the whole current block (block_length, not the config's
    block_size): a denoising step's logits == the block-causal forward (blocks of 8) of the prefix,
    and sequential greedy == recomputing the prefix with that mask each step."""
    model = tiny_model(seed=2)  # config block_size 4
    prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    seen = []

    class Steps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf_config = model.hf_config

        def forward(self, ids, **kw):
            out = model(ids, **kw)
            if not kw.get("store_kv"):
                seen.append((ids.clone(), out.logits.clone()))
            return out

    block_diffusion_generate(Steps(), torch.tensor([prompt]), gen_length=16, block_length=8, denoising_steps=8,
                             remasking_strategy="low_confidence_static", generator=torch.Generator().manual_seed(0))
    ids, logits = seen[0]  # the first step of block 1 (positions 8..15): prompt tail, then masks
    with torch.no_grad():
        full = model(torch.cat([torch.tensor([prompt[:8]]), ids], 1), attention_mask=block_causal_mask(16, 8)).logits
    assert (logits - full[:, 8:]).abs().max() < 1e-4

    out = dare.generate(model, torch.tensor([prompt]), gen_length=16, block_length=8, denoising_steps=8,
                        remasking_strategy="sequential", **GREEDY)
    x = torch.tensor([prompt + [MASK] * 21])
    with torch.no_grad():
        while (x == MASK).any():
            pos = int((x[0] == MASK).nonzero()[0])
            hi = (pos // 8 + 1) * 8
            logits = model(x[:, :hi], attention_mask=block_causal_mask(hi, 8)).logits
            x[0, pos] = logits[0, pos].argmax()
    assert torch.equal(out.sequences[0], x[0, :27])


def test_greedy_takes_the_argmax_without_drawing():
    logits = torch.randn(6, 64)
    state = torch.get_rng_state()
    tokens, probs, entropy = sdar_sampler.greedy_tokens(logits, need_entropy=True)
    assert torch.equal(torch.get_rng_state(), state)
    ref_tokens, ref_probs, _ = sdar_sampler.sample_tokens(logits[None], top_k=1)
    assert torch.equal(tokens, ref_tokens[0]) and torch.equal(probs, ref_probs[0])
    assert (probs == 1).all() and (entropy == 0).all()
    logits[2, 5] = logits[2, 9] = logits[2].max() + 1  # a tie: drawn among the tied, probability 1/2
    tokens, probs, entropy = sdar_sampler.greedy_tokens(logits, need_entropy=True)
    assert int(tokens[2]) in (5, 9) and float(probs[2]) == 0.5 and abs(float(entropy[2]) - 0.6931) < 1e-3


def test_static_cache_equals_the_growing_cache():
    model = tiny_model()
    ids = torch.randint(0, 62, (3, 12))
    with torch.no_grad():
        full = model(ids).logits  # block-causal over the whole sequence
        grow = model(ids[:, :8], attention_mask=block_causal_mask(8, 4), store_kv=True).past_key_values
        # appending, as SDARCache
        static = SDARStaticCache(3, 16)
        model(ids[:, :8], attention_mask=block_causal_mask(8, 4), past_key_values=static, store_kv=True)
        assert static.get_seq_length() == 8 and len(static) == 2
        step = model(ids[:, 8:], attention_mask=torch.ones(4, 12, dtype=torch.bool), past_key_values=static)
        assert static.get_seq_length() == 8 and (step.logits - full[:, 8:]).abs().max() < 1e-5
        assert torch.equal(static.keys[1][:, :, :8], grow.keys[1])
        # per-row columns: rows 0 and 2 decode block 2 while row 1 recomputes block 1
        cols = torch.tensor([[8, 9, 10, 11], [4, 5, 6, 7], [8, 9, 10, 11]])
        key_mask = torch.arange(12)[None, :] < cols[:, -1:] + 1  # each row: its cache and its block
        static.columns, static.span = cols, 12
        keep = torch.tensor([[True, False, False, True], [False, True, False, False], [True] * 4])
        out = model(ids.gather(1, cols), attention_mask=key_mask[:, None, None, :].expand(3, 1, 4, 12),
                    position_ids=cols, past_key_values=static, logits_to_keep=keep).logits
        static.columns = static.span = None
        assert out.shape == (7, 64)  # only the kept positions, row-major
        expected = torch.stack([full[0, 8], full[0, 11], full[1, 5], *full[2, 8:12]])
        assert (out - expected).abs().max() < 1e-5
        static.keep(torch.tensor([1]))
        assert static.keys[0].shape[0] == 1  # row 1 (its block 1 rewritten with the same tokens)
        assert (static.keys[1][0, :, :8] - grow.keys[1][1]).abs().max() < 1e-5
        none = model(ids[:, :4], logits_to_keep=torch.empty(0, dtype=torch.long))
        assert none.logits.shape == (3, 0, 64)
        assert (model(ids, logits_to_keep=2).logits - full[:, -2:]).abs().max() < 1e-5
        assert isinstance(grow, SDARCache)


def test_factor_must_be_positive():
    with pytest.raises(ValueError, match="factor"):
        block_diffusion_generate(tiny_model(), torch.tensor([[1, 2, 3]]), remasking_strategy="low_confidence_factor",
                                 factor=0.0)
