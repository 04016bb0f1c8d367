"""The sdar plugin: model against the reference goldens, KV cache, training mask, sampler."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dare
from dare.plugins import registry
from dare_plugins.sdar.modeling import (
    SDARCache, SDARForCausalLM, block_causal_mask, block_diff_mask, block_diffusion_training_mask,
    build_training_inputs, tiny_config,
)
from dare_plugins.sdar.sampler import block_diffusion_generate, entropy_bounded_select

GEN_GOLDEN = "block_diffusion_generate_p14_sequential_steps4_greedy_topk1"
MASK = 63  # mask id of the in-code tiny models
GREEDY = dict(temperature=1.0, top_k=1)


def tiny_model(seed: int = 0, **overrides) -> SDARForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=64, mask_token_id=MASK, bos_token_id=0, eos_token_id=0, **overrides)
    model = SDARForCausalLM(config)
    with torch.no_grad():  # sharper attention and logits than the default init, as in the fixture
        model.model.embed_tokens.weight.normal_()
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(2.0)
            layer.self_attn.k_norm.weight.fill_(2.0)
        if not config["tie_word_embeddings"]:
            model.lm_head.weight.mul_(8.0)
    return model.eval()


_LOADED: dict = {}


@pytest.fixture
def fixture_model(shared):
    """(folder, float32 model) of the sdar-tiny fixture, loaded once per test session."""
    folder = shared("fixtures", "sdar-tiny")
    if folder not in _LOADED:
        _LOADED[folder] = dare.load_model(folder, dtype=torch.float32)
    return folder, _LOADED[folder]


# --- registration -----------------------------------------------------------------------------


def test_family_and_sampler_registered():
    reg = registry()
    family = reg.families.get("sdar")
    assert family.model_types == ("sdar",) and family.default_sampler == "sdar"
    assert family.shifted_logits is False and family.attention == "block_causal"
    config = tiny_config()
    assert family.block_size(config) == 4
    tokens = family.special_tokens(config)
    assert (tokens.mask_id, tokens.eos_id, tokens.pad_id, tokens.bos_id) == (151669, 151643, 151643, 151643)
    assert "q_proj" in family.lora_target_modules and "down_proj" in family.lora_target_modules
    assert reg.samplers.get("sdar").families == ("sdar",)


def test_tokenizer_loads_without_remote_code(shared):
    tokenizer = dare.load_tokenizer(shared("fixtures", "sdar-tiny"))
    assert tokenizer.mask_token == "<|MASK|>" and tokenizer.mask_token_id == 151669
    assert tokenizer.eos_token_id == 151643 and len(tokenizer) == 151670
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 times 8?"}],
                                        add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    golden = load_file(shared("fixtures", "sdar-tiny", "golden", f"{GEN_GOLDEN}.safetensors"))
    assert list(ids[:14]) == golden["prompt_ids"][0].tolist()


def test_build_on_meta_creates_only_parameters():
    with torch.device("meta"):
        model = SDARForCausalLM(tiny_config())
    assert model.hf_config["model_type"] == "sdar" and model.family == "sdar"
    assert list(model.buffers()) == []
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.1.self_attn.q_norm.weight",
            "model.layers.0.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 16, 32)  # head_dim from config


# --- goldens ----------------------------------------------------------------------------------


def test_golden_forward(fixture_model):
    """The golden passed the sampler's block-causal mask as a float 0/1 (1, L, L) tensor."""
    folder, model = fixture_model
    golden = load_file(folder / "golden" / "forward_1.safetensors")
    with torch.no_grad():
        logits = model(golden["input_ids"], attention_mask=golden["attention_mask"],
                       position_ids=golden["position_ids"]).logits
        default = model(golden["input_ids"]).logits  # None = block-causal from config block_size
    assert logits.dtype == torch.float32 and logits.shape == golden["logits"].shape
    assert (logits - golden["logits"]).abs().max() <= 1e-4
    assert (default - golden["logits"]).abs().max() <= 1e-4
    assert torch.equal(logits.argmax(-1), golden["argmax"])


def test_golden_generation(fixture_model):
    folder, model = fixture_model
    meta = json.loads((folder / "golden" / f"{GEN_GOLDEN}.json").read_text())
    golden = load_file(folder / "golden" / f"{GEN_GOLDEN}.safetensors")
    prompt = golden["prompt_ids"]
    out = dare.generate(model, prompt, **meta["kwargs"])
    end = prompt.shape[1] + meta["gen_length"]
    # the reference returns x up to the end of the last block; dare keeps P + gen_length tokens
    assert torch.equal(out.sequences, golden["output_ids"][:, :end])
    # golden unmask_call: global index among denoising calls; unmask_step there is block-local
    assert torch.equal(out.unmask_step, golden["unmask_call"])
    calls = meta["decision_diagnostics"]
    # all reference calls but the final KV store, which nothing reads
    assert out.nfe == calls["n_denoising_calls"] + calls["n_store_kv_calls"] - 1


