"""The dream plugin: native Dream model and its reference sampler against the goldens."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

import dare
from dare.plugins import PluginManager
from dare_plugins import dream
from dare_plugins.dream.modeling import DreamModel, build, tiny_config
from dare_plugins.dream.sampler import ALGORITHMS, diffusion_generate, sample_tokens

FIXTURE = ("fixtures", "dream-tiny")
QUESTIONS = ["What is 2+2?", "Natalia sold clips to 48 of her friends in April, and then half as many in May."]


@functools.lru_cache(maxsize=None)
def _load(path, dtype=torch.float32):
    return dare.load_model(path, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _tokenizer(path):
    return dare.load_tokenizer(path)


def _golden(shared, name):
    folder = shared(*FIXTURE, "golden")
    meta = json.loads((folder / f"{name}.json").read_text())
    return meta, load_file(str(folder / f"{name}.safetensors"))


def _chat_ids(tok, question):
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return torch.tensor(tok(text)["input_ids"])


def _left_pad(rows, pad_id):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# --- registration -------------------------------------------------------------------------


def test_registers_family_and_sampler():
    reg = PluginManager(plugins=[dream], entry_points=False).registry
    fam = reg.families.get("dream")
    assert reg.family_for_model_type("Dream") is fam
    assert fam.default_sampler == "dream" and fam.shifted_logits and fam.attention == "bidirectional"
    assert set(fam.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}
    special = fam.special_tokens(tiny_config())
    assert (special.mask_id, special.eos_id, special.pad_id, special.bos_id) == (151666, 151643, 151643, 151643)
    assert reg.samplers.get("dream").fn is diffusion_generate
    assert reg.samplers.get("dream").families == ("dream",)


# --- model vs goldens ---------------------------------------------------------------------


def test_golden_forward_float32(shared):
    meta, g = _golden(shared, "forward_1")
    model = _load(shared(*FIXTURE))
    assert model.family == "dream" and model.hf_config["model_type"] == "Dream"
    with torch.no_grad():
        logits = model(g["input_ids"]).logits
    assert logits.dtype == torch.float32 and list(logits.shape) == meta["logits_shape"]
    assert (logits - g["logits"]).abs().max().item() <= 1e-4
    assert torch.equal(logits.argmax(-1), g["argmax"])
    torch.testing.assert_close(logits.logsumexp(-1), g["logsumexp"], atol=1e-4, rtol=0)


def test_golden_generation_exact(shared):
    meta, g = _golden(shared, "diffusion_generate_b1_entropy_steps32")
    model = _load(shared(*FIXTURE))
    out = dare.generate(model, g["prompt_ids"], **meta["kwargs"])
    assert torch.equal(out.sequences, g["output_ids"])
    assert torch.equal(out.unmask_step, g["unmask_step"])
    assert out.nfe == meta["decision_diagnostics"]["n_forward_calls"]
    per_step = torch.bincount(out.unmask_step.flatten(), minlength=meta["kwargs"]["steps"])
    assert torch.equal(per_step, g["tokens_unmasked_per_step"])


# --- sampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_every_alg_greedy_is_deterministic(shared, alg):
    model = _load(shared(*FIXTURE))
    prompt = _chat_ids(_tokenizer(shared(*FIXTURE)), QUESTIONS[0])[None]
    kwargs = dict(max_new_tokens=6, steps=3, alg=alg, temperature=0.0)

    def run():
        return dare.generate(model, prompt, generator=torch.Generator().manual_seed(0), **kwargs)

    a, b = run(), run()
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.unmask_step, b.unmask_step)
    assert a.sequences.shape == (1, prompt.shape[1] + 6) and a.unmask_step.shape == (1, 6)
    assert torch.equal(a.sequences[:, : prompt.shape[1]], prompt)
    mask_id = model.hf_config["mask_token_id"]
    assert not (a.sequences == mask_id).any()
    assert (a.unmask_step >= 0).all() and (a.unmask_step < a.nfe).all()
    assert a.nfe >= 3


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_left_padded_batch_equals_rows_alone(shared, alg):
    model = _load(shared(*FIXTURE))
    tok = _tokenizer(shared(*FIXTURE))
    rows = [_chat_ids(tok, q) for q in QUESTIONS]
    ids, mask = _left_pad(rows, model.hf_config["pad_token_id"])
    kwargs = dict(max_new_tokens=6, steps=3, alg=alg)
    batch = dare.generate(model, ids, attention_mask=mask, **kwargs)
    assert batch.nfe == 3
    for i, row in enumerate(rows):
        alone = dare.generate(model, row[None], **kwargs)
        assert torch.equal(batch.sequences[i, ids.shape[1]:], alone.sequences[0, len(row):])
        assert torch.equal(batch.unmask_step[i], alone.unmask_step[0])
        assert torch.equal(batch.sequences[i, : ids.shape[1]], ids[i])


def test_generator_draws_as_the_global_rng(shared):
    """Stochastic parts use the given generator exactly as the reference uses the global RNG."""
    model = _load(shared(*FIXTURE))
    prompt = _chat_ids(_tokenizer(shared(*FIXTURE)), QUESTIONS[0])[None]
    for kwargs in (dict(alg="origin", temperature=0.7, top_p=0.9),
                   dict(alg="maskgit_plus", temperature=1.0, top_k=50, alg_temp=0.5)):
        torch.manual_seed(123)
        glob = diffusion_generate(model, prompt, max_new_tokens=4, steps=2, **kwargs)
        torch.manual_seed(999)  # the generator path must not touch the global RNG
        gen = diffusion_generate(model, prompt, max_new_tokens=4, steps=2,
                                 generator=torch.Generator().manual_seed(123), **kwargs)
        assert torch.equal(glob.sequences, gen.sequences)
        assert torch.equal(glob.unmask_step, gen.unmask_step)


def test_hooks_see_shifted_logits_and_match_the_plain_path(shared):
    model = _load(shared(*FIXTURE))
    prompt = _chat_ids(_tokenizer(shared(*FIXTURE)), QUESTIONS[0])[None]
    seen = []

    def logits_hook(step, x, logits):
        seen.append(step)
        with torch.no_grad():
            raw = model(x).logits
        assert torch.equal(logits[:, 1:], raw[:, :-1]) and torch.equal(logits[:, 0], raw[:, 0])
        return logits

    kwargs = dict(max_new_tokens=4, steps=2, alg="topk_margin")
    hooked = diffusion_generate(model, prompt, generation_logits_hook_func=logits_hook, **kwargs)
    plain = diffusion_generate(model, prompt, **kwargs)
    assert seen == [0, 1]
    assert torch.equal(hooked.sequences, plain.sequences) and torch.equal(hooked.unmask_step, plain.unmask_step)


def test_confidence_threshold_carries_low_confidence_tokens(shared):
    model = _load(shared(*FIXTURE))
    prompt = _chat_ids(_tokenizer(shared(*FIXTURE)), QUESTIONS[0])[None]
    # threshold 1.0: only the single most confident token per step is committed, the rest are
    # carried; the last step then adds one extra step per remaining token.
    out = diffusion_generate(model, prompt, max_new_tokens=4, steps=2, alg="confidence_threshold", threshold=1.0)
    assert out.nfe == 4
    assert sorted(out.unmask_step[0].tolist()) == [0, 1, 2, 3]
    # threshold 0: exactly max_new_tokens / steps per step, as scheduled.
    out = diffusion_generate(model, prompt, max_new_tokens=4, steps=2, alg="confidence_threshold", threshold=0.0)
    assert out.nfe == 2 and sorted(out.unmask_step[0].tolist()) == [0, 0, 1, 1]


def test_sample_tokens_confidences():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    probs = logits.softmax(-1)
    conf, tok = sample_tokens(logits)
    assert tok.tolist() == [0, 2] and torch.allclose(conf, probs.max(-1).values)
    conf, _ = sample_tokens(logits, margin_confidence=True)
    top = probs.sort(-1, descending=True).values
    assert torch.allclose(conf, top[:, 0] - top[:, 1])
    conf, _ = sample_tokens(logits, neg_entropy=True)
    assert torch.allclose(conf, (probs * (probs + 1e-10).log()).sum(-1))
    conf, tok = sample_tokens(logits, top_k=1)  # filtering renormalises the confidence
    assert tok.tolist() == [0, 2] and torch.allclose(conf, torch.ones(2))


@pytest.mark.parametrize("kwargs, word", [
    (dict(alg="nope"), "alg"),
    (dict(steps=0), "steps"),
    (dict(max_new_tokens=600), "max_position_embeddings"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_length=5), "max_length"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(alg="confidence_threshold", max_new_tokens=5, steps=2), "divisible"),
])
def test_sampler_errors(shared, kwargs, word):
    model = _load(shared(*FIXTURE))
    prompt = torch.tensor([[151644, 872, 198, 9707, 151645, 198]])
    if "max_length" not in kwargs:
        kwargs.setdefault("max_new_tokens", 4)
    kwargs.setdefault("steps", 2)
    with pytest.raises(ValueError, match=word):
        dare.generate(model, prompt, **kwargs)


def test_sampler_errors_on_batch_and_mask_shape(shared):
    model = _load(shared(*FIXTURE))
    prompt = torch.tensor([[151644, 872, 198], [151644, 872, 198]])
    with pytest.raises(ValueError, match="batch size 1"):
        dare.generate(model, prompt, max_new_tokens=4, steps=2, alg="confidence_threshold")
    with pytest.raises(ValueError, match="attention_mask"):
        dare.generate(model, prompt, attention_mask=torch.ones(2, 5), max_new_tokens=4, steps=2)


# --- dtype, training, structure -----------------------------------------------------------


def test_bf16_forward_and_generate(shared):
    model = _load(shared(*FIXTURE), torch.bfloat16)
    meta, g = _golden(shared, "forward_1")
    with torch.no_grad():
        logits = model(g["input_ids"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - g["logits"]).abs().max().item() < 1.0  # bf16 rounding only
    out = dare.generate(model, g["input_ids"], max_new_tokens=4, steps=2, alg="entropy")
    assert out.sequences.shape == (1, g["input_ids"].shape[1] + 4)


def _tiny(**overrides):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=97, mask_token_id=96, pad_token_id=95, eos_token_id=95, bos_token_id=94,
                      **overrides)
    return build(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_model_forward_backward(tied):
    model = _tiny(tie_word_embeddings=tied).train()
    names = set(model.state_dict())
    assert ("lm_head.weight" in names) != tied
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.weight"} <= names
    ids = torch.randint(0, 94, (2, 10))
    logits = model(ids).logits
    assert logits.shape == (2, 10, 97)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.gradient_checkpointing_enable()
    model.zero_grad()
    logits_ckpt = model(ids).logits
    torch.testing.assert_close(logits_ckpt, logits)


def test_build_on_meta_creates_only_parameters():
    with torch.device("meta"):
        model = build(tiny_config())
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    assert model.family == "dream" and model.hf_config["model_type"] == "Dream"
    assert isinstance(model, DreamModel)


def test_mask_forms_and_positions_agree_on_real_tokens():
    """2D padding mask, the sampler's 4D mask with tok_idx, and an unpadded run agree."""
    model = _tiny().eval()
    real = torch.randint(0, 94, (1, 7))
    ids = torch.cat([torch.full((1, 3), 95), real], dim=1)
    mask2d = torch.tensor([[0, 0, 0] + [1] * 7])
    pos = (mask2d.cumsum(-1) - 1).masked_fill(mask2d == 0, 1)
    mask4d = mask2d.bool()[:, None, None, :] & mask2d.bool()[:, None, :, None]
    with torch.no_grad():
        alone = model(real).logits
        by_2d = model(ids, attention_mask=mask2d, position_ids=pos).logits[:, 3:]
        by_4d = model(ids, attention_mask=mask4d, position_ids=pos).logits[:, 3:]
        arange_pos = model(ids, attention_mask=mask4d).logits[:, 3:]  # DARE's arange positions
        full = model(real, attention_mask=torch.ones(1, 7, dtype=torch.long)).logits
    torch.testing.assert_close(by_2d, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(by_4d, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(arange_pos, alone, atol=1e-4, rtol=0)
    torch.testing.assert_close(full, alone)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 4))


