"""The llada_fast sampler: exact mode == reference sampler, KV-cache math, parallel decoding rules."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import dare
from dare.plugins import registry
from dare.protocol import ModelOutput
from dare_plugins.llada.fast import (
    factor_counts, finished_rows, generate, select_factor, select_threshold, select_topk,
)
from dare_plugins.llada.modeling import LLaDAModelLM, tiny_config
from dare_plugins.llada.sampler import generate as reference

MASK, PAD = 126336, 126081
TINY_MASK = 255
_MODELS: dict = {}


@pytest.fixture
def fixture_dir(shared):
    return shared("fixtures", "llada-tiny")


@pytest.fixture
def model(fixture_dir):
    """The fixture checkpoint in float32, loaded once (tests must not modify it)."""
    if fixture_dir not in _MODELS:
        _MODELS[fixture_dir] = dare.load_model(fixture_dir, dtype=torch.float32)
    return _MODELS[fixture_dir]


def tiny_model(seed=0, sharpen=1.0, **overrides):
    """Random tiny LLaDA in float32; ``sharpen`` scales the LM head (confident predictions)."""
    torch.manual_seed(seed)
    model = LLaDAModelLM(tiny_config(**overrides)).eval()
    t = model.model.transformer
    with torch.no_grad():
        (t.ff_out if "ff_out" in t else t.wte).weight.mul_(sharpen)
    return model


def padded_batch(prompts, pad):
    width = max(p.shape[-1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[-1]:] = p
        mask[row, width - p.shape[-1]:] = 1
    return ids, mask


def same(a, b):
    return torch.equal(a.sequences, b.sequences) and torch.equal(a.unmask_step, b.unmask_step) and a.nfe == b.nfe


def test_registered():
    entry = registry().samplers.get("llada_fast")
    assert entry.families == ("llada",) and entry.fn is generate
    out = dare.generate(tiny_model(), torch.randint(0, 250, (1, 4)), sampler="llada_fast", steps=4,
                        gen_length=8, block_length=4, cache="dual", threshold=0.9)
    assert out.sequences.shape == (1, 12) and not (out.sequences == TINY_MASK).any()


# --- exact mode == reference ----------------------------------------------------------------


def test_exact_mode_matches_golden_and_reference(fixture_dir, model):
    g = load_file(str(fixture_dir / "golden" / "generate_b1_steps32_block8.safetensors"))
    meta = json.loads((fixture_dir / "golden" / "generate_b1_steps32_block8.json").read_text())
    kwargs = {k: v for k, v in meta["kwargs"].items() if k != "cfg_scale"}
    out = generate(model, g["prompt_ids"], **kwargs)
    assert torch.equal(out.sequences, g["output_ids"]) and torch.equal(out.unmask_step, g["unmask_step"])
    assert out.nfe == meta["decision_diagnostics"]["n_forward_calls"] == 32
    # a left-padded batch, compared with the reference sampler on the same batch
    prompt = g["prompt_ids"][0]
    ids, mask = padded_batch([prompt, prompt[25:]], PAD)
    kw = dict(steps=4, gen_length=8, block_length=4)
    assert same(generate(model, ids, attention_mask=mask, **kw), reference(model, ids, attention_mask=mask, **kw))


@pytest.mark.parametrize("kw", [
    dict(steps=8, gen_length=16, block_length=4),
    dict(steps=16, gen_length=16, block_length=16),
    dict(steps=6, gen_length=12, block_length=4),   # uneven linear schedule (3, 3, 2 ... per step)
    dict(steps=8, gen_length=16, block_length=8, remasking="random"),
    dict(steps=8, gen_length=16, block_length=8, logits_eos_inf=True, confidence_eos_eot_inf=True, eot_id=253),
])
@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=2, weight_tying=True)])
def test_exact_mode_matches_reference_in_code_model(kw, overrides):
    model = tiny_model(sharpen=4.0, **overrides)
    torch.manual_seed(1)
    ids, mask = padded_batch([torch.randint(0, 250, (9,)), torch.randint(0, 250, (5,)),
                              torch.randint(0, 250, (7,))], 254)
    a = reference(model, ids, attention_mask=mask, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, ids, attention_mask=mask, generator=torch.Generator().manual_seed(3), **kw)
    assert same(a, b)
    # the tied random model predicts the mask token itself: those positions stay masked and
    # remain candidates in later blocks, exactly as in the reference
    assert (b.sequences == TINY_MASK).any() == bool(overrides)


def test_one_step_per_block_cached_modes_are_exact():
    """With one step per block only the cache-building (full) forward runs: exact."""
    model = tiny_model(sharpen=4.0)
    prompt = torch.randint(0, 250, (2, 6))
    kw = dict(steps=4, gen_length=16, block_length=4)
    ref = reference(model, prompt, **kw)
    for cache in ("prefix", "dual"):
        assert same(generate(model, prompt, cache=cache, **kw), ref)


def test_more_steps_than_tokens_skips_empty_steps():
    """steps > gen_length: the reference spends steps that commit nothing; llada_fast does not."""
    model = tiny_model(sharpen=4.0)
    prompt = torch.randint(0, 250, (2, 5))
    kw = dict(steps=32, gen_length=16, block_length=8)
    a, b = reference(model, prompt, **kw), generate(model, prompt, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.unmask_step, b.unmask_step)
    assert a.nfe == 32 and b.nfe == 16


def test_cached_modes_with_peft_and_bf16():
    peft = pytest.importorskip("peft")
    model = tiny_model(sharpen=20.0)
    prompt = torch.randint(0, 250, (2, 6))
    kw = dict(steps=16, gen_length=16, block_length=8, cache="dual", threshold=0.9)
    plain = generate(model, prompt, **kw)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert same(generate(wrapped, prompt, **kw), plain)  # LoRA B starts at zero: same model
    half = generate(tiny_model(sharpen=20.0).to(torch.bfloat16), prompt, **kw)
    assert not (half.sequences == TINY_MASK).any() and (half.unmask_step >= 0).all()


# --- KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=2)])
def test_cached_forward_matches_full_forward_when_fresh(overrides):
    model = tiny_model(sharpen=2.0, **overrides)
    ids, mask = padded_batch([torch.randint(0, 250, (20,)), torch.randint(0, 250, (14,))], 254)
    ids = torch.cat([ids, torch.full((2, 12), TINY_MASK)], dim=1)
    mask = torch.cat([mask, torch.ones(2, 12, dtype=torch.long)], dim=1)
    start, end = 20, 24
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        built = model.forward_cached(ids, attention_mask=mask)
        assert torch.allclose(built.logits, full, atol=1e-5, rtol=0)
        cache = built.past_key_values
        assert cache.batch_size == 2 and cache.length == ids.shape[1]
        dual = model.forward_cached(ids[:, start:end], cache=cache, start=start).logits
        assert (dual - full[:, start:end]).abs().max().item() < 1e-5
        prefix = model.forward_cached(ids[:, start:], cache=cache, start=start).logits
        assert (prefix - full[:, start:]).abs().max().item() < 1e-5
        wanted = torch.zeros(2, end - start, dtype=torch.bool)
        wanted[0, 1] = wanted[1, 3] = True
        picked = model.forward_cached(ids[:, start:end], cache=cache, start=start, logits_mask=wanted).logits
        assert picked.shape == (2, full.shape[-1])
        assert torch.allclose(picked, full[:, start:end][wanted], atol=1e-5, rtol=0)
        # a changed block token: the window is recomputed, the rest of the cache is stale by design
        changed = ids.clone()
        changed[:, start] = 7
        window = model.forward_cached(changed[:, start:end], cache=cache, start=start).logits
        assert (window - model(changed, attention_mask=mask).logits[:, start:end]).abs().max() > 1e-4
        cache.select(torch.tensor([1]))
        row = model.forward_cached(ids[1:, start:end], cache=cache, start=start).logits
        assert (row - full[1:, start:end]).abs().max().item() < 1e-5


def test_cached_forward_matches_full_forward_on_fixture(fixture_dir, model):
    g = load_file(str(fixture_dir / "golden" / "generate_b1_steps32_block8.safetensors"))
    prompt = g["prompt_ids"]
    P = prompt.shape[1]
    ids = torch.cat([prompt, g["output_ids"][:, P:P + 8], torch.full((1, 24), MASK)], dim=1)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.forward_cached(ids).past_key_values
        for start, stop in ((P + 8, P + 16), (P + 8, ids.shape[1])):  # dual window, prefix window
            window = model.forward_cached(ids[:, start:stop], cache=cache, start=start).logits
            assert (window - full[:, start:stop]).abs().max().item() < 1e-5


def test_cached_forward_errors():
    model = tiny_model()
    ids = torch.randint(0, 250, (1, 10))
    with torch.no_grad():
        cache = model.forward_cached(ids).past_key_values
        with pytest.raises(ValueError, match="fit the cache"):
            model.forward_cached(ids[:, :4], cache=cache, start=8)
        with pytest.raises(ValueError, match="padding mask"):
            model.forward_cached(ids[:, :4], cache=cache, start=0, attention_mask=torch.ones(1, 4))


# --- parallel decoding rules --------------------------------------------------------------------


def test_threshold_rule():
    inf = -math.inf
    conf = torch.tensor([[0.95, 0.3, inf, 0.91, 0.2],
                         [0.5, 0.6, 0.1, inf, inf],
                         [inf, 0.92, 0.93, 0.2, inf]])
    assert select_threshold(conf, 0.9).tolist() == [[True, False, False, True, False],
                                                     [False, True, False, False, False],  # forced top-1
                                                     [False, True, True, False, False]]
    assert select_threshold(torch.tensor([[0.5, 0.25, 0.5, inf]]), 0.5).tolist() == [[True, False, True, False]]
    forced = select_threshold(conf, 0.99, torch.tensor([2, 3, 1]))
    assert forced.sum(1).tolist() == [2, 3, 1] and not forced[0, 1] and forced[1, 2]


def test_factor_rule_on_hand_made_confidences():
    inf = -math.inf
    # sorted: 0.99, 0.95, 0.9, 0.5 -> thresholds 1 - f/(n+1) = 0.5, 0.667, 0.75, 0.8 for f = 1
    conf = torch.tensor([[0.5, 0.99, inf, 0.9, 0.95],
                         [0.4, 0.3, 0.2, inf, inf],
                         [inf, inf, inf, inf, 1.0]])
    assert factor_counts(conf, 1.0).tolist() == [3, 1, 1]
    assert factor_counts(conf, 0.1).tolist() == [1, 1, 1]   # 0.95 < 1 - 0.1 / 3; the top one always
    assert factor_counts(conf[:1], 2.5).tolist() == [4]      # 0.5 >= 1 - 2.5 / 5
    assert select_factor(conf, 1.0).tolist() == [[False, True, False, True, True],
                                                  [True, False, False, False, False],
                                                  [False, False, False, False, True]]
    assert select_factor(conf, 1.0, torch.tensor([1, 3, 1])).sum(1).tolist() == [3, 3, 1]
    c = torch.tensor([[1 - 0.1 * k for k in range(1, 6)]])  # (k + 1) * (1 - c_k) = 0.2, 0.6, 1.2, 2, 3
    for f in (0.1, 0.35, 0.65, 0.95, 1.25, 2.5, 3.5):  # the rule: largest n with (n + 1) * (1 - c_n) <= f
        expected = max([k for k in range(1, 6) if (k + 1) * (1 - c[0, k - 1].item()) <= f] + [1])
        assert factor_counts(c, f).item() == expected


def test_topk_rule_matches_per_row_topk():
    conf = torch.tensor([[0.1, 0.9, 0.9, -math.inf], [0.3, 0.2, 0.5, 0.4]])
    assert select_topk(conf, torch.tensor([2, 2])).sum(1).tolist() == [2, 2]
    mixed = select_topk(conf, torch.tensor([1, 3]))
    assert mixed[1].tolist() == [True, False, True, True] and mixed[0].sum() == 1


def committed_confidences(model, prompt, out, kw):
    """Replay a cache='none' run: per step, the confidences of the state before it."""
    P, G, bl = prompt.shape[1], kw["gen_length"], kw["block_length"]
    for step in range(int(out.unmask_step.max()) + 1):
        state = out.sequences.clone()
        state[:, P:][out.unmask_step >= step] = TINY_MASK
        chosen = out.unmask_step[0] == step
        block = int(chosen.nonzero()[0]) // bl
        with torch.no_grad():
            probs = model(state).logits.softmax(-1)[0, P:]
        conf = probs.gather(-1, out.sequences[0, P:, None]).squeeze(-1)
        in_block = torch.zeros(G, dtype=torch.bool)
        in_block[block * bl:(block + 1) * bl] = True
        yield step, chosen, conf, in_block & (state[0, P:] == TINY_MASK)


def test_threshold_decoding_end_to_end():
    model = tiny_model(sharpen=20.0)
    prompt = torch.randint(0, 250, (1, 6))
    kw = dict(steps=32, gen_length=32, block_length=8)
    out = generate(model, prompt, threshold=0.8, **kw)
    assert not (out.sequences == TINY_MASK).any()
    assert out.nfe == int(out.unmask_step.max()) + 1 < 32
    assert (torch.bincount(out.unmask_step[0]) >= 1).all()  # every step commits at least one
    multi = 0
    for step, chosen, conf, candidates in committed_confidences(model, prompt, out, kw):
        top = conf.masked_fill(~candidates, -1).argmax()
        expected = candidates & (conf >= 0.8)
        expected[top] = True
        assert torch.equal(chosen, expected), step
        multi += int(chosen.sum() > 1)
    assert multi > 0
    # the factor rule, replayed the same way
    out = generate(model, prompt, factor=1.0, **kw)
    assert out.nfe < 32 and not (out.sequences == TINY_MASK).any()
    for step, chosen, conf, candidates in committed_confidences(model, prompt, out, kw):
        n = int(factor_counts(conf.masked_fill(~candidates, -math.inf)[None], 1.0))
        rest = conf[candidates & ~chosen]
        assert int(chosen.sum()) == n and (rest.numel() == 0 or conf[chosen].min() >= rest.max()), step


def test_steps_bound_the_steps_per_block():
    model = tiny_model()  # unsure predictions: threshold alone would take one step per token
    prompt = torch.randint(0, 250, (2, 5))
    kw = dict(steps=8, gen_length=16, block_length=8)
    for cache in ("none", "dual"):
        out = generate(model, prompt, threshold=1.0, cache=cache, **kw)
        assert out.nfe == 8 and int(out.unmask_step.max()) == 7 and not (out.sequences == TINY_MASK).any()
        assert torch.bincount(out.unmask_step.flatten()).tolist() == [2 * 2] * 8  # 2 rows x 2 per step


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("rule", [dict(), dict(threshold=0.9), dict(factor=1.0)])
def test_cached_modes_end_to_end(cache, rule):
    model = tiny_model(sharpen=20.0)
    ids, mask = padded_batch([torch.randint(0, 250, (8,)), torch.randint(0, 250, (5,))], 254)
    kw = dict(steps=32, gen_length=32, block_length=8)
    ref = reference(model, ids, attention_mask=mask, **kw)
    out = generate(model, ids, attention_mask=mask, cache=cache, **rule, **kw)
    assert out.sequences.shape == ref.sequences.shape and torch.equal(out.sequences[:, :8], ids)
    assert not (out.sequences == TINY_MASK).any() and (out.unmask_step >= 0).all()
    assert out.nfe <= ref.nfe if not rule else out.nfe < ref.nfe
    for b in range(4):  # blocks are filled left to right
        span = out.unmask_step[:, 8 * b:8 * b + 8]
        if b:
            assert (span.min(1).values > out.unmask_step[:, 8 * b - 8:8 * b].max(1).values).all()
    again = generate(model, ids, attention_mask=mask, cache=cache, **rule, **kw)
    assert same(out, again)


@pytest.mark.parametrize("cache, threshold", [("prefix", None), ("dual", None), ("dual", 0.9)])
def test_left_padded_batch_rows_match_rows_alone(fixture_dir, model, cache, threshold):
    g = load_file(str(fixture_dir / "golden" / "generate_b1_steps32_block8.safetensors"))
    long_p = g["prompt_ids"]
    short_p = long_p[:, 20:]
    ids, mask = padded_batch([long_p[0], short_p[0]], PAD)
    kw = dict(steps=8, gen_length=16, block_length=8, cache=cache, threshold=threshold)
    out = generate(model, ids, attention_mask=mask, **kw)
    for row, prompt in enumerate((long_p, short_p)):
        alone = generate(model, prompt, **kw)
        assert torch.equal(out.sequences[row, -16:], alone.sequences[0, -16:])
        assert torch.equal(out.unmask_step[row], alone.unmask_step[0])


def test_temperature_draws_from_generator():
    model = tiny_model(sharpen=3.0)
    prompt = torch.randint(0, 250, (2, 6))
    kw = dict(steps=16, gen_length=16, block_length=8, temperature=1.0, cache="dual", threshold=0.7)
    runs = [generate(model, prompt, generator=torch.Generator().manual_seed(s), **kw) for s in (1, 1, 2)]
    assert same(runs[0], runs[1]) and not torch.equal(runs[0].sequences, runs[2].sequences)
    assert not (runs[0].sequences == TINY_MASK).any()
    random = generate(model, prompt, **{**kw, "remasking": "random"}, generator=torch.Generator().manual_seed(0))
    assert (random.unmask_step >= 0).all()


# --- stop_at_eos ---------------------------------------------------------------------------------


class ScriptedModel(torch.nn.Module):
    """Logits that depend only on the position (and on the row's first prompt token).

    Generated positions before ``end`` predict token 10 + j very confidently, position ``end``
    predicts EOS a bit less confidently, later positions predict EOS with low confidence:
    greedy low-confidence decoding commits them in that order, and every later position
    becomes EOS anyway.
    """

    def __init__(self, prompt_len, vocab=256):
        super().__init__()
        self.hf_config = tiny_config(vocab_size=vocab)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.prompt_len, self.vocab = prompt_len, vocab
        self.calls = []

    def forward(self, input_ids, attention_mask=None, **_):
        self.calls.append(input_ids.shape[0])
        B, L = input_ids.shape
        eos = self.hf_config["eos_token_id"]
        logits = torch.zeros(B, L, self.vocab)
        for b in range(B):
            end = int(input_ids[b, 0])
            for i in range(self.prompt_len, L):
                j = i - self.prompt_len
                if j < end:
                    logits[b, i, 10 + j] = 20.0 - 0.1 * j
                elif j == end:
                    logits[b, i, eos] = 15.0
                else:
                    logits[b, i, eos] = 5.0 - 0.01 * j
        return ModelOutput(logits=logits)


def test_stop_at_eos_keeps_tokens_and_saves_compute():
    model = ScriptedModel(prompt_len=3)
    prompt = torch.tensor([[2, 1, 1], [5, 1, 1]])  # EOS at generated position 2 / 5
    kw = dict(steps=16, gen_length=16, block_length=8)
    full = generate(model, prompt, **kw)
    assert full.nfe == 16 and (full.sequences[0, 5:] == 254).all()
    model.calls.clear()
    early = generate(model, prompt, stop_at_eos=True, **kw)
    assert torch.equal(early.sequences, full.sequences)
    assert early.nfe == 6 and model.calls == [2, 2, 2, 1, 1, 1]  # row 0 leaves after step 2
    committed = early.unmask_step >= 0
    assert torch.equal(early.unmask_step[committed], full.unmask_step[committed])
    assert committed.sum(1).tolist() == [3, 6] and (early.unmask_step[~committed] == -1).all()
    # threshold decoding stops too
    fast = generate(model, prompt, threshold=0.9, stop_at_eos=True, **kw)
    assert torch.equal(fast.sequences, full.sequences) and fast.nfe == 1


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_stop_at_eos_cached_modes(cache):
    model = tiny_model(sharpen=20.0)
    prompt = torch.randint(0, 250, (1, 6))
    kw = dict(steps=32, gen_length=32, block_length=8, cache=cache, threshold=0.9)
    full = generate(model, prompt, **kw)
    generated = full.sequences[0, 6:]
    eos = int(generated[8])  # stand-in EOS: a token of the second block, after which the model went on
    early = generate(model, prompt, eos_id=eos, stop_at_eos=True, **kw)
    committed = early.unmask_step >= 0
    assert torch.equal(early.sequences[:, :6][0], prompt[0]) and not (early.sequences == TINY_MASK).any()
    assert torch.equal(early.sequences[:, 6:][committed], full.sequences[:, 6:][committed])
    assert torch.equal(early.unmask_step[committed], full.unmask_step[committed])
    first_eos = int((early.sequences[0, 6:] == eos).nonzero()[0])
    assert committed[0, :first_eos].all()  # every earlier position committed
    assert (early.sequences[0, 6:][~committed[0]] == eos).all() and (~committed[0, :first_eos + 1]).sum() == 0
    assert early.nfe < full.nfe
    assert finished_rows(early.sequences[:, 6:], TINY_MASK, (eos,)).all()


def test_finished_rows():
    M, E = 9, 1
    gen = torch.tensor([[3, E, M, M], [3, M, E, M], [E, 3, 3, 3], [3, 3, 3, 3], [M, E, E, E]])
    assert finished_rows(gen, M, (E,)).tolist() == [True, False, True, False, False]
    assert finished_rows(gen, M, (E, 3)).tolist() == [True, True, True, True, False]


# --- bad arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, word", [
    (dict(threshold=0.9, factor=1.0), "not both"),
    (dict(cache="full"), "cache"),
    (dict(cache=None), "cache"),
    (dict(threshold=1.5), "threshold"),
    (dict(factor=0.0), "factor"),
    (dict(gen_length=10, block_length=4), "block_length"),
    (dict(remasking="top_k"), "remasking"),
    (dict(stop_at_eos=True, eos_id=999), "eos_id"),
])
def test_bad_arguments(kwargs, word):
    kw = dict(steps=4, gen_length=8, block_length=8) | kwargs
    with pytest.raises(ValueError, match=word):
        generate(tiny_model(), torch.zeros(1, 4, dtype=torch.long), **kw)


def test_cached_modes_need_a_llada_module():
    with pytest.raises(ValueError, match="LLaDAModelLM"):
        generate(ScriptedModel(prompt_len=3), torch.zeros(1, 3, dtype=torch.long), steps=4, gen_length=8,
                 block_length=8, cache="dual")
