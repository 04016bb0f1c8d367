"""The llada plugin: native LLaDA module and reference sampler against the recorded goldens."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import dare
from dare.checkpoint import CheckpointError
from dare.plugins import registry
from dare.registry import SpecialTokens
from dare_plugins.llada import LORA_TARGET_MODULES, LORA_TARGET_REGEX, special_tokens
from dare_plugins.llada.modeling import LLaDAModelLM, tiny_config
from dare_plugins.llada.sampler import generate, get_num_transfer_tokens

MASK = 126336
PAD = 126081


_MODELS: dict = {}


@pytest.fixture
def fixture_dir(shared):
    return shared("fixtures", "llada-tiny")


@pytest.fixture
def model(fixture_dir):
    """The fixture checkpoint in float32, loaded once per session (tests must not modify it)."""
    if fixture_dir not in _MODELS:
        _MODELS[fixture_dir] = dare.load_model(fixture_dir, dtype=torch.float32)
    return _MODELS[fixture_dir]


def golden(folder, name):
    return load_file(str(folder / "golden" / f"{name}.safetensors")), json.loads(
        (folder / "golden" / f"{name}.json").read_text())


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config(**overrides)).eval()


# --- registration ---------------------------------------------------------------------------


def test_registered_family_and_sampler(fixture_dir):
    reg = registry()
    family = reg.family_for_model_type("llada")
    assert family.name == "llada" and family.default_sampler == "llada"
    assert not family.shifted_logits and family.attention == "bidirectional"
    assert "llada" in reg.samplers.get("llada").families
    config = json.loads((fixture_dir / "config.json").read_text())
    assert special_tokens(config) == SpecialTokens(mask_id=MASK, eos_id=PAD, pad_id=PAD, bos_id=None)


@pytest.mark.parametrize("regex", [False, True])
def test_lora_targets_skip_the_lm_head(regex):
    peft = pytest.importorskip("peft")
    targets = LORA_TARGET_REGEX if regex else list(LORA_TARGET_MODULES)
    wrapped = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.")
               for n, _ in wrapped.named_parameters() if ".lora_A" in n}
    expected = {f"model.transformer.blocks.{i}.{m}" for i in (0, 1) for m in LORA_TARGET_MODULES}
    block_ff_out = {f"model.transformer.blocks.{i}.ff_out" for i in (0, 1)}
    assert adapted == (expected | block_ff_out if regex else expected)  # never the LM head
    out = dare.generate(wrapped, torch.randint(0, 250, (1, 4)), steps=2, gen_length=4, block_length=4)
    assert out.sequences.shape == (1, 8)


# --- forward --------------------------------------------------------------------------------


def test_golden_forward(fixture_dir, model):
    g, meta = golden(fixture_dir, "forward_1")
    with torch.no_grad():
        logits = model(g["input_ids"]).logits
    assert logits.shape == tuple(meta["logits_shape"]) and logits.dtype == torch.float32
    assert (logits - g["logits"]).abs().max().item() <= 1e-4
    assert torch.equal(logits.argmax(-1), g["argmax"])


def test_bf16_forward_close(fixture_dir):
    g, _ = golden(fixture_dir, "forward_1")
    model = dare.load_model(fixture_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(g["input_ids"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    diff = (logits.float() - g["logits"]).abs()
    assert diff.mean().item() < 0.1 and diff.max().item() < 1.5  # logits span about +-30
    assert (logits.float().argmax(-1) == g["argmax"]).float().mean().item() >= 0.75


# bf16: q/k are rotated in float32 and rounded to bf16, so shifted positions round differently
@pytest.mark.parametrize("dtype, atol, mean_atol", [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 1.0, 0.1)])
def test_left_padded_forward_matches_unpadded(fixture_dir, model, dtype, atol, mean_atol):
    g, _ = golden(fixture_dir, "forward_1")
    ids = g["input_ids"]
    model = model if dtype == torch.float32 else dare.load_model(fixture_dir, dtype=dtype)
    padded = torch.cat([torch.full((1, 5), PAD), ids], dim=1)
    batch = torch.cat([padded, torch.cat([ids[:, :5], ids], dim=1)])  # row 2: no padding
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    with torch.no_grad():
        alone = model(ids).logits.float()
        both = model(batch, attention_mask=mask).logits.float()
        full = model(batch[1:]).logits.float()
    assert torch.isfinite(both).all()
    diff = (both[0, 5:] - alone[0]).abs()
    assert diff.max().item() <= atol and diff.mean().item() <= mean_atol
    assert (both[1] - full[0]).abs().max().item() <= atol  # the unpadded row is unaffected


def test_4d_masks_match_2d_mask():
    model = tiny_model()
    ids = torch.randint(0, 250, (2, 10))
    mask2d = torch.ones(2, 10, dtype=torch.long)
    mask2d[0, :3] = 0
    keep = mask2d.bool()[:, None, None, :].expand(2, 1, 10, 10)
    additive = torch.zeros(2, 1, 10, 10).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask2d).logits
        assert torch.allclose(model(ids, attention_mask=keep).logits, ref, atol=1e-6)
        assert torch.allclose(model(ids, attention_mask=additive).logits, ref, atol=1e-6)
        assert torch.equal(model(ids, attention_mask=torch.ones_like(mask2d)).logits, model(ids).logits)
        # rotary attention is relative: shifting every position leaves the logits unchanged
        shifted = torch.arange(10).repeat(2, 1) + torch.tensor([[7], [0]])
        assert torch.allclose(model(ids, position_ids=shifted).logits, model(ids).logits, atol=1e-4)


def test_tiny_model_forward_backward():
    model = tiny_model(vocab_size=300).train()
    assert model.hf_config["mask_token_id"] == 299 and model.family == "llada"
    ids = torch.randint(0, 300, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    logits = model(ids, attention_mask=mask).logits
    assert logits.shape == (2, 12, 300)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, attention_mask=mask).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_variants_gqa_tying_bias_and_meta_build():
    model = tiny_model(n_kv_heads=2, weight_tying=True, include_qkv_bias=True)
    names = set(model.state_dict())
    assert "model.transformer.ff_out.weight" not in names
    assert model.state_dict()["model.transformer.blocks.0.k_proj.weight"].shape == (16, 32)
    assert "model.transformer.blocks.1.q_proj.bias" in names
    assert "model.transformer.blocks.1.attn_out.bias" not in names
    t = model.model.transformer
    final = []
    t.ln_f.register_forward_hook(lambda mod, inp, out: final.append(out))
    with torch.no_grad():
        logits = model(torch.randint(0, 250, (1, 7))).logits
    assert torch.allclose(logits, final[0] @ t.wte.weight.T, atol=1e-5)  # tied head
    with torch.device("meta"):
        meta = LLaDAModelLM(tiny_config())
    assert all(t.is_meta for t in meta.state_dict().values())
    assert set(meta.state_dict()) == set(tiny_model().state_dict())


# --- generation -----------------------------------------------------------------------------


def test_golden_generation(fixture_dir, model):
    g, meta = golden(fixture_dir, "generate_b1_steps32_block8")
    out = dare.generate(model, g["prompt_ids"], **meta["kwargs"])
    assert torch.equal(out.sequences, g["output_ids"])
    assert torch.equal(out.unmask_step, g["unmask_step"])
    assert out.nfe == meta["decision_diagnostics"]["n_forward_calls"] == 32


def test_mask_id_defaults_to_config():
    model = tiny_model(mask_token_id=200)
    prompt = torch.randint(0, 199, (5,))
    out = generate(model, prompt, steps=4, gen_length=4, block_length=4)
    assert torch.equal(out.sequences, generate(model, prompt[None], steps=4, gen_length=4, block_length=4,
                                               mask_id=200).sequences)
    assert (out.sequences != 200).all()
    assert (generate(model, prompt, steps=4, gen_length=4, block_length=4, mask_id=255).sequences != 255).all()


def test_unmask_schedule():
    assert get_num_transfer_tokens(torch.ones(2, 8, dtype=torch.bool), 3).tolist() == [[3, 3, 2], [3, 3, 2]]
    model = tiny_model()
    out = generate(model, torch.randint(0, 250, (1, 5)), steps=6, gen_length=12, block_length=4)
    step = out.unmask_step[0]
    assert out.nfe == 6 and (out.sequences != 255).all()
    for b in range(3):  # block b is filled at steps 2b, 2b+1, two tokens each
        assert sorted(step[4 * b:4 * b + 4].tolist()) == [2 * b, 2 * b, 2 * b + 1, 2 * b + 1]


def test_left_padded_batch_generation_matches_rows_alone(fixture_dir, model):
    g, _ = golden(fixture_dir, "generate_b1_steps32_block8")
    long_p = g["prompt_ids"]
    short_p = long_p[:, 20:]
    n_pad = long_p.shape[1] - short_p.shape[1]
    batch = torch.cat([long_p, torch.cat([torch.full((1, n_pad), PAD), short_p], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :n_pad] = 0
    kw = dict(steps=8, gen_length=16, block_length=8)
    out = dare.generate(model, batch, attention_mask=mask, **kw)
    for row, prompt in enumerate((long_p, short_p)):
        alone = dare.generate(model, prompt, **kw)
        assert torch.equal(out.sequences[row, -16:], alone.sequences[0, -16:])
        assert torch.equal(out.unmask_step[row], alone.unmask_step[0])
    assert torch.equal(out.sequences[:, :batch.shape[1]], batch)


def test_random_remasking_and_temperature_reproducible():
    model = tiny_model()
    prompt = torch.randint(0, 250, (2, 6))
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=1.0, remasking="random")
    runs = [generate(model, prompt, generator=torch.Generator().manual_seed(s), **kw) for s in (1, 1, 2)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].unmask_step, runs[1].unmask_step)
    assert not (torch.equal(runs[0].sequences, runs[2].sequences)
                and torch.equal(runs[0].unmask_step, runs[2].unmask_step))
    torch.manual_seed(7)  # generator=None draws from the global RNG, as the reference
    a = generate(model, prompt, **kw)
    torch.manual_seed(7)
    b = generate(model, prompt, **kw)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.unmask_step, b.unmask_step)
    for remasking in ("low_confidence", "random"):
        out = generate(model, prompt, **{**kw, "temperature": 0.5, "remasking": remasking},
                       generator=torch.Generator().manual_seed(0))
        assert (out.unmask_step >= 0).all() and (out.sequences != 255).all()


def test_cfg_and_eos_options_run():
    model = tiny_model()
    prompt = torch.randint(0, 250, (2, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    kw = dict(steps=4, gen_length=8, block_length=4)
    plain = generate(model, prompt, attention_mask=mask, **kw)
    cfg = generate(model, prompt, attention_mask=mask, cfg_scale=1.5, **kw)
    assert cfg.nfe == plain.nfe == 4 and cfg.sequences.shape == (2, 14)
    assert (cfg.sequences[:, 6:] != 255).all()
    no_eos = generate(model, prompt, logits_eos_inf=True, **kw)
    assert (no_eos.sequences[:, 6:] != 254).all()
    late = generate(model, prompt, confidence_eos_eot_inf=True, eot_id=253, **kw)
    assert (late.unmask_step >= 0).all()
    half = generate(model.to(torch.bfloat16), prompt, attention_mask=mask, cfg_scale=1.0, temperature=0.7,
                    generator=torch.Generator().manual_seed(0), **kw)
    assert (half.sequences[:, 6:] != 255).all() and (half.unmask_step >= 0).all()


@pytest.mark.parametrize("kwargs, word", [
    (dict(gen_length=10, block_length=4), "block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "steps"),
    (dict(gen_length=300, block_length=300, steps=300), "max_sequence_length"),
    (dict(remasking="top_k"), "remasking"),
    (dict(confidence_eos_eot_inf=True), "eot_id"),  # LLaDA's 126348 is outside a tiny vocab
])
def test_generate_errors(kwargs, word):
    kw = dict(steps=4, gen_length=8, block_length=8) | kwargs
    with pytest.raises(ValueError, match=word):
        generate(tiny_model(), torch.zeros(1, 4, dtype=torch.long), **kw)


# --- checkpoints ----------------------------------------------------------------------------


def test_save_load_round_trip(fixture_dir, model, tmp_path):
    folder = dare.save_model(model, tmp_path / "ckpt", tokenizer_from=fixture_dir, dtype=torch.bfloat16)
    original = load_file(str(fixture_dir / "model.safetensors"))
    saved = load_file(str(folder / "model.safetensors"))
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)  # bf16 -> fp32 -> bf16 is exact
    reloaded = dare.load_model(folder, dtype=torch.float32)
    ids = torch.randint(0, 8000, (1, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llada"


def test_model_type_and_weight_mismatch_errors(fixture_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(fixture_dir, other, ignore=shutil.ignore_patterns("golden", "tokenizer.json"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "not_llada"}))
    with pytest.raises(CheckpointError, match="llada"):
        dare.load_model(other)
    (other / "config.json").write_text(json.dumps({**config, "n_kv_heads": 2, "weight_tying": True}))
    with pytest.raises(CheckpointError, match="weights do not match model_type 'llada'"):
        dare.load_model(other)