# --- tokenizer and checkpoint I/O ---------------------------------------------------------


def test_tokenizer_mask_id_and_chat_template(shared):
    path = shared(*FIXTURE)
    tok = _tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    assert tok.convert_tokens_to_ids("<|mask|>") == config["mask_token_id"] == 151666
    assert tok.convert_tokens_to_ids("<|endoftext|>") == config["eos_token_id"]
    meta, g = _golden(shared, "diffusion_generate_b1_entropy_steps32")
    text = tok.apply_chat_template(
        [{"role": "user", "content": meta["prompt_texts"][0].split("user\n")[1].split("<|im_end|>")[0]}],
        add_generation_prompt=True, tokenize=False)
    assert text.startswith(meta["prompt_texts"][0])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert tok(text)["input_ids"][: g["prompt_ids"].shape[1]] == g["prompt_ids"][0].tolist()


def test_save_load_round_trip(shared, tmp_path):
    path = shared(*FIXTURE)
    model = _load(path)
    out = dare.save_model(model, tmp_path / "ckpt", tokenizer_from=path, dtype=torch.bfloat16)
    original = load_file(str(path / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)  # bf16 -> f32 -> bf16 is exact
    again = dare.load_model(out, dtype=torch.float32)
    ids = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151666, 151666]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert dare.load_tokenizer(out).convert_tokens_to_ids("<|mask|>") == 151666
