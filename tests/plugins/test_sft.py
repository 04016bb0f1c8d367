"""The sft plugin: the masked-diffusion objective per family (LLaDA, Dream, SDAR)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dare.data import Encoded, collate
from dare.plugins import registry
from dare.protocol import ModelOutput
from dare.recipe import RecipeError, parse_options
from dare_plugins.sdar.modeling import block_diff_mask, block_diffusion_training_mask
from dare_plugins.sft import SFTConfig, family_defaults, resolve, sft_loss, sft_objective, validate_recipe
from dare_plugins.sft.loss import forward_noise, masked_diffusion_loss, row_normalizer

LN2, LN3 = math.log(2), math.log(3)


def family(name):
    return registry().families.get(name)


# --- the loss on given noise, hand-computed per family -----------------------------------------


def test_masked_diffusion_loss_hand_computed():
    """Two rows, vocab 3.

    Row 0: answer length 2, p_mask 0.5, masked position 1 (target 2), logits (0, 0, ln 2)
        CE = -log(2/4) = ln 2; L0 = ln2 / 0.5 / 2 = ln 2.
    Row 1: answer length 4, p_mask 0.25, masked positions 0 (target 0, logits 0,0,0: CE ln 3)
        and 2 (target 1, logits (0, ln 2, 0): CE = -log(2/4) = ln 2);
        L1 = (ln3 + ln2) / 0.25 / 4 = ln 6.
    """
    logits = torch.zeros(2, 3, 3)
    logits[0, 1, 2] = math.log(2)
    logits[1, 2, 1] = math.log(2)
    targets = torch.tensor([[0, 2, 0], [0, 0, 1]])
    masked = torch.tensor([[False, True, False], [True, False, True]])
    loss = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5, 0.25]), torch.tensor([2, 4]))
    torch.testing.assert_close(loss, torch.tensor([math.log(2), math.log(6)]))


class TableModel(torch.nn.Module):
    """Returns a fixed logits table whatever the input, and records how it was called."""

    def __init__(self, table: torch.Tensor, **config):
        super().__init__()
        self.table = table
        self.hf_config = config
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        self.calls.append((input_ids, attention_mask, position_ids))
        assert input_ids.shape[1] == self.table.shape[1], "logits table does not fit the input"
        return ModelOutput(logits=self.table.clone())


# Shared example: 2 rows of 4 tokens, vocab 3, token 2 of row 1 is the mask id's stand-in.
CLEAN = torch.tensor([[1, 2, 1, 0], [0, 1, 1, 2]])
LOSS_MASK = torch.tensor([[False, True, True, True], [False, False, True, True]])  # |r| = 3, 2
MASKED = torch.tensor([[False, True, False, True], [False, False, True, False]])
NOISY = CLEAN.masked_fill(MASKED, 2)
P_MASK = torch.tensor([0.5, 0.25])


def test_llada_objective_hand_computed():
    """LLaDA: position j scores token j; Z = answer length.

    Row 0: masked 1 (target 2, logits (0, 0, ln2): CE ln2) and 3 (target 0, logits 0: CE ln3);
        L0 = (ln2 + ln3) / 0.5 / 3 = 2 ln6 / 3.
    Row 1: masked 2 (target 1, logits (0, ln2, 0): CE ln2); L1 = ln2 / 0.25 / 2 = 2 ln2.
    """
    table = torch.zeros(2, 4, 3)
    table[0, 1] = torch.tensor([0, 0, LN2])
    table[1, 2] = torch.tensor([0, LN2, 0])
    table[0, 0] = table[0, 2] = table[1, 1] = torch.tensor([5.0, -5.0, 0.0])  # unused rows
    fam = family("llada")
    assert resolve(SFTConfig(), fam).normalize == "answer_length"
    loss = sft_objective(TableModel(table), fam, CLEAN, NOISY, MASKED, P_MASK, LOSS_MASK, "answer_length")
    torch.testing.assert_close(loss, torch.tensor([2 * math.log(6) / 3, 2 * LN2]))


def test_dream_objective_hand_computed():
    """Dream: logits are shifted right (position j - 1 scores token j, so the first response
    token is scored at the last prompt position); Z = number of masked tokens; p_mask = t.

    Row 0: token 1 (target 2) from table row 0 = (0, 0, ln2): CE ln2; token 3 (target 0) from
        table row 2 = (ln2, 0, 0): CE ln2; L0 = (ln2 + ln2) / 0.5 / 2 = 2 ln2.
    Row 1: token 2 (target 1) from table row 1 = (0, 0, 0): CE ln3; L1 = ln3 / 0.25 / 1 = 4 ln3.
    The unshifted rows (table rows 1, 3 of row 0 and row 2 of row 1) hold misleading logits.
    """
    table = torch.zeros(2, 4, 3)
    table[0, 0] = torch.tensor([0, 0, LN2])
    table[0, 2] = torch.tensor([LN2, 0, 0])
    table[0, 1] = table[0, 3] = table[1, 2] = torch.tensor([-5.0, 5.0, -5.0])
    fam = family("dream")
    opts = resolve(SFTConfig(), fam)
    assert (opts.normalize, opts.eps, opts.ensure_masked) == ("masked_tokens", 0.0, False)
    loss = sft_objective(TableModel(table), fam, CLEAN, NOISY, MASKED, P_MASK, LOSS_MASK, "masked_tokens")
    torch.testing.assert_close(loss, torch.tensor([2 * LN2, 4 * LN3]))
    # the same rows with answer-length normalisation: Z = 3, 2
    loss = sft_objective(TableModel(table), fam, CLEAN, NOISY, MASKED, P_MASK, LOSS_MASK, "answer_length")
    torch.testing.assert_close(loss, torch.tensor([4 * LN2 / 3, 2 * LN3]))


def test_sdar_objective_hand_computed():
    """SDAR: one forward of [noisy | clean] (length 8, positions 0..3 twice) under the
    block-diffusion mask; the noisy half's logits score the clean tokens in place; Z = answer
    length. The table's noisy half is LLaDA's example, so L = (2 ln6 / 3, 2 ln2); the clean half
    holds misleading logits that must not be used.
    """
    table = torch.full((2, 8, 3), 0.0)
    table[0, 1] = torch.tensor([0, 0, LN2])
    table[1, 2] = torch.tensor([0, LN2, 0])
    table[:, 4:] = torch.tensor([-5.0, -5.0, 5.0])
    model = TableModel(table, block_size=2)
    fam = family("sdar")
    assert resolve(SFTConfig(), fam).ensure_masked is True
    loss = sft_objective(model, fam, CLEAN, NOISY, MASKED, P_MASK, LOSS_MASK, "answer_length")
    torch.testing.assert_close(loss, torch.tensor([2 * math.log(6) / 3, 2 * LN2]))
    (ids, mask, pos), = model.calls
    assert torch.equal(ids, torch.cat([NOISY, CLEAN], dim=1))
    assert torch.equal(pos, torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * 2))
    assert torch.equal(mask, block_diffusion_training_mask(4, 2)[None, None].expand(2, 1, 8, 8))


def test_row_normalizer():
    assert torch.equal(row_normalizer("answer_length", LOSS_MASK, MASKED), torch.tensor([3.0, 2.0]))
    nothing = torch.zeros_like(MASKED)
    assert torch.equal(row_normalizer("masked_tokens", LOSS_MASK, nothing), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="unknown normalize"):
        row_normalizer("tokens", LOSS_MASK, MASKED)


# --- the forward process ------------------------------------------------------------------------


def test_forward_noise_keeps_prompt_and_depends_only_on_row_seed():
    ids = torch.arange(40).reshape(2, 20)
    loss_mask = torch.arange(20)[None].expand(2, 20) >= 5
    noisy, masked, p = forward_noise(ids, loss_mask, torch.tensor([7, 8]), mask_id=99)
    assert not masked[:, :5].any()
    assert torch.equal(noisy[masked], torch.full((int(masked.sum()),), 99))
    assert torch.equal(noisy[~masked], ids[~masked])
    # row 1 alone with the same seed gets the same noise
    n1, m1, p1 = forward_noise(ids[1:], loss_mask[1:], torch.tensor([8]), mask_id=99)
    assert torch.equal(n1[0], noisy[1]) and p1[0] == p[1]
    assert (0.001 <= p).all() and (p <= 1).all()


def test_forward_noise_draw_order():
    """Per row: a generator seeded with the row's seed draws t, then u (L values);
    p_mask = (1 - eps) t + eps and position j is masked iff u_j < p_mask and it is a loss position."""
    ids = torch.arange(30).reshape(3, 10)
    loss_mask = torch.arange(10)[None].expand(3, 10) >= torch.tensor([[2], [4], [9]])
    seeds = torch.tensor([3, 1234, 2**40 + 5])
    for eps in (1e-3, 0.0):
        _, masked, p = forward_noise(ids, loss_mask, seeds, mask_id=-1, eps=eps)
        for i in range(3):
            g = torch.Generator().manual_seed(int(seeds[i]))
            t = torch.rand(1, generator=g)
            u = torch.rand(10, generator=g)
            expect_p = (1 - eps) * t + eps
            torch.testing.assert_close(p[i:i + 1], expect_p)
            assert torch.equal(masked[i], (u < expect_p) & loss_mask[i])


def test_mask_rate_follows_p_mask():
    ids = torch.zeros(64, 400, dtype=torch.long)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    _, masked, p = forward_noise(ids, loss_mask, torch.arange(64), mask_id=1)
    torch.testing.assert_close(masked.float().mean(1), p, atol=0.08, rtol=0)


def test_ensure_masked_masks_at_least_one_response_token():
    """SDAR's rule: redraw until something is masked, else force one response token.
    Rows whose first draw masks something get exactly the plain noise."""
    n = 300
    ids = torch.arange(6).repeat(n, 1)
    loss_mask = torch.zeros(n, 6, dtype=torch.bool)
    loss_mask[:, 5] = True  # a single response token: often unmasked at the first draw
    seeds = torch.arange(n)
    _, plain, p_plain = forward_noise(ids, loss_mask, seeds, mask_id=-1)
    _, sure, p_sure = forward_noise(ids, loss_mask, seeds, mask_id=-1, ensure_masked=True)
    assert not plain.all(dim=0)[5] and sure[:, 5].all() and not sure[:, :5].any()
    first = plain.any(dim=1)
    assert torch.equal(sure[first], plain[first]) and torch.equal(p_sure[first], p_plain[first])
    assert not torch.equal(p_sure[~first], p_plain[~first])  # redrawn noise levels
    # a row with no response token stays clean
    _, none, _ = forward_noise(ids[:2], torch.zeros(2, 6, dtype=torch.bool), seeds[:2], -1, ensure_masked=True)
    assert not none.any()
    # still a function of the row's seed only
    _, alone, _ = forward_noise(ids[7:8], loss_mask[7:8], seeds[7:8], -1, ensure_masked=True)
    assert torch.equal(alone[0], sure[7])


def test_treat_eos_as_one_masks_the_eos_tail_together():
    eos = 9
    ids = torch.tensor([[1, 2, 3, eos, eos, eos, eos]] * 200)
    loss_mask = torch.tensor([[False, True, True, True, True, True, True]] * 200)
    seeds = torch.arange(200)
    _, plain, _ = forward_noise(ids, loss_mask, seeds, mask_id=0)
    _, grouped, _ = forward_noise(ids, loss_mask, seeds, mask_id=0, eos_id=eos)
    tail = grouped[:, 3:]
    assert (tail.all(dim=1) | ~tail.any(dim=1)).all()  # all or nothing
    assert torch.equal(tail[:, 0], plain[:, 3])  # decided by the first EOS's own draw
    assert torch.equal(grouped[:, :3], plain[:, :3])


# --- options --------------------------------------------------------------------------------------


def test_family_defaults_and_overrides():
    assert family_defaults(family("llada")) == {"eps": 1e-3, "normalize": "answer_length", "ensure_masked": False}
    assert family_defaults(family("dream")) == {"eps": 0.0, "normalize": "masked_tokens", "ensure_masked": False}
    assert family_defaults(family("sdar")) == {"eps": 1e-3, "normalize": "answer_length", "ensure_masked": True}
    opts = resolve(SFTConfig(eps=0.01, normalize="answer_length", ensure_masked=False), family("dream"))
    assert (opts.eps, opts.normalize, opts.ensure_masked, opts.treat_eos_as_one) == (0.01, "answer_length", False, False)
    parsed = parse_options(SFTConfig, {"normalize": "masked_tokens", "treat_eos_as_one": True}, "algorithm")
    assert parsed.normalize == "masked_tokens" and parsed.treat_eos_as_one and parsed.eps is None
    for bad in ({"normalize": "tokens"}, {"eps": 1.0}, {"eps": -0.1}):
        with pytest.raises(RecipeError):
            parse_options(SFTConfig, bad, "algorithm")


def test_validate_recipe_accepts_every_installed_family():
    reg = registry()
    for name in ("llada", "dream", "sdar"):
        recipe = SimpleNamespace(algorithm_name="sft", model=SimpleNamespace(family=name))
        assert validate_recipe(recipe, reg) == []
    # a block-causal family must say how to run it as a denoiser
    import dataclasses
    lacking = dataclasses.replace(reg.families.get("sdar"), denoiser_logits=None)
    fake = SimpleNamespace(families=_OneFamily(lacking))
    errors = validate_recipe(SimpleNamespace(algorithm_name="sft", model=SimpleNamespace(family="sdar")), fake)
    assert len(errors) == 1 and "denoiser_logits" in errors[0]


class _OneFamily:
    def __init__(self, fam):
        self.fam = fam

    def __contains__(self, name):
        return name == self.fam.name

    def get(self, name):
        return self.fam


# --- tiny models of each family -------------------------------------------------------------------

VOCAB = 32


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of the family with vocab 32 (mask 31, eos = pad 30), weights ~ N(0, 0.1)."""
    fam = family(name)
    if name == "llada":
        from dare_plugins.llada.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB)  # mask = V - 1, eos = pad = V - 2
    elif name == "dream":
        from dare_plugins.dream.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB, mask_token_id=31, pad_token_id=30, eos_token_id=30, bos_token_id=29)
    else:
        from dare_plugins.sdar.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB, mask_token_id=31, bos_token_id=30, eos_token_id=30, block_size=4)
    model = fam.build(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    special = fam.special_tokens(config)
    assert (special.mask_id, special.eos_id, special.pad_id) == (31, 30, 30)
    return model.train()


def fixed_batch(rows: int = 4, length: int = 14, seed: int = 0):
    """Prompt + response + <EOS>, right-padded with <EOS> (= 30), as dare.data collates them."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(rows):
        prompt = 3 + i % 3
        response = 4 + (i * 2) % 5
        ids = torch.randint(0, 28, (prompt + response,), generator=g).tolist() + [30]
        items.append(Encoded(ids, prompt))
    return collate(items, length, pad_id=30, seeds=[100 + i for i in range(rows)])


@pytest.mark.parametrize("name", ["llada", "dream", "sdar"])
def test_tiny_model_loss_finite_backward_and_split_invariant(name):
    model = tiny(name)
    fam = family(name)
    batch = fixed_batch()
    loss, metrics = sft_loss(model, batch, SFTConfig(), fam)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss >= 0).all()
    assert metrics["masked_tokens"] > 0 and 0 < metrics["mask_ratio"] <= 4
    loss.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # the same rows in two micro-batches give the same per-row losses
    with torch.no_grad():
        halves = torch.cat([sft_loss(model, part, SFTConfig(), fam)[0] for part in batch.chunk(2)])
        whole = sft_loss(model, batch, SFTConfig(), fam)[0]
    torch.testing.assert_close(halves, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llada", "dream", "sdar"])
def test_tiny_model_loss_falls_on_a_fixed_batch(name):
    model = tiny(name)
    fam = family(name)
    batch = fixed_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = sft_loss(model, batch, SFTConfig(), fam)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def test_sdar_denoiser_logits_equal_a_direct_training_forward():
    """The noisy half of [noisy | clean] under the block-diffusion training mask, and no leak:
    a noisy block never sees its own or later clean blocks, nor other noisy blocks."""
    from dare_plugins.sdar.training import denoiser_logits

    model = tiny("sdar").eval()
    batch = fixed_batch()
    clean = batch.input_ids
    noisy, masked, _ = forward_noise(clean, batch.loss_mask, batch.noise_seeds, mask_id=31)
    assert masked.any()
    L, bs = clean.shape[1], 4
    with torch.no_grad():
        got = denoiser_logits(model, noisy, clean)
        assert got.shape == (4, L, VOCAB)
        assert torch.equal(got, family("sdar").denoiser_logits(model, noisy, clean))
        idx = torch.arange(2 * L)
        mask = block_diff_mask(None, None, idx[:, None], idx[None, :], block_size=bs, n=L)
        pos = torch.arange(L).repeat(2)[None].expand(4, 2 * L)
        direct = model(torch.cat([noisy, clean], 1), attention_mask=mask, position_ids=pos).logits[:, :L]
        torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)
        # clean tokens of block 1 (positions 4..7): seen by noisy block 2 only
        clean2 = clean.clone()
        clean2[:, 4:8] = (clean2[:, 4:8] + 1) % 28
        other = denoiser_logits(model, noisy, clean2)
        torch.testing.assert_close(other[:, :8], got[:, :8], atol=1e-5, rtol=1e-5)
        assert (other[:, 8:12] - got[:, 8:12]).abs().max() > 1e-3
        # noisy tokens of blocks 0 and 2: not seen by noisy block 1
        noisy2 = noisy.clone()
        noisy2[:, :4] = 31
        noisy2[:, 8:] = (noisy2[:, 8:] + 1) % 28
        other = denoiser_logits(model, noisy2, clean)
        torch.testing.assert_close(other[:, 4:8], got[:, 4:8], atol=1e-5, rtol=1e-5)
