"""The spg plugin (Sandwiched Policy Gradient): masks, ELBO / EUBO, the loss, tiny-model learning."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import dare_plugins.spg as spg_plugin
from dare.plugins import PluginManager, registry
from dare.protocol import ModelOutput
from dare.recipe import RecipeError, parse_options
from dare_plugins.spg import (SPGConfig, spg_bounds, spg_logps, spg_loss, spg_masks, spg_prepare,
                              spg_sequence_logp, validate_recipe)
from rl_helpers import rollout

LN2, LN3 = math.log(2), math.log(3)
VOCAB = 32


def family(name):
    return registry().families.get(name)


# --- registration and options ------------------------------------------------------------------------------


def test_registered_with_reference_defaults():
    reg = PluginManager(plugins=[spg_plugin], entry_points=False).registry
    algo = reg.algorithms.get("spg")
    assert algo.kind == "rl" and algo.prepare is spg_prepare and not algo.needs_reference
    cfg = SPGConfig()
    assert (cfg.num_iterations, cfg.forward_type, cfg.num_t, cfg.min_t, cfg.max_t, cfg.block_length,
            cfg.logp_estimation, cfg.eubo_beta, cfg.mix_weight, cfg.p_mask_prompt, cfg.use_mask_prompt) == \
        (4, "block_random", 2, 0.0, 1.0, 32, "mix", 1.5, 0.5, 0.15, True)
    for bad in ({"forward_type": "blocks"}, {"forward_type": "all"}, {"logp_estimation": "upper"},
                {"eubo_beta": 0.0}, {"mix_weight": 1.5}, {"min_t": 0.8, "max_t": 0.2}):
        with pytest.raises(RecipeError):
            parse_options(SPGConfig, bad, "algorithm")


def test_rejects_block_causal_families():
    fam = family("sdar")
    b = rollout(torch.zeros(1, 8, dtype=torch.long), 4, [1.0])
    with pytest.raises(ValueError, match="bidirectional"):
        spg_loss(None, b, SPGConfig(block_length=2), fam)
    with pytest.raises(ValueError, match="bidirectional"):
        spg_prepare(None, b, SPGConfig(block_length=2), fam)
    reg = registry()
    recipe = lambda name: SimpleNamespace(algorithm_name="spg", model=SimpleNamespace(family=name))  # noqa: E731
    assert len(validate_recipe(recipe("sdar"), reg)) == 1
    assert validate_recipe(recipe("llada"), reg) == [] and validate_recipe(recipe("dream"), reg) == []


# --- masks ----------------------------------------------------------------------------------------------------


def test_all_masks_the_completion_and_real_prompt_tokens_only():
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :6] = 0
    cm = torch.ones(2, 10, dtype=torch.bool)
    m = spg_masks(am, cm, torch.tensor([1, 2]), 0, "all", 1, use_mask_prompt=False)
    assert m.shape == (2, 1, 30) and m[:, :, 20:].all() and not m[:, :, :20].any()
    m = spg_masks(am, cm, torch.tensor([1, 2]), 0, "all", 1, p_mask_prompt=0.5)
    assert m[:, :, 20:].all() and m[:, :, :20].any() and not m[1, :, :6].any()


def test_block_random_draws_exactly_as_documented():
    """P = 3, C = 6 (three blocks of 2), n = 5 counted tokens: covered blocks nb = 3. The row's
    generator draws randperm(3) % 3 (first num_t = the chosen blocks), then per sample the count
    l ~ U{1..span} and randperm(span), then u (num_t, P + C) for the context masking (p = 0.4)."""
    P, C, bl, n, num_t, p = 3, 6, 2, 5, 2, 0.4
    am = torch.ones(1, P + C, dtype=torch.long)
    cm = (torch.arange(C) < n)[None]
    seed = 77
    for k in range(6):
        got = spg_masks(am, cm, torch.tensor([seed]), k, "block_random", num_t, bl, 0.0, 1.0, True, p)[0]
        g = torch.Generator().manual_seed(seed * 1000 + k)
        picked = (torch.randperm(3, generator=g) % 3)[:num_t].tolist()
        expect = torch.zeros(num_t, P + C, dtype=torch.bool)
        context = torch.ones(num_t, P + C, dtype=torch.bool)
        for j, b in enumerate(picked):
            start = P + b * bl
            span = min(bl, n - bl * b)
            count = int(torch.randint(1, span + 1, (1,), generator=g))
            chosen = torch.randperm(span, generator=g)[:count]
            expect[j, start + span:] = True
            expect[j, start + chosen] = True
            context[j, start:] = False
        expect |= context & (torch.rand(num_t, P + C, generator=g) < p)
        assert torch.equal(got, expect), k


@pytest.mark.parametrize("forward_type", ["block_all", "block_random"])
def test_block_masks_structure(forward_type):
    """Without context masking: columns before the chosen block clean, blocks after it fully masked,
    columns past the counted length masked (block_random); block_all masks the chosen block whole."""
    P, C, bl = 4, 16, 4
    B = 40
    am = torch.ones(B, P + C, dtype=torch.long)
    n = torch.randint(1, C + 1, (B,), generator=torch.Generator().manual_seed(0))
    cm = torch.arange(C)[None] < n[:, None]
    m = spg_masks(am, cm, torch.arange(B), 0, forward_type, 2, bl, use_mask_prompt=False)[:, :, P:]
    for i in range(B):
        covered = (int(n[i]) - 1) // bl + 1
        for j in range(2):
            first = int(m[i, j].nonzero()[0])
            b = first // bl
            assert b < covered and not m[i, j, :b * bl].any() and m[i, j, (b + 1) * bl:].all()
            block = m[i, j, b * bl:(b + 1) * bl]
            span = min(bl, int(n[i]) - b * bl)
            if forward_type == "block_all":
                assert block.all()
            else:
                assert 1 <= int(block[:span].sum()) <= span and block[span:].all()


def test_random_masks_counts_and_errors():
    """random: l in [max(int(n min_t), 1), min(int(n max_t), n)] of the n counted tokens."""
    am = torch.ones(30, 14, dtype=torch.long)
    cm = torch.zeros(30, 10, dtype=torch.bool)
    cm[:, :8] = True
    m = spg_masks(am, cm, torch.arange(30), 1, "random", 3, min_t=0.25, max_t=0.5, use_mask_prompt=False)
    counts = m[:, :, 4:12].sum(-1)
    assert counts.min() >= 2 and counts.max() <= 4 and m[:, :, 12:].all() and not m[:, :, :4].any()
    with pytest.raises(ValueError, match="multiple of block_length"):
        spg_masks(am, cm, torch.arange(30), 0, "block_random", 1, block_length=3)
    with pytest.raises(ValueError, match="exceeds"):
        spg_masks(am, cm, torch.arange(30), 0, "block_random", 6, block_length=2)
    with pytest.raises(ValueError, match="num_t == 1"):
        spg_masks(am, cm, torch.arange(30), 0, "all", 2)
    # fresh per iteration, a function of the row's seed only
    m0 = spg_masks(am, cm, torch.arange(30), 0, "random", 2)
    assert not torch.equal(m0, spg_masks(am, cm, torch.arange(30), 1, "random", 2))
    assert torch.equal(spg_masks(am[5:6], cm[5:6], torch.arange(5, 6), 0, "random", 2)[0], m0[5])


# --- the bounds -------------------------------------------------------------------------------------------------


def test_spg_bounds_hand_computed():
    """Row 0: two samples over 4 columns (column 3 not counted), logps
        s0 = (-ln2, -ln4, *, *), masked (T, T, F, T);   s1 = (*, -ln4, -ln2, *), masked (F, T, T, T).
    ELBO = mean_s of the masked counted mean = ((-ln2 - 2ln2)/2 + (-2ln2 - ln2)/2) / 2 = -1.5 ln 2.
    t_s = 2/3. beta = 1: a_0 = (1/2)(1/2)/(2/3) = 3/8, a_1 = (1/2)(2 (1/4)/(2/3)) = 3/8, a_2 = 3/8,
    EUBO = log(3/8). beta = 2: a = (3/16, 3/32, 3/16), EUBO = (ln3 - 13/3 ln2) / 2.
    Row 1: column 0 counted and masked in both samples, t = 1/3, logp -ln 2: ELBO = -ln 2;
    beta = 1: a_0 = (1/2) 2 (1/2)/(1/3) = 3/2, EUBO = ln 3 - ln 2 (the other columns never masked)."""
    X = 7.0  # unused entries
    logps = torch.tensor([[[-LN2, -2 * LN2, X, X], [X, -2 * LN2, -LN2, X]],
                          [[-LN2] * 4, [-LN2] * 4]])
    masked = torch.tensor([[[True, True, False, True], [False, True, True, True]],
                           [[True, False, False, False], [True, False, False, False]]])
    cm = torch.tensor([[True, True, True, False], [True, True, True, False]])
    elbo, eubo = spg_bounds(logps, masked, cm, 1.0)
    torch.testing.assert_close(elbo, torch.tensor([-1.5 * LN2, -LN2]))
    torch.testing.assert_close(eubo, torch.tensor([math.log(3 / 8), LN3 - LN2]))
    _, eubo2 = spg_bounds(logps, masked, cm, 2.0)
    torch.testing.assert_close(eubo2[0], torch.tensor((LN3 - 13 / 3 * LN2) / 2))
    # gradients stay finite although some columns are never masked
    lp = logps.clone().requires_grad_(True)
    e, u = spg_bounds(lp, masked, cm, 1.5)
    (e.sum() + u.sum()).backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[1, :, 1:].abs().sum() == 0


def test_spg_sequence_logp_by_advantage_sign():
    elbo, eubo = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5, -1.0, -1.0])
    adv = torch.tensor([1.0, -1.0, 0.0])  # A = 0 takes the negative branch, as reward_mask = A > 0
    torch.testing.assert_close(spg_sequence_logp(elbo, eubo, adv, "mix", 0.5), torch.tensor([-1.0, -1.5, -2.0]))
    torch.testing.assert_close(spg_sequence_logp(elbo, eubo, adv, "mix", 0.25), torch.tensor([-1.0, -1.75, -2.5]))
    torch.testing.assert_close(spg_sequence_logp(elbo, eubo, adv, "eubo"), torch.tensor([-1.0, -1.0, -1.0]))
    torch.testing.assert_close(spg_sequence_logp(elbo, eubo, adv, "elbo"), elbo)
    torch.testing.assert_close(spg_sequence_logp(elbo, eubo, adv, "zero"), torch.tensor([-1.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        spg_sequence_logp(elbo, eubo, adv, "upper")


class TableModel(torch.nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        from dare_plugins.llada.modeling import tiny_config
        self.table = table
        self.hf_config = tiny_config(vocab_size=table.shape[-1])

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        n = input_ids.shape[0]
        return ModelOutput(logits=self.table[:1].expand(n, *self.table.shape[1:]).clone())


def test_spg_loss_hand_computed():
    """Uniform logits over vocab 4: every token has logp = -ln 4. forward_type "all", one sample,
    no context masking: t = 1, so ELBO = EUBO = -ln 4 whatever the sign. A = (1, -1), counted
    lengths (2, 1), mean N = 1.5: L_i = -A_i (-ln 4) |o_i| / N = (2 ln4 / 1.5, -ln4 / 1.5);
    sequence normalisation: (ln 4, -ln 4)."""
    ids = torch.tensor([[0, 1, 0, 1], [2, 0, 1, 2]])
    cm = torch.tensor([[True, True], [True, False]])
    b = rollout(ids, 2, [1.0, -1.0], cm)
    model, fam = TableModel(torch.zeros(1, 4, 4)), family("llada")
    cfg = SPGConfig(forward_type="all", num_t=1, use_mask_prompt=False, num_iterations=1)
    loss, metrics = spg_loss(model, b, cfg, fam)
    torch.testing.assert_close(loss, torch.tensor([2 * 2 * LN2 / 1.5, -2 * LN2 / 1.5]))
    assert metrics["elbo"] == pytest.approx(-4 * LN2) and metrics["eubo"] == pytest.approx(-4 * LN2)
    assert metrics["positive_rows"] == 1.0
    seq, _ = spg_loss(model, b, SPGConfig(forward_type="all", num_t=1, use_mask_prompt=False,
                                          normalization="sequence"), fam)
    torch.testing.assert_close(seq, torch.tensor([2 * LN2, -2 * LN2]))


def test_spg_eubo_with_uniform_logits_follows_the_masks():
    """p = 1/4 everywhere: ELBO = -ln 4 exactly, and
    EUBO = -ln 4 + (1/beta) mean_{c masked somewhere} log((1/n) sum_s M_sc / t_s)."""
    ids = torch.randint(0, 4, (3, 10), generator=torch.Generator().manual_seed(0))
    cm = torch.ones(3, 8, dtype=torch.bool)
    cm[2, 5:] = False
    b = rollout(ids, 8, [1.0, -1.0, -1.0], cm)
    cfg = SPGConfig(block_length=2, num_t=3, eubo_beta=1.5)
    masks = spg_masks(b.attention_mask, cm, b.noise_seeds, 0, "block_random", 3, 2)
    lp = spg_logps(TableModel(torch.zeros(1, 10, 4)), family("llada"), b, masks, 3)
    torch.testing.assert_close(lp, torch.full((3, 3, 8), -2 * LN2))
    elbo, eubo = spg_bounds(lp, masks[:, :, 2:], cm, cfg.eubo_beta)
    torch.testing.assert_close(elbo, torch.full((3,), -2 * LN2))
    for i in range(3):
        M = masks[i, :, 2:] & cm[i]
        t = M.sum(1).float() / cm[i].sum()
        a = (M.float() / t[:, None]).mean(0)
        valid = a > 0
        expect = -2 * LN2 + float(a[valid].log().mean()) / 1.5
        assert float(eubo[i]) == pytest.approx(expect, rel=1e-5)


# --- tiny models ------------------------------------------------------------------------------------------------------


def tiny(name: str = "llada", seed: int = 0) -> torch.nn.Module:
    if name == "llada":
        from dare_plugins.llada.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB)
    else:
        from dare_plugins.dream.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB, mask_token_id=31, pad_token_id=30, eos_token_id=30, bos_token_id=29)
    model = family(name).build(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model.train()


def tiny_batch(B=4, P=6, C=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 28, (B, P + C), generator=g)
    am = torch.ones(B, P + C, dtype=torch.long)
    am[0, :2] = 0
    ids[0, :2] = 30
    cm = torch.ones(B, C, dtype=torch.bool)
    cm[1, 5:] = False
    return rollout(ids, C, [1.0, -1.0, 0.5, -0.5], cm, am, seeds=torch.tensor([3, 1, 4, 1 << 40]))


@pytest.mark.parametrize("forward_type", ["block_random", "block_all", "random"])
def test_eubo_is_above_elbo_with_one_sample(forward_type):
    """With one sample (num_t = 1) every masked counted token c enters the EUBO as
    (1/beta) log(p_c^beta / t) = log p_c + (1/beta) log(1/t) >= log p_c (t <= 1), and the ELBO is the
    mean of log p_c over the same tokens, so EUBO >= ELBO, with equality when t = 1 ("all" without
    context masking). Checked on a tiny LLaDA model over several iterations' masks."""
    model, fam = tiny(), family("llada")
    b = tiny_batch()
    with torch.no_grad():
        for k in range(4):
            masks = spg_masks(b.attention_mask, b.completion_mask, b.noise_seeds, k, forward_type, 1, 4)
            lp = spg_logps(model, fam, b, masks, 31)
            elbo, eubo = spg_bounds(lp, masks[:, :, 6:], b.completion_mask, 1.5)
            assert (eubo >= elbo - 1e-6).all() and (eubo > elbo + 1e-3).any()
        masks = spg_masks(b.attention_mask, b.completion_mask, b.noise_seeds, 0, "all", 1, use_mask_prompt=False)
        elbo, eubo = spg_bounds(spg_logps(model, fam, b, masks, 31), masks[:, :, 6:], b.completion_mask, 1.5)
    torch.testing.assert_close(eubo, elbo)


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_tiny_model_loss_finite_backward_and_split_invariant(name):
    fam, model = family(name), tiny(name)
    cfg = SPGConfig(block_length=4)
    b = spg_prepare(model, tiny_batch(), cfg, fam)
    assert set(b.extras) == {"token_norm"}
    b.iteration = 3
    loss, metrics = spg_loss(model, b, cfg, fam)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and metrics["positive_rows"] == 2.0
    loss.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        halves = torch.cat([spg_loss(model, part, cfg, fam)[0] for part in b.chunk(2)])
        whole = spg_loss(model, b, cfg, fam)[0]
    torch.testing.assert_close(halves, whole, atol=1e-5, rtol=1e-5)
    b.iteration = 4
    with pytest.raises(ValueError, match="outside"):
        spg_loss(model, b, cfg, fam)


def masked_logp_gap(model, fam, batch):
    from dare_plugins.d1 import d1_logps
    with torch.no_grad():
        lp = d1_logps(model, fam, batch, 0, 31, 0.0)
    return float(lp[0].mean() - lp[1].mean())


def learning_batch():
    prompt = [3, 7, 11, 5]
    ids = torch.tensor([prompt + [12, 13, 14, 30], prompt + [20, 21, 22, 30]])
    return rollout(ids, 4, [1.0, -1.0], seeds=torch.tensor([101, 202]))


def test_learning_raises_the_positive_completion():
    """SPG's defaults (block_random, num_t 2, mix) with blocks of 2 on a 4-token completion."""
    fam, model = family("llada"), tiny()
    cfg = SPGConfig(block_length=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = masked_logp_gap(model, fam, learning_batch())
    for step in range(3):
        b = learning_batch()
        b.noise_seeds = b.noise_seeds + 7 * step
        b = spg_prepare(model, b, cfg, fam)
        for k in range(cfg.num_iterations):
            b.iteration = k
            loss = spg_loss(model, b, cfg, fam)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = masked_logp_gap(model, fam, learning_batch())
    assert after > before + 1.0, (before, after)
