"""dream_fast: Fast-dLLM-style blocks, prefix/dual KV cache, threshold/factor decoding for Dream."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

import dare
from dare.plugins import PluginManager
from dare_plugins import dream
from dare_plugins.dream.fast import factor_selection, fast_diffusion_generate, threshold_selection
from dare_plugins.dream.modeling import build, tiny_config
from dare_plugins.dream.sampler import ALGORITHMS, diffusion_generate, sample_tokens

FIXTURE = ("fixtures", "dream-tiny")
VOCAB, MASK, EOS = 512, 511, 510


def _tiny(scale: float = 1.0, seed: int = 0, **overrides):
    """An in-code float32 Dream with a small vocabulary; ``scale`` sharpens the LM head (a random
    model is otherwise never confident, so threshold decoding would commit one token per step)."""
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=VOCAB, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS,
                         bos_token_id=EOS, **overrides)
    model = build(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@functools.lru_cache(maxsize=None)
def _plain():
    return _tiny()


@functools.lru_cache(maxsize=None)
def _sharp():
    return _tiny(scale=50.0)


def _prompts(batch=2, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 12, (batch, length), generator=g)


def _padded():
    """Two rows, the first left-padded by 3, and the rows alone."""
    ids = _prompts(2, 7)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = EOS, 0
    return ids, mask, [ids[0, 3:], ids[1]]


def _assert_same(a, b):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.unmask_step, b.unmask_step)
    assert a.nfe == b.nfe


def _replay_inputs(out, prompt_len, step):
    """The sequence the model saw at ``step`` (positions committed later are masks again)."""
    x = out.sequences.clone()
    gen = x[:, prompt_len:]
    gen[(out.unmask_step >= step) | (out.unmask_step < 0)] = MASK
    return x


# --- registration and argument checks ---------------------------------------------------------


def test_registered_next_to_the_reference_sampler():
    reg = PluginManager(plugins=[dream], entry_points=False).registry
    entry = reg.samplers.get("dream_fast")
    assert entry.fn is fast_diffusion_generate and entry.families == ("dream",) and entry.description
    assert reg.samplers.get("dream").fn is diffusion_generate
    assert reg.families.get("dream").default_sampler == "dream"


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_length=5), "divisible by block_length"),
    (dict(block_length=0), "block_length must be a positive int"),
    (dict(cache="full"), "cache must be one of"),
    (dict(threshold=0.9, factor=1.0), "not both"),
    (dict(threshold=1.5), "threshold must be"),
    (dict(threshold=True), "threshold must be"),
    (dict(factor=0.0), "factor must be"),
    (dict(block_length=4, steps=3), "divisible by the number of blocks"),
    (dict(threshold=0.9, alg="entropy"), "not compatible"),
    (dict(factor=1.0, alg="topk_margin"), "not compatible"),
    (dict(threshold=0.9, alg_temp=0.5), "alg_temp"),
    (dict(stop_at_eos="yes"), "stop_at_eos must be a bool"),
    (dict(alg="nope"), "alg must be one of"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(max_new_tokens=1000), "max_position_embeddings"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = dict(max_new_tokens=8, steps=4) | kwargs
    with pytest.raises(ValueError, match=match):
        fast_diffusion_generate(_plain(), _prompts(1), **args)


def test_cache_needs_a_native_dream_model():
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.hf_config = inner, inner.hf_config

        def forward(self, *a, **kw):
            return self.inner(*a, **kw)

    wrapped = Wrapper(_plain())
    prompt = _prompts(1)
    _assert_same(fast_diffusion_generate(wrapped, prompt, max_new_tokens=8, steps=4, alg="maskgit_plus"),
                 fast_diffusion_generate(_plain(), prompt, max_new_tokens=8, steps=4, alg="maskgit_plus"))
    with pytest.raises(ValueError, match="native Dream model"):
        fast_diffusion_generate(wrapped, prompt, max_new_tokens=8, steps=4, cache="dual")


# --- exact mode == the reference sampler ------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_exact_mode_equals_reference_greedy(alg):
    model = _plain()
    if alg == "confidence_threshold":  # batch size 1 in the reference
        cases = [dict(prompt_ids=_prompts(1))]
    else:
        ids, mask, _ = _padded()
        cases = [dict(prompt_ids=_prompts(2)), dict(prompt_ids=ids, attention_mask=mask)]
    for case in cases:
        kwargs = dict(max_new_tokens=12, steps=6, alg=alg, temperature=0.0, **case)
        torch.manual_seed(3)  # `origin` draws its commit decisions from the global RNG, also when greedy
        ref = diffusion_generate(model, **kwargs)
        torch.manual_seed(3)
        fast = fast_diffusion_generate(model, block_length=12, cache="none", threshold=None, factor=None, **kwargs)
        _assert_same(ref, fast)
        assert fast.nfe == 6 or alg == "confidence_threshold"


@pytest.mark.parametrize("kwargs", [
    dict(alg="origin", temperature=0.7, top_p=0.9),
    dict(alg="maskgit_plus", temperature=1.0, top_k=20, alg_temp=0.5),
    dict(alg="entropy", temperature=0.5),
])
def test_exact_mode_makes_the_reference_random_draws(kwargs):
    model, prompt = _plain(), _prompts(2)
    torch.manual_seed(7)
    ref = diffusion_generate(model, prompt, max_new_tokens=8, steps=4, **kwargs)
    gen = torch.Generator().manual_seed(7)
    fast = fast_diffusion_generate(model, prompt, max_new_tokens=8, steps=4, generator=gen, **kwargs)
    _assert_same(ref, fast)


def test_exact_mode_reproduces_the_golden(shared):
    folder = shared(*FIXTURE)
    meta = json.loads((folder / "golden" / "diffusion_generate_b1_entropy_steps32.json").read_text())
    g = load_file(str(folder / "golden" / "diffusion_generate_b1_entropy_steps32.safetensors"))
    model = dare.load_model(folder, dtype=torch.float32)
    kwargs = {k: v for k, v in meta["kwargs"].items() if k not in ("output_history", "return_dict_in_generate")}
    out = dare.generate(model, g["prompt_ids"], sampler="dream_fast", **kwargs)
    assert torch.equal(out.sequences, g["output_ids"])
    assert torch.equal(out.unmask_step, g["unmask_step"])
    assert out.nfe == meta["decision_diagnostics"]["n_forward_calls"]


# --- KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True])
def test_cached_window_right_after_the_build_equals_the_full_forward(padded):
    model = _plain()
    prompt_len, block, total = 7, 4, 7 + 12
    ids, mask, _ = _padded()
    x = torch.cat([ids, torch.randint(0, VOCAB - 12, (2, total - prompt_len))], 1)
    x[:, prompt_len + 5:] = MASK  # a partly committed sequence
    if padded:
        keys = torch.cat([mask, torch.ones(2, total - prompt_len, dtype=torch.long)], 1).bool()
        pos = keys.long().cumsum(-1) - 1
        pos.masked_fill_(~keys, 1)
        attn = keys[:, None, None, :] & keys[:, None, :, None]
    else:
        keys = pos = attn = None
    with torch.no_grad():
        full = model(x, attention_mask=attn, position_ids=pos).logits
        for start in (prompt_len, prompt_len + block):
            for end in (start + block, total):  # dual window, prefix window
                cache = model.new_kv_cache(2, total)
                built = model.forward_cached(x, cache, 0, attention_mask=attn, position_ids=pos).logits
                torch.testing.assert_close(built, full, atol=1e-6, rtol=0)
                window = model.forward_cached(
                    x[:, start - 1:end], cache, start - 1, attention_mask=keys,
                    position_ids=None if pos is None else pos[:, start - 1:end],
                ).logits
                assert window.shape == (2, end - start + 1, VOCAB)
                # rows before the block's positions: the logits that score the block (shifted)
                torch.testing.assert_close(window[:, :-1], full[:, start - 1:end - 1], atol=1e-5, rtol=0)
                if not padded:
                    continue
                rows, cols = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 3])
                picked = model.forward_cached(x[:, start - 1:end], cache, start - 1, attention_mask=keys,
                                              position_ids=pos[:, start - 1:end], logits_index=(rows, cols)).logits
                torch.testing.assert_close(picked, full[rows, start - 1 + cols], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_schedule_runs_the_same_steps(cache):
    """Without threshold/factor a cache changes only the logits, not the schedule."""
    model, prompt = _plain(), _prompts(2)
    kwargs = dict(max_new_tokens=16, steps=8, block_length=4, alg="maskgit_plus")
    exact = fast_diffusion_generate(model, prompt, **kwargs)
    cached = fast_diffusion_generate(model, prompt, cache=cache, **kwargs)
    assert cached.nfe == exact.nfe == 8
    assert torch.equal(torch.bincount(cached.unmask_step.flatten(), minlength=8),
                       torch.bincount(exact.unmask_step.flatten(), minlength=8))
    assert not (cached.sequences == MASK).any()
    # the first step of each block is a full forward: same commits as without a cache
    first = exact.unmask_step == 0
    assert torch.equal(cached.unmask_step == 0, first)
    assert torch.equal(cached.sequences[:, 6:][first], exact.sequences[:, 6:][first])


# --- parallel decoding ------------------------------------------------------------------------


def test_threshold_selection_rule():
    conf = torch.tensor([[0.5, 0.95, -torch.inf, 0.91, 0.2],
                         [0.3, 0.6, 0.1, -torch.inf, 0.5],
                         [-torch.inf] * 5,
                         [0.9, 0.9, 0.95, 0.0, 0.99]])
    chosen = threshold_selection(conf, 0.9)
    assert chosen.tolist() == [[False, True, False, True, False],
                               [False, True, False, False, False],  # none above: the most confident
                               [False] * 5,  # no candidate, nothing
                               [True, True, True, False, True]]  # >= threshold (Fast-dLLM's comparison)


def _factor_loop(conf, factor):
    """Fast-dLLM's factor loop on one row (without its commit-the-last-one quirk)."""
    c = sorted([v for v in conf if v > float("-inf")], reverse=True)
    n = 0
    for k, value in enumerate(c, start=1):
        if k > 1 and (k + 1) * (1 - value) > factor:
            break
        n = k
    return n