# --- model ------------------------------------------------------------------------------------


def test_kv_cache_decoding_equals_full_recomputation():
    model = tiny_model()
    ids = torch.randint(0, 62, (2, 12))
    with torch.no_grad():
        full = model(ids).logits  # block-causal over the whole sequence
        out = model(ids[:, :8], attention_mask=block_causal_mask(8, 4), use_cache=True, store_kv=True)
        cache = out.past_key_values
        assert isinstance(cache, SDARCache) and cache.get_seq_length() == 8 and len(cache) == 2
        assert (out.logits - full[:, :8]).abs().max() < 1e-5
        step = model(ids[:, 8:], attention_mask=torch.ones(4, 12, dtype=torch.bool), past_key_values=cache)
        assert cache.get_seq_length() == 8  # store_kv=False only reads
        assert (step.logits - full[:, 8:]).abs().max() < 1e-5
        default = model(ids[:, 8:], past_key_values=cache)  # None: block-causal incl. the cache
        assert (default.logits - full[:, 8:]).abs().max() < 1e-5
        model(ids[:, 8:], past_key_values=cache, store_kv=True)
        assert cache.get_seq_length() == 12


def test_tiny_forward_backward_and_checkpointing():
    model = tiny_model().train()
    ids = torch.randint(0, 62, (2, 8))
    loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.layers.0.self_attn.q_norm.weight"].abs().sum() > 0
    model.zero_grad()
    model.gradient_checkpointing_enable()
    loss2 = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-6), name


def test_bf16_forward_and_generation(fixture_model):
    folder, _ = fixture_model
    model = dare.load_model(folder, dtype=torch.bfloat16)
    golden = load_file(folder / "golden" / "forward_1.safetensors")
    with torch.no_grad():
        logits = model(golden["input_ids"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert (logits.float() - golden["logits"]).abs().max() < 1.0  # logits span about +-30
    tiny = tiny_model().to(torch.bfloat16)
    out = dare.generate(tiny, torch.tensor([[1, 2, 3, 4, 5]]), gen_length=8, **GREEDY)
    assert out.sequences.shape == (1, 13) and not (out.sequences == MASK).any()


def test_tied_embeddings_and_save_load_round_trip(tmp_path):
    for tied in (False, True):
        model = tiny_model(tie_word_embeddings=tied)
        folder = dare.save_model(model, tmp_path / f"tied{tied}")
        loaded = dare.load_model(folder, dtype=torch.float32)
        assert ("lm_head.weight" in loaded.state_dict()) is not tied
        assert loaded.hf_config == json.loads((folder / "config.json").read_text())
        ids = torch.randint(0, 62, (1, 8))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_forward_rejects_bad_inputs():
    model = tiny_model()
    ids = torch.randint(0, 62, (1, 8))
    with pytest.raises(ValueError, match="attention_mask of shape"):
        model(ids, attention_mask=torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="labels"):
        model(ids, labels=ids)
    with pytest.raises(ValueError, match="rope_scaling"):
        SDARForCausalLM(tiny_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))


# --- training mask ----------------------------------------------------------------------------


def test_training_mask_matches_hand_written_example():
    # n = 4 tokens, block size 2: [xt_0 xt_1 | xt_2 xt_3 || x0_0 x0_1 | x0_2 x0_3]
    expected = torch.tensor([
        # xt0 xt1 xt2 xt3 x00 x01 x02 x03
        [1, 1, 0, 0, 0, 0, 0, 0],  # xt block 0: its own noisy block only
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # xt block 1: own noisy block + clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # x0 block 0: clean block-causal
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_diffusion_training_mask(4, 2), expected)
    idx = torch.arange(8)
    assert torch.equal(block_diff_mask(None, None, idx[:, None], idx[None, :], block_size=2, n=4), expected)
    packed = block_diffusion_training_mask([4, 2], 2)  # reference block_attn_mask: block_diag per sample
    assert packed.shape == (12, 12) and torch.equal(packed[:8, :8], expected)
    assert not packed[:8, 8:].any() and not packed[8:, :8].any()
    assert torch.equal(block_causal_mask(6, 2).int(), torch.tensor(
        [[1, 1, 0, 0, 0, 0]] * 2 + [[1, 1, 1, 1, 0, 0]] * 2 + [[1] * 6] * 2))


def test_training_forward_is_consistent_with_inference():
    """Clean half == block-causal forward of x0; noisy block b == decoding it after clean blocks < b."""
    model = tiny_model()
    clean = torch.randint(0, 62, (2, 8))
    noisy = clean.masked_fill(torch.rand(2, 8) < 0.5, MASK)
    ids, pos, mask = build_training_inputs(clean, noisy, 4)
    assert ids.shape == (2, 16) and mask.shape == (2, 1, 16, 16)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=pos).logits
        assert (logits[:, 8:] - model(clean).logits).abs().max() < 1e-5
        cache = model(clean[:, :4], store_kv=True).past_key_values
        second = model(noisy[:, 4:], past_key_values=cache).logits
        assert (logits[:, 4:8] - second).abs().max() < 1e-5
        first = model(noisy[:, :4]).logits
        assert (logits[:, :4] - first).abs().max() < 1e-5
        # right padding: real-token logits ignore the padding's contents
        am = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
        outs = []
        for fill in (0, 7):
            c, n = clean.clone(), noisy.clone()
            c[1, 5:] = fill
            n[1, 5:] = fill
            i, p, m = build_training_inputs(c, n, 4, attention_mask=am)
            outs.append(model(i, attention_mask=m, position_ids=p).logits)
        assert torch.isfinite(outs[0]).all()
        real = am.bool().repeat(1, 2)
        assert (outs[0][real] - outs[1][real]).abs().max() < 1e-5


# --- sampler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, steps, extra", [
    ("sequential", 4, {}),
    ("low_confidence_static", 2, {}),
    ("low_confidence_dynamic", 2, {"confidence_threshold": 0.5}),
    ("entropy_bounded", 4, {"eb_threshold": 1.0}),
])
def test_each_strategy_runs(strategy, steps, extra):
    model = tiny_model()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    gen = torch.Generator().manual_seed(0)
    out = block_diffusion_generate(model, prompt, gen_length=12, block_length=4, denoising_steps=steps,
                                   remasking_strategy=strategy, generator=gen, **extra)
    assert out.sequences.shape == (1, 18) and torch.equal(out.sequences[:, :6], prompt)
    assert not (out.sequences == MASK).any() and (out.unmask_step >= 0).all()
    # prefill + denoising calls (the last block's tail beyond P + 12 is denoised too) + 3 stores
    assert out.nfe >= 1 + int(out.unmask_step.max()) + 1 + 3
    if strategy == "sequential":  # left to right, one token per step
        assert out.unmask_step[0].tolist() == list(range(12))
        assert out.nfe == 1 + (2 + 4 + 4 + 4) + 3
    if strategy == "low_confidence_static":  # 2 per step; blocks 1-3 (2 + 4 + 4 masks) in 5 steps
        assert torch.bincount(out.unmask_step[0, :10]).tolist() == [2] * 5
        assert torch.bincount(out.unmask_step[0]).max() == 2
    # reproducible with the same generator seed
    again = block_diffusion_generate(model, prompt, gen_length=12, block_length=4, denoising_steps=steps,
                                     remasking_strategy=strategy, generator=torch.Generator().manual_seed(0),
                                     **extra)
    assert torch.equal(again.sequences, out.sequences) and torch.equal(again.unmask_step, out.unmask_step)


