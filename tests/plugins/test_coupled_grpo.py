"""The coupled_grpo plugin (DiffuCoder's Coupled-GRPO): complementary masks, the three-view
estimate, the loss, prepare, tiny-model learning."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import dare_plugins.coupled_grpo as coupled_plugin
from dare.plugins import PluginManager, registry
from dare.protocol import ModelOutput
from dare.recipe import RecipeError, parse_options
from dare_plugins.coupled_grpo import (CoupledGRPOConfig, coupled_combine, coupled_grpo_loss, coupled_grpo_prepare,
                                       coupled_logps, coupled_masks, coupled_views)
from rl_helpers import rollout

LN2, LN3 = math.log(2), math.log(3)
VOCAB = 32


def family(name):
    return registry().families.get(name)


# --- registration and options ----------------------------------------------------------------------------


def test_registered_with_diffucoder_defaults():
    reg = PluginManager(plugins=[coupled_plugin], entry_points=False).registry
    algo = reg.algorithms.get("coupled_grpo")
    assert algo.kind == "rl" and algo.prepare is coupled_grpo_prepare and algo.needs_reference
    cfg = CoupledGRPOConfig()
    assert (cfg.num_iterations, cfg.t_min, cfg.t_max, cfg.epsilon, cfg.beta, cfg.normalization) == \
        (2, 0.2, 0.8, 0.5, 0.01, "token")
    for bad in ({"t_min": 0.0}, {"t_max": 1.0}, {"t_min": 0.7, "t_max": 0.3}, {"num_iterations": 0}):
        with pytest.raises(RecipeError):
            parse_options(CoupledGRPOConfig, bad, "algorithm")


# --- the masks -----------------------------------------------------------------------------------------------


def test_coupled_views_are_complementary():
    """View 0 masks the whole completion; every completion column is masked in exactly one of views
    1 and 2; the prompt is never masked."""
    B, P, C = 5, 3, 64
    ids = torch.arange(B * (P + C)).reshape(B, P + C) % 50
    t, partial = coupled_masks(C, torch.arange(B) + 100, 0)
    views = coupled_views(ids, partial, mask_id=-1)
    masked = views == -1
    assert views.shape == (3, B, P + C) and not masked[:, :, :P].any()
    assert masked[0, :, P:].all()
    assert torch.equal(masked[1, :, P:] ^ masked[2, :, P:], torch.ones(B, C, dtype=torch.bool))
    assert torch.equal(masked[1, :, P:], partial)
    assert torch.equal(views[1][~masked[1]], ids[~masked[1]]) and torch.equal(views[2][~masked[2]], ids[~masked[2]])


def test_coupled_masks_draw_order_and_fresh_per_iteration():
    """Per row, the generator seeded noise_seed * 1000 + k draws t = 0.2 + 0.6 U then u (C values);
    partial = u < t. Iterations get different t and masks; a row's draw depends on its seed only."""
    C = 40
    seeds = torch.tensor([7, 8, 2**40])
    t0, m0 = coupled_masks(C, seeds, 0)
    for i in range(3):
        g = torch.Generator().manual_seed(int(seeds[i]) * 1000)
        t = 0.2 + 0.6 * torch.rand(1, generator=g)
        u = torch.rand(C, generator=g)
        torch.testing.assert_close(t0[i:i + 1], t)
        assert torch.equal(m0[i], u < t)
    assert ((0.2 <= t0) & (t0 <= 0.8)).all()
    t1, m1 = coupled_masks(C, seeds, 1)
    assert not torch.equal(m0, m1) and not torch.equal(t0, t1)
    t_alone, m_alone = coupled_masks(C, seeds[2:], 0)
    assert torch.equal(m_alone[0], m0[2]) and t_alone[0] == t0[2]


def test_mask_rate_follows_t():
    t, partial = coupled_masks(2000, torch.arange(16), 3)
    torch.testing.assert_close(partial.float().mean(1), t, atol=0.05, rtol=0)


# --- the estimate ---------------------------------------------------------------------------------------------