def test_factor_selection_rule():
    conf = torch.tensor([[0.5, 0.99, 0.9, -torch.inf, 0.95],
                         [0.5, 0.99, 0.9, -torch.inf, 0.95],
                         [0.1, 0.2, -torch.inf, 0.3, 0.05],
                         [-torch.inf] * 5])
    factors = [1.0, 0.3, 1.0, 1.0]
    for row, factor in zip(conf, factors):
        chosen = factor_selection(row[None], factor)[0]
        # (n+1)(1-c_n): 0.02, 0.15, 0.4, 2.5 -> factor 1 takes 3, factor 0.3 takes 2
        assert int(chosen.sum()) == _factor_loop(row.tolist(), factor)
        if chosen.any():  # the chosen ones are the most confident
            rest = row[~chosen & (row > -torch.inf)]
            assert rest.numel() == 0 or row[chosen].min() >= rest.max()
    assert factor_selection(conf[:1], 1.0)[0].tolist() == [False, True, True, False, True]
    assert factor_selection(conf[1:2], 0.3)[0].tolist() == [False, True, False, False, True]
    assert factor_selection(conf[2:3], 1.0)[0].tolist() == [False, False, False, True, False]
    assert not factor_selection(conf[3:], 1.0).any()
    rand = torch.rand(6, 40)
    for factor in (0.5, 1.0, 3.0):
        got = factor_selection(rand, factor).sum(-1).tolist()
        assert got == [_factor_loop(r.tolist(), factor) for r in rand]


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_threshold_commits_at_least_one_and_only_confident_ones(cache):
    model, prompt, threshold = _sharp(), _prompts(1), 0.9
    out = fast_diffusion_generate(model, prompt, max_new_tokens=16, block_length=8, cache=cache, threshold=threshold)
    assert not (out.sequences == MASK).any()
    per_step = torch.bincount(out.unmask_step.flatten(), minlength=out.nfe)
    assert per_step.shape == (out.nfe,) and (per_step >= 1).all()
    assert out.nfe < 16 and per_step.max() > 1
    if cache != "none":
        return
    # replay every step with the full forward: what was committed is {conf >= threshold} or the best
    plen = prompt.shape[1]
    for step in range(out.nfe):
        x = _replay_inputs(out, plen, step)
        with torch.no_grad():
            logits = model(x).logits
        masked = (x[0, plen:] == MASK).nonzero(as_tuple=True)[0]
        conf, tok = sample_tokens(logits[0, plen + masked - 1])
        now = out.unmask_step[0, masked] == step
        first_block_open = bool((x[0, plen:plen + 8] == MASK).any())
        in_block = masked < 8 if first_block_open else masked >= 8
        above = in_block & (conf >= threshold)
        best = torch.where(in_block, conf, -1.0).argmax()
        expected = above.clone()
        expected[best] = True
        assert torch.equal(now, expected), step
        assert torch.equal(out.sequences[0, plen + masked[now]], tok[now])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", [dict(threshold=0.9), dict(factor=1.0)])