def test_entropy_bounded_obeys_its_bound():
    entropy = torch.tensor([0.5, 0.125, 2.0, 0.25])
    masked = torch.tensor([True, True, True, False])
    # sorted masked entropies 0.125, 0.5, 2.0: running sums 0.125, 0.625, 2.625
    assert entropy_bounded_select(entropy, masked, 0.625).tolist() == [True, True, False, False]
    assert entropy_bounded_select(entropy, masked, 0.6).tolist() == [False, True, False, False]
    assert entropy_bounded_select(entropy, masked, 0.0).tolist() == [False, True, False, False]  # >= 1
    assert entropy_bounded_select(entropy, masked, 5.0).tolist() == [True, True, True, False]

    # in generation: every step's unmasked set has entropy sum <= bound, unless it is one token
    model = tiny_model()
    prompt = torch.tensor([[5, 6, 7, 8]])
    bound = 1.5
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model
            self.hf_config = model.hf_config

        def forward(self, ids, **kw):
            out = self.inner(ids, **kw)
            if not kw.get("store_kv"):
                seen.append((ids.clone(), out.logits.clone()))
            return out

    out = block_diffusion_generate(Recorder(), prompt, gen_length=8, block_length=4,
                                   remasking_strategy="entropy_bounded", eb_threshold=bound,
                                   generator=torch.Generator().manual_seed(1))
    assert len(seen) == int(out.unmask_step.max()) + 1
    for step, (ids, logits) in enumerate(seen):
        p = logits.float().softmax(-1)
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)[0]
        chosen = (out.unmask_step[0] == step).nonzero().flatten() % 4  # prompt is one block: local index
        assert len(chosen) >= 1
        assert len(chosen) == 1 or float(ent[chosen].sum()) <= bound + 1e-6
    one_each = block_diffusion_generate(model, prompt, gen_length=8, remasking_strategy="entropy_bounded",
                                        eb_threshold=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.bincount(one_each.unmask_step[0]).tolist() == [1] * 8


@pytest.mark.parametrize("strategy", ["sequential", "low_confidence_dynamic", "entropy_bounded"])
def test_left_padded_batch_rows_equal_rows_alone(strategy):
    model = tiny_model(seed=1)
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36, 37, 38, 39], [41, 42, 43, 44]]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        am[i, width - len(p):] = 1
    kwargs = dict(gen_length=12, block_length=4, denoising_steps=4, remasking_strategy=strategy,
                  eb_threshold=0.5, **GREEDY)
    batch = dare.generate(model, ids, attention_mask=am, **kwargs)
    assert batch.sequences.shape == (4, width + 12)
    for i, p in enumerate(prompts):
        alone = dare.generate(model, torch.tensor([p]), **kwargs)
        assert torch.equal(batch.sequences[i, width - len(p):], alone.sequences[0]), i
        assert torch.equal(batch.sequences[i, :width], ids[i])
        assert torch.equal(batch.unmask_step[i], alone.unmask_step[0]), i


