"""dare.elbo: Monte-Carlo masks from per-row seeds and the ELBO estimate of log p(y|x)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from dare.elbo import MCMasks, draw_masks, elbo, elbo_terms, stream_seed, weighted_masked_logprob
from dare_plugins.llada import FAMILY
from dare_plugins.llada.modeling import LLaDAModelLM, tiny_config

V = 32
MASK = V - 1


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config(vocab_size=V)).eval()


def rows(B=3, L=10, prompt=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (B, L), generator=g)
    loss_mask = torch.arange(L)[None].expand(B, L) >= prompt
    return ids, loss_mask.clone()


# --- the weighted log-likelihood sum -------------------------------------------------------


def test_weighted_masked_logprob_hand_computed():
    """Two samples, vocab 3, logits position-aligned.

    Sample 0: t = 0.5, masked position 1 (target 2), logits (0, 0, ln 2): p = 2/4,
        term = ln(1/2) / 0.5 = -2 ln 2.
    Sample 1: t = 0.25, masked positions 0 (target 0, logits 0,0,0: p = 1/3) and 2
        (target 1, logits (0, ln 2, 0): p = 1/2); term = (ln(1/3) + ln(1/2)) / 0.25 = -4 ln 6.
    Position 0 of sample 0 has a huge logit on a wrong token but is not masked: ignored.
    """
    logits = torch.zeros(2, 3, 3)
    logits[0, 1, 2] = math.log(2)
    logits[0, 0, 1] = 50.0
    logits[1, 2, 1] = math.log(2)
    targets = torch.tensor([[0, 2, 0], [0, 0, 1]])
    masked = torch.tensor([[False, True, False], [True, False, True]])
    out = weighted_masked_logprob(logits, targets, masked, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(out, torch.tensor([-2 * math.log(2), -4 * math.log(6)]))


# --- drawing the masks ---------------------------------------------------------------------


def test_count_masks_touch_only_the_response_and_mask_exactly_t_times_R():
    ids, loss_mask = rows(B=3, L=12, prompt=4)
    loss_mask[2, 10:] = False  # a row with a shorter response (R = 6)
    m = draw_masks(ids, loss_mask, torch.tensor([1, 2, 3]), MASK, n_t=5, n_yt=2)
    assert m.noisy.shape == m.masked.shape == (3, 10, 12) and m.t.shape == (3, 10)
    assert not (m.masked & ~loss_mask[:, None]).any()
    assert torch.equal(m.noisy[m.masked], torch.full((int(m.masked.sum()),), MASK))
    assert torch.equal(m.noisy[~m.masked], ids[:, None].expand_as(m.noisy)[~m.masked])
    R = loss_mask.sum(1, keepdim=True).float()
    torch.testing.assert_close(m.masked.sum(2).float(), m.t * R)  # weight R / l = 1 / t exactly
    assert (m.masked.sum(2) >= 1).all()
    # the n_yt = 2 masks of a timestep share t but are different masks
    assert torch.equal(m.t[:, 0::2], m.t[:, 1::2])
    assert not torch.equal(m.masked[:, 0::2], m.masked[:, 1::2])


def test_stratified_count_masks_cover_every_count_once_when_n_t_equals_R():
    """u_k in [k/R, (k+1)/R) gives l_k = k + 1: each masked count 1..R exactly once."""
    ids, loss_mask = rows(B=4, L=9, prompt=3)  # R = 6
    m = draw_masks(ids, loss_mask, torch.arange(4), MASK, n_t=6, stratified=True)
    assert torch.equal(m.masked.sum(2), torch.arange(1, 7).expand(4, 6))
    iid = draw_masks(ids, loss_mask, torch.arange(4), MASK, n_t=6, stratified=False)
    assert not torch.equal(iid.masked.sum(2), torch.arange(1, 7).expand(4, 6))


def test_masks_depend_only_on_the_row_seed_and_stream():
    ids, loss_mask = rows(B=3, L=10)
    seeds = torch.tensor([11, 12, 13])
    m = draw_masks(ids, loss_mask, seeds, MASK, n_t=4)
    alone = draw_masks(ids[1:2], loss_mask[1:2], seeds[1:2], MASK, n_t=4)
    assert torch.equal(alone.masked[0], m.masked[1]) and torch.equal(alone.t[0], m.t[1])
    again = draw_masks(ids, loss_mask, seeds, MASK, n_t=4)
    assert torch.equal(again.masked, m.masked)
    other = draw_masks(ids, loss_mask, seeds, MASK, n_t=4, stream=1)
    assert not torch.equal(other.masked, m.masked)
    assert stream_seed(5, 0) == 5 and stream_seed(5, 1) != stream_seed(6, 1)


def test_time_masks_follow_t():
    ids = torch.zeros(2, 2000, dtype=torch.long)
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    m = draw_masks(ids, loss_mask, torch.tensor([0, 1]), MASK, n_t=8, estimator="time", eps=1e-3)
    assert (m.t >= 1e-3).all() and (m.t <= 1).all()
    torch.testing.assert_close(m.masked.float().mean(2), m.t, atol=0.05, rtol=0)
    strata = (m.t * 8).floor()  # stratified: one t in each eighth
    assert torch.equal(strata, torch.arange(8.0).expand(2, 8))


def test_bad_arguments():
    ids, loss_mask = rows()
    with pytest.raises(ValueError, match="estimator"):
        draw_masks(ids, loss_mask, torch.arange(3), MASK, n_t=2, estimator="exact")
    with pytest.raises(ValueError, match="n_t"):
        draw_masks(ids, loss_mask, torch.arange(3), MASK, n_t=0)


def test_rows_without_response_have_zero_elbo():
    ids, loss_mask = rows(B=2)
    loss_mask[1] = False
    m = draw_masks(ids, loss_mask, torch.arange(2), MASK, n_t=3)
    assert not m.masked[1].any() and torch.equal(m.t[1], torch.ones(3))
    assert elbo(FAMILY, tiny_model(), ids, m)[1] == 0


# --- the ELBO estimate -----------------------------------------------------------------------


def test_elbo_terms_match_a_per_sample_loop():
    """Each term is (1/t) * sum over the sample's masked positions of log softmax(logits)[y_j],
    computed here one sample at a time with a plain forward."""
    model = tiny_model()
    ids, loss_mask = rows(B=2, L=8, prompt=3)
    m = draw_masks(ids, loss_mask, torch.tensor([3, 4]), MASK, n_t=3, n_yt=2)
    with torch.no_grad():
        terms = elbo_terms(FAMILY, model, ids, m)
        expected = torch.zeros(2, 6)
        for i, s in itertools.product(range(2), range(6)):
            logp = model(m.noisy[i, s][None]).logits[0].log_softmax(-1)
            picked = logp[torch.arange(8), ids[i]][m.masked[i, s]]
            expected[i, s] = picked.sum() / m.t[i, s]
    torch.testing.assert_close(terms, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(elbo(FAMILY, model, ids, m), expected.mean(1), rtol=1e-5, atol=1e-5)


def test_chunked_elbo_gives_the_same_value_and_gradient():
    """mc_chunk splits the forward over samples (checkpointed under grad): same numbers."""
    ids, loss_mask = rows(B=2, L=8, prompt=3)
    m = draw_masks(ids, loss_mask, torch.tensor([5, 6]), MASK, n_t=5)
    results = []
    for chunk in (0, 2):
        model = tiny_model()
        value = elbo(FAMILY, model, ids, m, mc_chunk=chunk)
        value.sum().backward()
        results.append((value.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def brute_force_elbo(model, ids, prompt):
    """The exact ELBO of one row by enumerating every mask of its R response tokens.

    Integrating t out of E_t E_mask[(1/t) sum_masked log p] (given t, the masked count l is
    Binomial(R, t) and the masked set uniform among sets of size l) gives
        sum_{l=1..R} (1/l) * mean_{|S| = l} sum_{j in S} log p(y_j | y with S masked),
    since int_0^1 (1/t) C(R,l) t^l (1-t)^(R-l) dt = 1/l.
    """
    R = ids.shape[1] - prompt
    total = 0.0
    with torch.no_grad():
        for l in range(1, R + 1):
            sets = list(itertools.combinations(range(prompt, prompt + R), l))
            noisy = ids.repeat(len(sets), 1)
            for k, s in enumerate(sets):
                noisy[k, list(s)] = MASK
            logp = model(noisy).logits.log_softmax(-1)
            picked = logp.gather(2, ids.expand(len(sets), -1)[..., None])[..., 0]
            sums = torch.stack([picked[k, list(s)].sum() for k, s in enumerate(sets)])
            total += float(sums.mean()) / l
    return total


@pytest.mark.parametrize("estimator, n", [("count", 2000), ("time", 6000)])
def test_elbo_estimate_converges_to_the_brute_force_elbo(estimator, n):
    """Both samplers estimate the same ELBO without bias (time: up to its eps = 1e-4 floor)."""
    model = tiny_model(1)
    ids, loss_mask = rows(B=1, L=7, prompt=3, seed=2)  # R = 4: 15 masks enumerated
    exact = brute_force_elbo(model, ids, prompt=3)
    m = draw_masks(ids, loss_mask, torch.tensor([7]), MASK, n_t=n, estimator=estimator, eps=1e-4)
    with torch.no_grad():
        terms = elbo_terms(FAMILY, model, ids, m)[0]
    standard_error = float(terms.std()) / math.sqrt(n)
    print(f"{estimator}: exact ELBO {exact:.4f}, estimate {float(terms.mean()):.4f} "
          f"+- {standard_error:.4f} (n={n})")
    assert abs(float(terms.mean()) - exact) < 4 * standard_error + 1e-3
    assert exact < 0


def test_count_estimator_is_exact_for_a_single_response_token():
    """R = 1: every sample masks that token with t = 1, so B = log p(y | prompt, [MASK])."""
    model = tiny_model()
    ids, loss_mask = rows(B=1, L=5, prompt=4)
    m = draw_masks(ids, loss_mask, torch.tensor([0]), MASK, n_t=3)
    noisy = ids.clone()
    noisy[0, 4] = MASK
    with torch.no_grad():
        expected = model(noisy).logits[0, 4].log_softmax(-1)[ids[0, 4]]
        torch.testing.assert_close(elbo(FAMILY, model, ids, m), expected[None], rtol=1e-5, atol=1e-5)
    assert isinstance(m, MCMasks) and m.n == 3
