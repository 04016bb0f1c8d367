"""The vrpo algorithm plugin: stratified, antithetic ELBO-DPO (LLaDA 1.5)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dare.plugins import PluginManager
from dare.protocol import ModelOutput, TokenBatch
from dare.recipe import RecipeError, parse_options
from dare.registry import ModelFamily, SpecialTokens
import dare_plugins.vrpo as vrpo_plugin
from dare_plugins.dpo import DPOConfig, dpo
from dare_plugins.llada import FAMILY as LLADA
from dare_plugins.llada.modeling import LLaDAModelLM, tiny_config
from dare_plugins.vrpo import VRPOConfig, vrpo, vrpo_masks

V = 64


class FixedLogits(torch.nn.Module):
    """Logits (B, L, 3) equal to ``row`` at every position (vocab 3, token 2 = mask)."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.nn.Parameter(torch.tensor(row))
        self.hf_config = {}

    def forward(self, input_ids, **kwargs):
        B, L = input_ids.shape
        return ModelOutput(self.row.expand(B, L, 3))


FAKE = ModelFamily(name="fake", model_types=("fake",), build=lambda c: None, default_sampler="none",
                   special_tokens=lambda c: SpecialTokens(mask_id=2, eos_id=1, pad_id=1))


def tiny_llada(seed=0):
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config(vocab_size=V)).eval()