def test_sampler_cache_equals_recomputing_the_prefix():
    """Sequential greedy with the KV cache == re-running the whole prefix without a cache each step."""
    model = tiny_model(seed=2)
    prompt = [7, 8, 9, 10, 11, 12]
    out = dare.generate(model, torch.tensor([prompt]), gen_length=8, block_length=4, denoising_steps=4,
                        remasking_strategy="sequential", **GREEDY)
    x = torch.tensor([prompt + [MASK] * 10])  # up to the end of the last block
    with torch.no_grad():
        while (x == MASK).any():
            pos = int((x[0] == MASK).nonzero()[0])
            hi = (pos // 4 + 1) * 4
            x[0, pos] = model(x[:, :hi]).logits[0, pos].argmax()
    assert torch.equal(out.sequences[0], x[0, :14])


def test_prompts_shorter_than_a_block():
    model = tiny_model(seed=3)
    kwargs = dict(gen_length=8, block_length=4, remasking_strategy="low_confidence_dynamic", **GREEDY)
    batch = dare.generate(model, torch.tensor([[0, 0, 5], [6, 7, 8]]),
                          attention_mask=torch.tensor([[0, 0, 1], [1, 1, 1]]), **kwargs)
    for i, p in enumerate([[5], [6, 7, 8]]):
        alone = dare.generate(model, torch.tensor([p]), **kwargs)
        assert torch.equal(batch.sequences[i, 3 - len(p):], alone.sequences[0])
        assert torch.equal(batch.unmask_step[i], alone.unmask_step[0])


def test_stopping_criteria():
    model = tiny_model(seed=1)
    prompt = torch.tensor([[11, 12, 13, 14, 15, 16]])
    kwargs = dict(gen_length=16, block_length=4, denoising_steps=4, remasking_strategy="sequential", **GREEDY)
    full = dare.generate(model, prompt, **kwargs)
    stop = int(full.sequences[0, 6 + 4])  # a token of the second generated block (positions 8..11)
    first = int((full.sequences[0, 6:] == stop).nonzero()[0])
    end_block = (6 + first) // 4 * 4 + 4  # the stopping block ends here (absolute position)
    out = dare.generate(model, prompt, stopping_criteria_idx=[stop], **kwargs)
    assert torch.equal(out.sequences[0, :end_block], full.sequences[0, :end_block])
    assert (out.sequences[0, end_block:] == MASK).all()
    assert (out.unmask_step[0, end_block - 6:] == -1).all() and (out.unmask_step[0, :end_block - 6] >= 0).all()
    assert out.nfe < full.nfe
    # in a batch, a stopped row freezes while the other row continues exactly as alone
    other = torch.tensor([[0, 0, 51, 52, 53, 54]])
    ids = torch.cat([prompt, other])
    am = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    batch = dare.generate(model, ids, attention_mask=am, stopping_criteria_idx=stop, **kwargs)
    assert torch.equal(batch.sequences[0], out.sequences[0])
    alone = dare.generate(model, other[:, 2:], stopping_criteria_idx=stop, **kwargs)
    assert torch.equal(batch.sequences[1, 2:], alone.sequences[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(gen_length=10, block_length=4), "gen_length"),
    (dict(block_length=4, denoising_steps=5), "denoising_steps"),
    (dict(remasking_strategy="random"), "remasking_strategy"),
    (dict(remasking_strategy="entropy_bounded"), "eb_threshold"),
    (dict(gen_length=512), "max_position_embeddings"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_sampler_errors(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        block_diffusion_generate(model, torch.tensor([[1, 2, 3]]), **kwargs)


def test_sampler_rejects_right_padding():
    model = tiny_model()
    with pytest.raises(ValueError, match="left padding"):
        block_diffusion_generate(model, torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))
