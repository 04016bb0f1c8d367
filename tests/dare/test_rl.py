"""dare.rl: the pure helpers shared by the RL algorithms, against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from dare.protocol import RolloutBatch
from dare.rl import (clipped_surrogate, ensure_token_norm, group_advantages, grpo_objective, iteration_seed,
                     k3_kl, map_row_chunks, masked_row_mean, model_config, normalise_rows, row_generators,
                     row_token_norm, token_logps, token_norm)

LN2 = math.log(2)


# --- advantages --------------------------------------------------------------------------------


def test_group_advantages_mean_and_unbiased_std():
    """Group 0 rewards (1, 0, 0, 1): mean 0.5, A = (.5, -.5, -.5, .5); unbiased variance
    4 * 0.25 / 3 = 1/3. Group 1 rewards (2, 2, 2, 5): mean 2.75, A = (-.75, -.75, -.75, 2.25);
    unbiased variance (3 * 0.5625 + 5.0625) / 3 = 2.25, std 1.5, A / std = (-.5, -.5, -.5, 1.5).
    The groups are interleaved (ids need not be contiguous)."""
    rewards = torch.tensor([1.0, 2, 0, 2, 0, 2, 1, 5])
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    a = group_advantages(rewards, groups, "mean")
    torch.testing.assert_close(a, torch.tensor([.5, -.75, -.5, -.75, -.5, -.75, .5, 2.25]))
    s = group_advantages(rewards, groups, "mean_std", eps=0.0)
    sd0 = math.sqrt(1 / 3)
    torch.testing.assert_close(s, torch.tensor([.5 / sd0, -.5, -.5 / sd0, -.5, -.5 / sd0, -.5, .5 / sd0, 1.5]))
    # eps is added to the std, as in TRL / d1 (std + 1e-4)
    s4 = group_advantages(rewards, groups, "mean_std")
    torch.testing.assert_close(s4[7], torch.tensor(2.25 / (1.5 + 1e-4)))
    assert a.dtype == torch.float32


def test_group_advantages_degenerate_groups():
    """Equal rewards give 0 (and no division by zero); a group of one row gives 0."""
    a = group_advantages(torch.tensor([3.0, 3.0, 7.0]), torch.tensor([5, 5, 9]), "mean_std")
    assert torch.equal(a, torch.zeros(3))
    with pytest.raises(ValueError, match="unknown advantage scale"):
        group_advantages(torch.zeros(2), torch.zeros(2), "std")
    with pytest.raises(ValueError, match="differ in length"):
        group_advantages(torch.zeros(2), torch.zeros(3), "mean")


# --- randomness ----------------------------------------------------------------------------------


def test_iteration_seeds():
    assert iteration_seed(7, 3) == 7003
    assert iteration_seed(2**62, 1) == (2**62 * 1000 + 1) % 2**64  # fits torch.Generator
    gens = row_generators(torch.tensor([7, 8]), 3)
    expect = torch.rand(4, generator=torch.Generator().manual_seed(8003))
    assert torch.equal(torch.rand(4, generator=gens[1]), expect)


# --- log-probs, KL, clipped objective ---------------------------------------------------------------


def test_token_logps_hand_computed_and_float32():
    """Logits (0, 0, ln 2, 0): p(target 2) = 2/5, p(target 0) = 1/5."""
    logits = torch.zeros(2, 3, 4)
    logits[:, :, 2] = LN2
    targets = torch.tensor([[2, 0, 2], [0, 0, 2]])
    expect = torch.where(targets == 2, torch.tensor(math.log(2 / 5)), torch.tensor(math.log(1 / 5)))
    torch.testing.assert_close(token_logps(logits, targets), expect)
    out = token_logps(logits.bfloat16(), targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expect, atol=1e-2, rtol=0)
    # extra leading dims and a single row
    torch.testing.assert_close(token_logps(logits[None].expand(3, 2, 3, 4), targets[None].expand(3, 2, 3)),
                               expect[None].expand(3, 2, 3))
    torch.testing.assert_close(token_logps(logits[0], targets[0]), expect[0])
    with pytest.raises(ValueError, match="do not match"):
        token_logps(logits, targets[:, :2])


def test_k3_kl():
    """ref - logp = ln 2: 2 - ln 2 - 1; = -ln 2: 1/2 + ln 2 - 1; = 0: 0."""
    logp = torch.tensor([-1.0, -1.0, -1.0])
    ref = logp + torch.tensor([LN2, -LN2, 0.0])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([1 - LN2, LN2 - 0.5, 0.0]))


def test_clipped_surrogate_hand_computed():
    """eps = 0.5. r = 2, A = 1: min(2, 1.5) = 1.5 -> loss -1.5, clipped high.
    r = 2, A = -1: min(-2, -1.5) = -2 -> loss 2, not clipped (the ratio moved the bad way).
    r = 1/4, A = -1: clip 0.5, min(-0.25, -0.5) = -0.5 -> loss 0.5, clipped low.
    r = 1/4, A = 1: min(0.25, 0.5) = 0.25 -> loss -0.25, not clipped."""
    logp = torch.tensor([LN2, LN2, -2 * LN2, -2 * LN2])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, low, high = clipped_surrogate(logp, old, adv, 0.5)
    torch.testing.assert_close(loss, torch.tensor([-1.5, 2.0, 0.5, -0.25]))
    assert low.tolist() == [False, False, True, False] and high.tolist() == [True, False, False, False]
    # asymmetric range: eps_high = 1.5 lets r = 2 through
    loss, _, high = clipped_surrogate(logp, old, adv, 0.5, 1.5)
    assert float(loss[0]) == pytest.approx(-2.0) and not high[0]


# --- normalisation ------------------------------------------------------------------------------------


def test_normalise_rows_token_and_sequence():
    """Per-token losses (1, 2, 3) and (4, 5, 6), masks (T, T, F) and (T, F, F).
    sequence: (1 + 2) / 2 = 1.5 and 4 / 1 = 4.
    token: the batch's mean length N = 3 / 2, rows 3 / 1.5 = 2 and 4 / 1.5; their mean
    (2 + 8/3) / 2 = 7/3 = (1 + 2 + 4) / 3, the token-level mean."""
    loss = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(normalise_rows(loss, mask, "sequence"), torch.tensor([1.5, 4.0]))
    tok = normalise_rows(loss, mask, "token")
    torch.testing.assert_close(tok, torch.tensor([2.0, 4 / 1.5]))
    assert float(tok.mean()) == pytest.approx(7 / 3)
    torch.testing.assert_close(normalise_rows(loss, mask, "token", torch.tensor([2.0, 2.0])), torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="unknown normalization"):
        normalise_rows(loss, mask, "row")
    torch.testing.assert_close(masked_row_mean(loss, mask), torch.tensor([1.5, 4.0]))


def _batch(B=4, P=3, C=4, lengths=(4, 2, 3, 1)):
    ids = torch.arange(B * (P + C)).reshape(B, P + C) % 20
    cm = torch.arange(C)[None] < torch.tensor(lengths)[:, None]
    return RolloutBatch(ids, torch.ones_like(ids), cm, torch.tensor([1.0, -1, .5, -.5]), torch.zeros(B),
                        torch.tensor([0, 0, 1, 1]), torch.arange(B), torch.zeros(B, C, dtype=torch.long))


def test_token_norm_recorded_once_and_kept_by_slices():
    """Mean completion length (4 + 2 + 3 + 1) / 4 = 2.5, recorded as (1, B) so a micro-batch keeps
    the whole batch's value; without it a micro-batch uses its own mean."""
    b = _batch()
    assert torch.equal(token_norm(b.completion_mask), torch.full((1, 4), 2.5))
    torch.testing.assert_close(row_token_norm(b.slice(0, 2)), torch.full((2,), 3.0))
    ensure_token_norm(b)
    torch.testing.assert_close(row_token_norm(b.slice(0, 2)), torch.full((2,), 2.5))
    b.extras["token_norm"] = torch.full((1, 4), 9.0)  # set by a driver: kept
    ensure_token_norm(b)
    assert float(b.extras["token_norm"][0, 0]) == 9.0
    assert torch.equal(token_norm(torch.zeros(2, 3, dtype=torch.bool)), torch.ones(1, 2))