def test_coupled_combine_hand_computed():
    """t = 1/4. Column 0 is in the t-mask: (-ln 2 + (-ln 4) / (1/4)) / 2 = -4.5 ln 2.
    Column 1 is in the complement: (-ln 2 + (-ln 3) / (3/4)) / 2 = -(ln 2 + 4/3 ln 3) / 2.
    The unused view of each column (5.0) must not matter."""
    full = torch.tensor([[-LN2, -LN2]])
    part = torch.tensor([[-2 * LN2, 5.0]])
    comp = torch.tensor([[5.0, -LN3]])
    out = coupled_combine(full, part, comp, torch.tensor([[True, False]]), torch.tensor([0.25]))
    torch.testing.assert_close(out, torch.tensor([[-4.5 * LN2, -(LN2 + 4 / 3 * LN3) / 2]]))


class CountModel(torch.nn.Module):
    """Scores each completion target with logit ln(k) (all other logits 0), k = the number of mask
    tokens in the row: p(target) = k / (k + V - 1), so the three views give different log-probs."""

    def __init__(self, targets: torch.Tensor, vocab: int = 4):
        super().__init__()
        from dare_plugins.llada.modeling import tiny_config
        self.hf_config = tiny_config(vocab_size=vocab)
        self.targets, self.vocab = targets, vocab

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        mask_id = self.hf_config["mask_token_id"]
        k = (input_ids == mask_id).sum(1).clamp(min=1).float()  # (N,)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        targets = self.targets.repeat(input_ids.shape[0] // self.targets.shape[0], 1)
        logits.scatter_(2, targets[..., None], k.log()[:, None, None].expand(-1, input_ids.shape[1], 1))
        return ModelOutput(logits=logits)


def test_coupled_logps_three_views_hand_computed():
    """Completion of C = 4 tokens, vocab 4 (mask 3). View 0 has k = 4 masks: p = 4/7. The t-view
    masks k1 = |S| columns (p = k1 / (k1 + 3)), the complement 4 - k1. Expected per column:
    (log 4/7 + [j in S] log(k1/(k1+3)) / t + [j not in S] log(k2/(k2+3)) / (1 - t)) / 2."""
    ids = torch.tensor([[0, 1, 0, 1, 2, 0], [2, 2, 1, 0, 0, 1]])
    b = rollout(ids, 4, [1.0, -1.0], seeds=torch.tensor([5, 6]))
    model = CountModel(ids)
    got = coupled_logps(model, family("llada"), b, 0, mask_id=3)
    t, partial = coupled_masks(4, b.noise_seeds, 0)
    for i in range(2):
        k1 = int(partial[i].sum())
        k2 = 4 - k1
        for j in range(4):
            if partial[i, j]:
                weighted = math.log(k1 / (k1 + 3)) / float(t[i])
            else:
                weighted = math.log(k2 / (k2 + 3)) / (1 - float(t[i]))
            assert float(got[i, j]) == pytest.approx((math.log(4 / 7) + weighted) / 2, rel=1e-5)


def test_coupled_loss_hand_computed():
    """mu = 1, beta = 0.01, ref = estimate + ln 2 everywhere: k3 = 1 - ln 2 per token and r = 1, so
    L_i = sum_j m_ij (-A_i + beta (1 - ln 2)) / N with N = mean counted length = (4 + 2) / 2 = 3."""
    ids = torch.tensor([[0, 1, 0, 1, 2, 0], [2, 2, 1, 0, 0, 1]])
    cm = torch.tensor([[True, True, True, True], [True, True, False, False]])
    b = rollout(ids, 4, [1.0, -1.0], completion_mask=cm, seeds=torch.tensor([5, 6]))
    model, fam = CountModel(ids), family("llada")
    est = coupled_logps(model, fam, b, 0, mask_id=3)
    b.extras["ref_logps"] = (est + LN2)[None]
    loss, metrics = coupled_grpo_loss(model, b, CoupledGRPOConfig(num_iterations=1), fam)
    per_token = torch.tensor([-1.0, 1.0]) + 0.01 * (1 - LN2)
    torch.testing.assert_close(loss, per_token * torch.tensor([4.0, 2.0]) / 3)
    assert metrics["kl"] == pytest.approx(2 * (1 - LN2), rel=1e-5)