def test_cached_parallel_decoding_end_to_end(cache, rule):
    model, prompt = _sharp(), _prompts(2)
    base = fast_diffusion_generate(model, prompt, max_new_tokens=32, steps=32, block_length=8, alg="maskgit_plus")
    out = fast_diffusion_generate(model, prompt, max_new_tokens=32, block_length=8, cache=cache, **rule)
    assert out.sequences.shape == (2, 6 + 32) and torch.equal(out.sequences[:, :6], prompt)
    assert not (out.sequences == MASK).any()
    assert (out.unmask_step >= 0).all() and (out.unmask_step < out.nfe).all()
    assert 4 <= out.nfe < base.nfe == 32
    # blocks are decoded left to right: a block's last commit precedes the next block's first
    blocks = out.unmask_step.view(2, 4, 8)
    assert (blocks.amax(-1)[:, :-1] < blocks.amin(-1)[:, 1:]).all()


def test_dare_generate_runs_dream_fast():
    out = dare.generate(_sharp(), _prompts(1), sampler="dream_fast", max_new_tokens=16, block_length=8,
                        cache="dual", threshold=0.9)
    assert out.sequences.shape == (1, 22) and out.nfe < 16


# --- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_left_padded_batch_row_equals_row_alone(cache):
    model = _sharp()
    ids, mask, rows = _padded()
    schedule = dict(max_new_tokens=16, steps=8, block_length=8, alg="maskgit_plus", cache=cache)
    parallel = dict(max_new_tokens=16, block_length=8, cache=cache, threshold=0.9)
    for kwargs in (schedule, parallel):
        batch = fast_diffusion_generate(model, ids, attention_mask=mask, **kwargs)
        for i, row in enumerate(rows):
            alone = fast_diffusion_generate(model, row[None], **kwargs)
            assert torch.equal(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(row):])
            assert torch.equal(batch.sequences[i, :ids.shape[1]], ids[i])
            if kwargs is schedule:  # steps are shared; with a threshold a row may wait for the other
                assert torch.equal(batch.unmask_step[i], alone.unmask_step[0])