def test_grpo_objective_one_iteration_is_minus_advantage_plus_kl():
    """mu = 1 (old = None): r = 1 exactly, so l_ij = -A_i + beta * k3_ij.
    Row 0 (A = 1, two counted tokens, ref - logp = (ln 2, 0)): -2 + beta (1 - ln 2).
    Row 1 (A = -1, one counted token, ref - logp = -ln 2): 1 + beta (ln 2 - 1/2).
    token: divided by the mean length 1.5; sequence: by 2 and 1."""
    beta = 0.04
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    ref = logp.detach() + torch.tensor([[LN2, 0.0], [-LN2, 5.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    sums = torch.tensor([-2 + beta * (1 - LN2), 1 + beta * (LN2 - 0.5)])
    per_row, metrics = grpo_objective(logp, None, ref, adv, mask, 0.5, None, beta, "token")
    torch.testing.assert_close(per_row, sums / 1.5)
    per_row_s, _ = grpo_objective(logp, None, ref, adv, mask, 0.5, None, beta, "sequence")
    torch.testing.assert_close(per_row_s, sums / torch.tensor([2.0, 1.0]))
    assert metrics["kl"] == pytest.approx((1 - LN2) / 2 + (LN2 - 0.5))
    assert metrics["clip_ratio"] == 0.0 and metrics["completion_tokens"] == 3.0
    # gradient of -A r at r = 1 is -A per counted token (plus the KL's): d/dlogp of row 1 token 1 is 0
    per_row.sum().backward()
    assert logp.grad[1, 1] == 0
    kl_grad = 1 - math.exp(LN2)  # d k3 / d logp = 1 - exp(ref - logp)
    assert float(logp.grad[0, 0]) == pytest.approx((-1 + beta * kl_grad) / 1.5)
    with pytest.raises(ValueError, match="reference"):
        grpo_objective(logp, None, None, adv, mask, 0.5, None, beta, "token")


def test_grpo_objective_clips_with_old_logps():
    """old = logp - ln 2 (r = 2), A = 1, eps = 0.5: the clipped value 1.5 wins, so the loss is -1.5
    per token with zero gradient; clip_ratio 1 per row."""
    logp = torch.zeros(1, 2, requires_grad=True)
    per_row, metrics = grpo_objective(logp, logp.detach() - LN2, None, torch.tensor([1.0]),
                                      torch.ones(1, 2, dtype=torch.bool), 0.5, None, 0.0, "sequence")
    torch.testing.assert_close(per_row, torch.tensor([-1.5]))
    per_row.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))
    assert metrics["clip_ratio"] == 1.0 and metrics["clip_ratio_high"] == 1.0 and "kl" not in metrics


def test_map_row_chunks_and_model_config():
    b = _batch()
    full = map_row_chunks(b, 0, lambda part: part.input_ids.float().sum(1))
    for rows in (1, 3, 4, 10):
        assert torch.equal(map_row_chunks(b, rows, lambda part: part.input_ids.float().sum(1)), full)

    class Wrapped:
        def get_base_model(self):
            m = torch.nn.Module()
            m.hf_config = {"a": 1}
            return m

    assert model_config(Wrapped()) == {"a": 1}
    with pytest.raises(TypeError):
        model_config(object())