# --- tiny models ----------------------------------------------------------------------------------------------------


class Frozen:
    def __init__(self, model):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.hf_config = self.model.hf_config

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def tiny(name: str = "llada", seed: int = 0) -> torch.nn.Module:
    if name == "llada":
        from dare_plugins.llada.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB)
    elif name == "dream":
        from dare_plugins.dream.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB, mask_token_id=31, pad_token_id=30, eos_token_id=30, bos_token_id=29)
    else:
        from dare_plugins.sdar.modeling import tiny_config
        config = tiny_config(vocab_size=VOCAB, mask_token_id=31, bos_token_id=30, eos_token_id=30, block_size=4)
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


def test_prepare_uses_the_same_masks_as_the_loss():
    """old_logps[k] is the current policy's coupled estimate at iteration k's masks (ratio 1 at the
    first update); ref at the same masks; estimates differ between iterations (fresh masks)."""
    fam, model = family("llada"), tiny()
    reference = Frozen(tiny(seed=1))
    cfg = CoupledGRPOConfig(num_iterations=3)
    b = coupled_grpo_prepare(model, tiny_batch(), cfg, fam, reference=reference)
    old, ref = b.extras["old_logps"], b.extras["ref_logps"]
    assert old.shape == ref.shape == (3, 4, 8)
    with torch.no_grad():
        for k in range(3):
            torch.testing.assert_close(old[k], coupled_logps(model, fam, b, k, 31))
            torch.testing.assert_close(ref[k], coupled_logps(reference, fam, b, k, 31))
        assert not torch.allclose(old[0], old[1])
        b.iteration = 2
        _, metrics = coupled_grpo_loss(model, b, cfg, fam)
    assert metrics["clip_ratio"] == 0.0 and metrics["kl"] > 0
    b2 = coupled_grpo_prepare(model, tiny_batch(), CoupledGRPOConfig(num_iterations=3, prepare_batch_size=3), fam,
                              reference=reference)
    torch.testing.assert_close(b2.extras["old_logps"], old)


@pytest.mark.parametrize("name", ["llada", "dream", "sdar"])
def test_tiny_model_loss_finite_backward_and_split_invariant(name):
    fam, model = family(name), tiny(name)
    cfg = CoupledGRPOConfig()
    b = coupled_grpo_prepare(model, tiny_batch(), cfg, fam, reference=Frozen(tiny(name, seed=1)))
    b.iteration = 1
    loss, _ = coupled_grpo_loss(model, b, cfg, fam)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        halves = torch.cat([coupled_grpo_loss(model, part, cfg, fam)[0] for part in b.chunk(2)])
        whole = coupled_grpo_loss(model, b, cfg, fam)[0]
    torch.testing.assert_close(halves, whole, atol=1e-5, rtol=1e-5)


def masked_logp_gap(model, fam, batch):
    """Mean fully-masked per-token log-prob of row 0 minus row 1 (view 0 of the estimate)."""
    from dare_plugins.d1 import d1_logps
    with torch.no_grad():
        lp = d1_logps(model, fam, batch, 0, 31, 0.0)
    return float(lp[0].mean() - lp[1].mean())


def learning_batch():
    prompt = [3, 7, 11, 5]
    ids = torch.tensor([prompt + [12, 13, 14, 30], prompt + [20, 21, 22, 30]])
    return rollout(ids, 4, [1.0, -1.0], seeds=torch.tensor([101, 202]))


def test_learning_raises_the_positive_completion():
    fam, model = family("llada"), tiny()
    reference = Frozen(model)
    cfg = CoupledGRPOConfig()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = masked_logp_gap(model, fam, learning_batch())
    for step in range(4):
        b = learning_batch()
        b.noise_seeds = b.noise_seeds + 7 * step
        with torch.no_grad():
            b = coupled_grpo_prepare(model, b, cfg, fam, reference=reference)
        for k in range(cfg.num_iterations):
            b.iteration = k
            loss = coupled_grpo_loss(model, b, cfg, fam)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = masked_logp_gap(model, fam, learning_batch())
    assert after > before + 1.0, (before, after)
