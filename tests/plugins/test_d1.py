"""The d1 plugin (diffu-GRPO): masks, the loss on given logits, prepare, tiny-model learning."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import dare_plugins.d1 as d1_plugin
from dare.plugins import PluginManager, registry
from dare.protocol import ModelOutput
from dare.recipe import RecipeError, parse_options
from dare_plugins.d1 import D1Config, d1_logps, d1_loss, d1_noise, d1_prepare
from rl_helpers import rollout

LN2, LN3 = math.log(2), math.log(3)
VOCAB = 32


def family(name):
    return registry().families.get(name)


class TableModel(torch.nn.Module):
    """Returns a fixed logits table whatever the input."""

    def __init__(self, table: torch.Tensor, **config):
        super().__init__()
        self.table = table
        from dare_plugins.llada.modeling import tiny_config
        self.hf_config = tiny_config(vocab_size=table.shape[-1], **config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        return ModelOutput(logits=self.table[: input_ids.shape[0]].clone())


# --- registration and options ------------------------------------------------------------------------


def test_registered_as_rl_with_prepare_and_reference():
    reg = PluginManager(plugins=[d1_plugin], entry_points=False).registry
    algo = reg.algorithms.get("d1")
    assert algo.kind == "rl" and algo.prepare is d1_prepare and algo.loss is d1_loss and algo.needs_reference
    cfg = D1Config()
    assert (cfg.num_iterations, cfg.p_mask_prompt, cfg.epsilon, cfg.beta, cfg.normalization) == \
        (12, 0.15, 0.5, 0.04, "token")
    parsed = parse_options(D1Config, {"num_iterations": 2, "normalization": "sequence"}, "algorithm")
    assert parsed.num_iterations == 2 and parsed.normalization == "sequence"
    for bad in ({"num_iterations": 0}, {"p_mask_prompt": 1.0}, {"normalization": "row"}, {"beta": -1.0}):
        with pytest.raises(RecipeError):
            parse_options(D1Config, bad, "algorithm")


# --- the forward process ---------------------------------------------------------------------------------


def test_d1_noise_masks_completion_and_real_prompt_tokens_by_row_seed():
    """Completion columns always masked; prompt column j masked iff u_j < p and j is a real token,
    u drawn from the generator seeded noise_seed * 1000 + k; fresh per iteration."""
    B, P, C = 3, 40, 5
    ids = torch.arange(B * (P + C)).reshape(B, P + C)
    am = torch.ones(B, P + C, dtype=torch.long)
    am[1, :10] = 0  # left padding is never masked
    seeds = torch.tensor([4, 5, 6])
    noisy, masked = d1_noise(ids, am, C, seeds, 2, mask_id=-1, p_mask_prompt=0.15)
    assert masked[:, P:].all() and not masked[1, :10].any()
    for i in range(B):
        u = torch.rand(P, generator=torch.Generator().manual_seed(int(seeds[i]) * 1000 + 2))
        assert torch.equal(masked[i, :P], (u < 0.15) & am[i, :P].bool())
    assert torch.equal(noisy, torch.where(masked, torch.full_like(ids, -1), ids))
    _, other = d1_noise(ids, am, C, seeds, 3, -1, 0.15)
    assert not torch.equal(other, masked)
    _, alone = d1_noise(ids[2:], am[2:], C, seeds[2:], 2, -1, 0.15)
    assert torch.equal(alone[0], masked[2])
    _, none = d1_noise(ids, am, C, seeds, 2, -1, 0.0)
    assert not none[:, :P].any()


# --- the loss on given logits, hand-computed --------------------------------------------------------------

# rows: prompt (2 tokens) + completion (2 tokens), vocab 4 (mask 3). Completion logits:
#   row 0, tokens (0, 1): position 2 logits (ln 3, 0, 0, 0) -> logp -ln 2; position 3 zeros -> -ln 4
#   row 1, tokens (1, 2): position 2 logits (0, ln 3, 0, 0) -> logp -ln 2; position 3 not counted
IDS = torch.tensor([[0, 1, 0, 1], [2, 0, 1, 2]])
CM = torch.tensor([[True, True], [True, False]])
TABLE = torch.zeros(2, 4, 4)
TABLE[0, 2, 0] = LN3
TABLE[1, 2, 1] = LN3
LOGP = torch.tensor([[-LN2, -2 * LN2], [-LN2, -2 * LN2]])


def test_d1_logps_read_the_completion_columns():
    fam = family("llada")
    b = rollout(IDS, 2, [0.5, -1.0], CM)
    torch.testing.assert_close(d1_logps(TableModel(TABLE), fam, b, 0, 3, 0.15), LOGP)


def test_d1_loss_one_iteration_hand_computed():
    """mu = 1: the ratio is exactly 1, so l_ij = -A_i + beta * k3_ij. ref = -ln 4 everywhere:
    row 0: ref - logp = (-ln 2, 0) -> k3 = (ln 2 - 1/2, 0); row 1 (one counted token): ln 2 - 1/2.
    A = (0.5, -1), beta = 0.04, mean completion length N = 1.5:
        L0 = (-0.5 * 2 + beta (ln 2 - 1/2)) / 1.5,   L1 = (1 + beta (ln 2 - 1/2)) / 1.5
    and with sequence normalisation the divisors are 2 and 1."""
    fam, beta = family("llada"), 0.04
    kl = LN2 - 0.5
    b = rollout(IDS, 2, [0.5, -1.0], CM)
    b.extras["ref_logps"] = torch.full((1, 2, 2), -2 * LN2)
    cfg = D1Config(num_iterations=1, beta=beta)
    loss, metrics = d1_loss(TableModel(TABLE), b, cfg, fam)
    torch.testing.assert_close(loss, torch.tensor([(-1 + beta * kl) / 1.5, (1 + beta * kl) / 1.5]))
    assert metrics["kl"] == pytest.approx(kl / 2 + kl) and metrics["clip_ratio"] == 0.0
    assert metrics["logp"] == pytest.approx(-1.5 * LN2 - LN2)
    seq, _ = d1_loss(TableModel(TABLE), b, D1Config(num_iterations=1, beta=beta, normalization="sequence"), fam)
    torch.testing.assert_close(seq, torch.tensor([(-1 + beta * kl) / 2, 1 + beta * kl]))
    # the reference callable is used when prepare did not store ref_logps
    b.extras.clear()
    ref_table = TABLE.clone()
    ref_table[0, 2, 0] = 0.0  # row 0 token 0 under the reference: -ln 4, the same ref as above
    ref_table[1, 2, 1] = 0.0
    loss2, _ = d1_loss(TableModel(TABLE), b, cfg, fam, reference=TableModel(ref_table))
    torch.testing.assert_close(loss2, loss)
    with pytest.raises(ValueError, match="reference"):
        d1_loss(TableModel(TABLE), b, cfg, fam)


def test_d1_loss_clipped_ratio_hand_computed():
    """Iteration 1 of 2, beta = 0, eps = 0.5.
    Row 0: old = logp - ln 2 (r = 2), A = 0.5 -> min(2 A, 1.5 A) = 0.75 -> -0.75 per token (clipped).
    Row 1: old = logp + ln 2 (r = 1/2), A = -1 -> min(-0.5, -0.5) -> 0.5 (on the clip boundary).
    token normalisation N = 1.5: L = (-1.5 / 1.5, 0.5 / 1.5)."""
    b = rollout(IDS, 2, [0.5, -1.0], CM)
    old = torch.stack([torch.zeros(2, 2), LOGP + torch.tensor([[-LN2, -LN2], [LN2, LN2]])])
    b.extras["old_logps"] = old
    b.iteration = 1
    loss, metrics = d1_loss(TableModel(TABLE), b, D1Config(num_iterations=2, beta=0.0), family("llada"))
    torch.testing.assert_close(loss, torch.tensor([-1.0, 0.5 / 1.5]))
    assert metrics["clip_ratio_high"] == pytest.approx(1.0) and metrics["clip_ratio_low"] == 0.0
    b.extras.clear()
    with pytest.raises(ValueError, match="prepare"):
        d1_loss(TableModel(TABLE), b, D1Config(num_iterations=2, beta=0.0), family("llada"))
    b.iteration = 2
    with pytest.raises(ValueError, match="outside"):
        d1_loss(TableModel(TABLE), b, D1Config(num_iterations=2, beta=0.0), family("llada"))


# --- tiny models ------------------------------------------------------------------------------------------------


class Frozen:
    """A frozen reference policy called like the model (as the learner's ReferencePolicy)."""

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


def test_prepare_stores_old_and_reference_logps_per_iteration():
    """(K, B, C) tensors: old = the current policy at each iteration's mask (so the first update has
    ratio exactly 1), ref = the reference at the same masks; masks differ between iterations."""
    fam, model = family("llada"), tiny()
    reference = Frozen(tiny(seed=1))
    b = d1_prepare(model, tiny_batch(), D1Config(num_iterations=3), fam, reference=reference)
    old, ref = b.extras["old_logps"], b.extras["ref_logps"]
    assert old.shape == ref.shape == (3, 4, 8) and b.extras["token_norm"].shape == (1, 4)
    with torch.no_grad():
        for k in range(3):
            torch.testing.assert_close(old[k], d1_logps(model, fam, b, k, 31, 0.15))
            torch.testing.assert_close(ref[k], d1_logps(reference, fam, b, k, 31, 0.15))
        assert not torch.allclose(old[0], old[1])
        b.iteration = 0
        _, metrics = d1_loss(model, b, D1Config(num_iterations=3), fam)
    assert metrics["clip_ratio"] == 0.0 and metrics["kl"] > 0
    # beta = 0, mu = 1: nothing but the token normaliser
    b2 = d1_prepare(model, tiny_batch(), D1Config(num_iterations=1, beta=0.0), fam)
    assert set(b2.extras) == {"token_norm"}
    # prepare_batch_size changes memory, not values
    b3 = d1_prepare(model, tiny_batch(), D1Config(num_iterations=3, prepare_batch_size=1), fam, reference=reference)
    torch.testing.assert_close(b3.extras["old_logps"], old)


@pytest.mark.parametrize("name", ["llada", "dream", "sdar"])
def test_tiny_model_loss_finite_backward_and_split_invariant(name):
    fam, model = family(name), tiny(name)
    cfg = D1Config(num_iterations=2)
    b = d1_prepare(model, tiny_batch(), cfg, fam, reference=Frozen(tiny(name, seed=1)))
    b.iteration = 1
    loss, _ = d1_loss(model, b, cfg, fam)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0
    with torch.no_grad():
        halves = torch.cat([d1_loss(model, part, cfg, fam)[0] for part in b.chunk(2)])
        whole = d1_loss(model, b, cfg, fam)[0]
    torch.testing.assert_close(halves, whole, atol=1e-5, rtol=1e-5)


def test_lora_adapters_train_and_the_disabled_adapter_is_the_reference():
    """With fresh LoRA adapters (B = 0) the policy equals the reference (adapters disabled): the KL is
    0 and the loss is -A per counted token; gradients reach the adapter weights only."""
    from dare.lora import apply_lora

    fam = family("llada")
    model = apply_lora(tiny(), r=4, alpha=8, dropout=0.0, target_modules=list(fam.lora_target_modules))

    class AdapterOff:
        hf_config = model.get_base_model().hf_config

        @torch.no_grad()
        def __call__(self, *args, **kwargs):
            with model.disable_adapter():
                return model(*args, **kwargs)

    cfg = D1Config(num_iterations=2)
    b = d1_prepare(model, tiny_batch(), cfg, fam, reference=AdapterOff())
    torch.testing.assert_close(b.extras["ref_logps"], b.extras["old_logps"])
    b.iteration = 1
    loss, metrics = d1_loss(model, b, cfg, fam)
    lengths = b.completion_mask.float().sum(1)
    torch.testing.assert_close(loss, -b.advantages * lengths / lengths.mean(), atol=1e-5, rtol=1e-5)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    loss.mean().backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained and all("lora_" in n for n in trained)


def masked_logp_gap(model, fam, batch):
    """Mean fully-masked (no prompt masking) per-token log-prob of row 0 minus row 1."""
    with torch.no_grad():
        lp = d1_logps(model, fam, batch, 0, 31, 0.0)
    m = batch.completion_mask.float()
    per_row = (lp * m).sum(1) / m.sum(1)
    return float(per_row[0] - per_row[1])


def learning_batch():
    """One prompt, two completions: row 0 rewarded (A = +1), row 1 penalised (A = -1)."""
    prompt = [3, 7, 11, 5]
    ids = torch.tensor([prompt + [12, 13, 14, 30], prompt + [20, 21, 22, 30]])
    return rollout(ids, 4, [1.0, -1.0], seeds=torch.tensor([101, 202]))


def test_learning_raises_the_positive_completion():
    """A few d1 updates (mu = 2, with KL) raise the rewarded completion's log-likelihood estimate
    relative to the penalised one."""
    fam, model = family("llada"), tiny()
    reference = Frozen(model)
    cfg = D1Config(num_iterations=2, beta=0.04)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = masked_logp_gap(model, fam, learning_batch())
    for step in range(4):
        b = learning_batch()
        b.noise_seeds = b.noise_seeds + 7 * step
        with torch.no_grad():
            b = d1_prepare(model, b, cfg, fam, reference=reference)
        for k in range(cfg.num_iterations):
            b.iteration = k
            loss = d1_loss(model, b, cfg, fam)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = masked_logp_gap(model, fam, learning_batch())
    assert after > before + 1.0, (before, after)