# --- stop_at_eos ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_stop_at_eos_finishes_rows_and_fills_eos(cache):
    model, prompt = _sharp(), _prompts(2)
    kwargs = dict(max_new_tokens=32, block_length=8, cache=cache, threshold=0.9)
    full = fast_diffusion_generate(model, prompt, **kwargs)
    gen = full.sequences[:, 6:]
    # an "EOS": a token row 0 makes in its first block and row 1 never makes
    eos = next(int(t) for t in gen[0, :8] if not (gen[1] == t).any())
    model.hf_config["eos_token_id"] = eos
    try:
        out = fast_diffusion_generate(model, prompt, stop_at_eos=True, **kwargs)
        explicit = fast_diffusion_generate(model, prompt, stop_at_eos=True, eos_token_id=eos, **kwargs)
    finally:
        model.hf_config["eos_token_id"] = EOS
    _assert_same(out, explicit)
    assert out.nfe <= full.nfe
    # row 1 never finishes: it is generated exactly as without stop_at_eos
    assert torch.equal(out.sequences[1], full.sequences[1])
    # row 0: identical up to its first EOS; after it, tokens committed before the stop, or EOS (step -1)
    first = int((gen[0] == eos).nonzero()[0])
    row = out.sequences[0, 6:]
    assert torch.equal(row[:first + 1], gen[0, :first + 1])
    after = out.unmask_step[0, first + 1:]
    filled = after == -1
    assert filled.any() and (row[first + 1:][filled] == eos).all()
    assert torch.equal(row[first + 1:][~filled], gen[0, first + 1:][~filled])
    assert torch.equal(after[~filled], full.unmask_step[0, first + 1:][~filled])
    assert not (out.sequences == MASK).any()


@pytest.mark.parametrize("rule", [dict(threshold=0.9), dict(steps=16, alg="maskgit_plus")])
def test_stop_at_eos_single_row_saves_forwards(rule):
    model, prompt = _sharp(), _prompts(1)
    kwargs = dict(max_new_tokens=32, block_length=8, cache="dual", **rule)
    full = fast_diffusion_generate(model, prompt, **kwargs)
    eos = int(full.sequences[0, 6 + 2])  # a token of the first block
    out = fast_diffusion_generate(model, prompt, stop_at_eos=True, eos_token_id=eos, **kwargs)
    assert out.nfe < full.nfe
    row = out.sequences[0, 6:]
    first = int((row == eos).nonzero()[0])
    assert first < 8 and (row[8:] == eos).all() and (out.unmask_step[0, 8:] == -1).all()


def test_cached_decoding_through_a_peft_wrapper():
    pytest.importorskip("peft")
    from dare.lora import apply_lora

    model = _tiny(scale=50.0)
    prompt = _prompts(1)
    kwargs = dict(max_new_tokens=16, block_length=8, cache="dual", threshold=0.9)
    plain = fast_diffusion_generate(model, prompt, **kwargs)
    wrapped = apply_lora(model, 4, 8, 0.0, list(dream.LORA_TARGET_MODULES)).eval()
    _assert_same(fast_diffusion_generate(wrapped, prompt, **kwargs), plain)  # fresh adapters add zero