def synthetic_pairs(n, seed, step=0, response=8):
    """n pairs: a random prompt (tokens 30..59), chosen = "good" tokens (10..19), rejected =
    "bad" tokens (20..29). Rows 2k / 2k+1 = chosen / rejected of pair k."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(30, 60, (n, 4), generator=g)
    good = torch.randint(10, 20, (n, response), generator=g)
    bad = torch.randint(20, 30, (n, response), generator=g)
    L = 4 + response
    ids = torch.stack([torch.cat([prompt, good], 1), torch.cat([prompt, bad], 1)], 1).reshape(2 * n, L)
    loss_mask = (torch.arange(L)[None] >= 4).expand(2 * n, L).clone()
    return TokenBatch(ids, torch.full((2 * n,), 4), torch.ones_like(ids), loss_mask,
                      torch.arange(2 * n) + 10_000 * step)


# --- the loss ----------------------------------------------------------------------------


def test_vrpo_hand_computed_single_token_responses():
    """Responses of one token: every sample masks it with t = 1 (count estimator), so the ELBO
    is exactly log p(y | x, [MASK]) whatever n_t.

    Vocab {0, 1, mask=2}; policy logits (0, ln 3, -1e4): p(1) = 3/4, p(0) = 1/4; reference
    logits (0, 0, -1e4): p = 1/2. Pair: chosen y_w = 1, rejected y_l = 0.
        s = (ln 3/4 - ln 1/2) - (ln 1/4 - ln 1/2) = ln 3;  beta = 2:
        loss = -log sigmoid(2 ln 3) = log(1 + 1/9) = log(10/9), reward margin 2 ln 3.
    """
    policy = FixedLogits([0.0, math.log(3), -1e4])
    reference = FixedLogits([0.0, 0.0, -1e4])
    ids = torch.tensor([[0, 1], [0, 0]])
    batch = TokenBatch(ids, torch.tensor([1, 1]), torch.ones_like(ids),
                       torch.tensor([[False, True], [False, True]]), torch.tensor([3, 4]))
    loss, m = vrpo(policy, batch, VRPOConfig(beta=2.0, n_t=4), FAKE, reference=reference)
    torch.testing.assert_close(loss, torch.tensor([math.log(10 / 9)]))
    assert m["reward_margin"] == pytest.approx(2 * math.log(3), rel=1e-5)
    assert m["reward_chosen"] == pytest.approx(2 * math.log(3 / 2), rel=1e-5)
    assert m["reward_rejected"] == pytest.approx(2 * math.log(1 / 2), rel=1e-5)
    assert m["reward_accuracy"] == 1


def test_vrpo_masks_are_stratified_and_shared():
    """n_t = R = 8 stratified count masks: each masked count 1..8 exactly once per row; the
    same masks score policy and reference, so policy == reference gives s = 0 exactly."""
    batch = synthetic_pairs(2, seed=0)
    m = vrpo_masks(batch, mask_id=V - 1, n_t=8)
    assert torch.equal(m.masked.sum(2), torch.arange(1, 9).expand(4, 8))
    model = tiny_llada()
    loss, metrics = vrpo(model, batch, VRPOConfig(n_t=3, n_yt=2), LLADA, reference=model)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    assert metrics["reward_margin"] == 0 and metrics["elbo_chosen"] < 0


# --- variance of the preference score ------------------------------------------------------


def score(algorithm, config, policy, reference, batch):
    """The estimated preference score s of each pair (beta = 1: s = the pair's reward margin),
    computed one pair at a time through the plugin's loss."""
    out = []
    for k in range(len(batch) // 2):
        _, m = algorithm(policy, batch.slice(2 * k, 2 * k + 2), config, LLADA, reference=reference)
        out.append(m["reward_margin"])
    return out


def test_antithetic_sampling_reduces_the_variance_of_the_score():
    """Measured on a tiny LLaDA (vocab 64, d_model 32, 2 layers): reference = the model,
    policy = a perturbed copy (every weight + 5% of its layer's mean |w| Gaussian noise);
    2 pairs, prompt 4 + response 12 tokens; budget n = 4 samples per ELBO, count estimator,
    beta = 1; the variance of s over 100 noise seeds, per pair, for
      plain DPO (iid timesteps, independent policy / reference masks)   vs
      VRPO (4 stratified timesteps x 1 mask, shared masks).
    """
    reference = tiny_llada().train()  # training mode: in eval mode dpo shares masks (eval_antithetic)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    base = synthetic_pairs(2, seed=3, response=12)
    settings = {
        "dpo (independent, iid)": (dpo, DPOConfig(beta=1.0, n_mc=4)),
        "dpo + antithetic (iid)": (dpo, DPOConfig(beta=1.0, n_mc=4, antithetic=True)),
        "vrpo (antithetic, stratified)": (vrpo, VRPOConfig(beta=1.0, n_t=4, n_yt=1)),
    }
    variances = {}
    with torch.no_grad():
        for name, (algorithm, config) in settings.items():
            samples = []
            for seed in range(100):
                batch = TokenBatch(base.input_ids, base.prompt_lengths, base.attention_mask,
                                   base.loss_mask, base.noise_seeds + 1000 * seed)
                samples.append(score(algorithm, config, policy, reference, batch))
            s = torch.tensor(samples)
            variances[name] = s.var(dim=0)
            print(f"{name:32s} mean s {[round(x, 3) for x in s.mean(0).tolist()]} "
                  f"var {[round(x, 4) for x in variances[name].tolist()]}")
    plain, vr = variances["dpo (independent, iid)"], variances["vrpo (antithetic, stratified)"]
    assert (vr < plain / 20).all()
    assert (variances["dpo + antithetic (iid)"] < plain / 20).all()


# --- learning --------------------------------------------------------------------------------


def test_vrpo_learns_to_prefer_chosen_on_heldout_pairs():
    reference = tiny_llada().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    heldout = synthetic_pairs(8, seed=1, step=999)
    evaluate = VRPOConfig(beta=0.1, n_t=8)

    def margin():
        with torch.no_grad():
            _, m = vrpo(policy, heldout, evaluate, LLADA, reference=reference)
        return m["reward_margin"] / 8, m["reward_accuracy"] / 8

    before = margin()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    config = VRPOConfig(beta=0.1, n_t=2, mc_chunk=1)  # chunked + checkpointed forward
    for step in range(25):
        loss, _ = vrpo(policy, synthetic_pairs(8, seed=0, step=step), config, LLADA, reference=reference)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = margin()
    print(f"vrpo held-out reward margin per pair: {before[0]:.3f} -> {after[0]:.3f}, "
          f"accuracy {before[1]:.2f} -> {after[1]:.2f}")
    assert before[0] == 0
    assert after[0] > 0.5 and after[1] >= 0.75


# --- registration and config -------------------------------------------------------------


def test_registered_with_pairs_preference_data_and_reference():
    pm = PluginManager(plugins=[vrpo_plugin], entry_points=False)
    assert not pm.failures
    algo = pm.registry.algorithms.get("vrpo")
    assert (algo.rows_per_unit, algo.data_format, algo.needs_reference) == (2, "preference", True)
    assert algo.config_type is VRPOConfig and algo.loss is vrpo


def test_config_parsing():
    cfg = parse_options(VRPOConfig, {"n_t": 4, "n_yt": 2, "beta": 0.5}, "algorithm")
    assert (cfg.n_t, cfg.n_yt, cfg.beta, cfg.estimator) == (4, 2, 0.5, "count")
    with pytest.raises(RecipeError, match="n_yt"):
        parse_options(VRPOConfig, {"n_yt": 0}, "algorithm")
    with pytest.raises(RecipeError, match="n_mc"):
        parse_options(VRPOConfig, {"n_mc": 8}, "algorithm")  # dpo's key: vrpo counts n_t x n_yt
