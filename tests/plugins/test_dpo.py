"""The dpo algorithm plugin (ELBO-based DPO) and the preference_file dataset plugin."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dare
from dare.elbo import MCMasks
from dare.plugins import PluginManager
from dare.protocol import ModelOutput, TokenBatch
from dare.recipe import RecipeError, parse_options
from dare.registry import ModelFamily, SpecialTokens
import dare_plugins.dpo as dpo_plugin
import dare_plugins.preference as preference
from dare_plugins.dpo import DPOConfig, dpo
from dare_plugins.dpo.loss import dpo_loss, elbo_preference_loss
from dare_plugins.llada import FAMILY as LLADA
from dare_plugins.llada.modeling import LLaDAModelLM, tiny_config

ROOT = Path(__file__).resolve().parents[2]


# --- a hand-checkable model: fixed logits, no dependence on the input ---------------------


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


# --- the loss --------------------------------------------------------------------------


def test_dpo_loss_hand_computed():
    """beta = 0.5, two pairs.

    Pair 0: policy (w, l) = (-10, -20), reference (-12, -19): chosen ratio 2, rejected -1,
        s = 3, beta s = 1.5, loss = log(1 + e^-1.5).
    Pair 1: policy (-5, -6), reference (-4, -6): chosen ratio -1, rejected 0, s = -1,
        beta s = -0.5, loss = log(1 + e^0.5).
    Sums: reward_chosen 0.5 (2 - 1) = 0.5, reward_rejected 0.5 (-1 + 0) = -0.5,
    reward_margin 1.5 - 0.5 = 1, reward_accuracy 1 (pair 0 only), elbo_chosen -15,
    elbo_rejected -26.
    """
    loss, m = dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-20.0, -6.0]),
                       torch.tensor([-12.0, -4.0]), torch.tensor([-19.0, -6.0]), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-1.5)), math.log1p(math.exp(0.5))]))
    assert m == pytest.approx({"reward_chosen": 0.5, "reward_rejected": -0.5, "reward_margin": 1.0,
                               "reward_accuracy": 1.0, "elbo_chosen": -15.0, "elbo_rejected": -26.0})


def test_elbo_preference_loss_hand_computed():
    """One pair, prompt token 0 then two response tokens; vocab {0, 1, mask=2}.

    Policy logits (0, ln 3, -1e4) everywhere: p(1) = 3/4, p(0) = 1/4. Reference logits
    (0, 0, -1e4): p = 1/2. Chosen y_w = [0 | 1, 1], rejected y_l = [0 | 0, 0]. One sample each
    (shared by policy and reference): y_w with both response tokens masked (t = 1), y_l with
    only position 1 masked (t = 1/2).
        B_theta(y_w) = 2 ln(3/4)        B_ref(y_w) = 2 ln(1/2)
        B_theta(y_l) = ln(1/4) / (1/2)  B_ref(y_l) = ln(1/2) / (1/2)
        s = 2 ln(3/2) - 2 ln(1/2) = 2 ln 3;  beta = 1: loss = log(1 + e^{-2 ln 3}) = log(10/9).
    The gradient flows to the policy only.
    """
    policy = FixedLogits([0.0, math.log(3), -1e4])
    reference = FixedLogits([0.0, 0.0, -1e4])
    ids = torch.tensor([[0, 1, 1], [0, 0, 0]])
    batch = TokenBatch(ids, torch.tensor([1, 1]), torch.ones_like(ids),
                       torch.tensor([[False, True, True], [False, True, True]]), torch.tensor([0, 1]))
    masked = torch.tensor([[[False, True, True]], [[False, True, False]]])
    masks = MCMasks(noisy=torch.where(masked, 2, ids[:, None]), masked=masked, t=torch.tensor([[1.0], [0.5]]))
    loss, m = elbo_preference_loss(policy, reference, FAKE, batch, masks, masks, beta=1.0)
    torch.testing.assert_close(loss, torch.tensor([math.log(10 / 9)]))
    assert m["reward_margin"] == pytest.approx(2 * math.log(3), rel=1e-5)
    assert m["elbo_chosen"] == pytest.approx(2 * math.log(3 / 4), rel=1e-5)
    assert m["elbo_rejected"] == pytest.approx(2 * math.log(1 / 4), rel=1e-5)
    loss.sum().backward()
    assert policy.row.grad is not None and reference.row.grad is None
    # length_normalize divides every ELBO by R = 2: s = ln 3, loss = log(1 + 1/3)
    loss, _ = elbo_preference_loss(policy, reference, FAKE, batch, masks, masks, beta=1.0,
                                   length_normalize=True)
    torch.testing.assert_close(loss, torch.tensor([math.log(4 / 3)]))


def test_reference_is_required_and_rows_must_pair():
    ids = torch.zeros(3, 4, dtype=torch.long)
    batch = TokenBatch(ids, torch.ones(3, dtype=torch.long), torch.ones_like(ids),
                       torch.ones_like(ids, dtype=torch.bool), torch.arange(3))
    model = FixedLogits([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="pairs"):
        dpo(model, batch, DPOConfig(), FAKE, reference=model)
    with pytest.raises(ValueError, match="reference"):
        dpo(model, batch.slice(0, 2), DPOConfig(), FAKE, reference=None)


# --- on a tiny LLaDA -----------------------------------------------------------------------

V = 64


def tiny_llada(seed=0):
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config(vocab_size=V)).eval()


def synthetic_pairs(n, seed, step=0):
    """n pairs: a random prompt (tokens 30..59), chosen = 8 "good" tokens (10..19), rejected =
    8 "bad" tokens (20..29). Rows 2k / 2k+1 = chosen / rejected of pair k."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(30, 60, (n, 4), generator=g)
    good, bad = torch.randint(10, 20, (n, 8), generator=g), torch.randint(20, 30, (n, 8), generator=g)
    ids = torch.stack([torch.cat([prompt, good], 1), torch.cat([prompt, bad], 1)], 1).reshape(2 * n, 12)
    loss_mask = (torch.arange(12)[None] >= 4).expand(2 * n, 12).clone()
    return TokenBatch(ids, torch.full((2 * n,), 4), torch.ones_like(ids), loss_mask,
                      torch.arange(2 * n) + 10_000 * step)


def test_plain_dpo_masks_are_independent_and_depend_only_on_row_seeds():
    """policy == reference: independent masks give a non-zero (noisy) score; antithetic gives
    exactly s = 0 (loss log 2). Per-pair losses do not change when the batch is split."""
    model = tiny_llada().train()  # training mode: held-out (eval mode) scoring shares masks
    batch = synthetic_pairs(3, seed=0)
    loss, m = dpo(model, batch, DPOConfig(n_mc=2), LLADA, reference=model)
    assert m["reward_margin"] != 0
    pieces = torch.cat([dpo(model, batch.slice(2 * k, 2 * k + 2), DPOConfig(n_mc=2), LLADA, reference=model)[0]
                        for k in range(3)])
    torch.testing.assert_close(pieces, loss)
    same, m = dpo(model, batch, DPOConfig(n_mc=2, antithetic=True), LLADA, reference=model)
    torch.testing.assert_close(same, torch.full((3,), math.log(2)))
    assert m["reward_margin"] == 0


def test_eval_mode_scores_the_reference_on_the_policy_masks():
    """eval_antithetic: a held-out margin at policy == reference is exactly 0, not MC noise."""
    model = tiny_llada().eval()
    batch = synthetic_pairs(3, seed=0)
    loss, m = dpo(model, batch, DPOConfig(n_mc=2), LLADA, reference=model)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2)))
    assert m["reward_margin"] == 0
    _, m = dpo(model, batch, DPOConfig(n_mc=2, eval_antithetic=False), LLADA, reference=model)
    assert m["reward_margin"] != 0


def test_coupled_pairs_share_masks_and_cut_the_score_variance():
    """couple_pairs: the rejected row is masked exactly where its chosen row is (pair_seeds);
    with chosen == rejected the score is then exactly 0 even with independent reference masks
    (both log-ratios are estimated on the same masks), while uncoupled masks leave noise."""
    from dare.elbo import draw_masks
    from dare_plugins.dpo import pair_seeds

    batch = synthetic_pairs(3, seed=0)
    assert pair_seeds(batch.noise_seeds).tolist() == [0, 0, 2, 2, 4, 4]
    masks = draw_masks(batch.input_ids, batch.loss_mask, pair_seeds(batch.noise_seeds), 2, n_t=4)
    assert torch.equal(masks.masked[0::2], masks.masked[1::2]) and torch.equal(masks.t[0::2], masks.t[1::2])
    same = TokenBatch(batch.input_ids[0::2].repeat_interleave(2, 0), batch.prompt_lengths, batch.attention_mask,
                      batch.loss_mask, batch.noise_seeds)  # chosen == rejected in every pair
    model = tiny_llada().train()
    reference = tiny_llada(seed=1).train()
    _, coupled = dpo(model, same, DPOConfig(n_mc=2, couple_pairs=True), LLADA, reference=reference)
    _, plain = dpo(model, same, DPOConfig(n_mc=2), LLADA, reference=reference)
    assert coupled["reward_margin"] == pytest.approx(0, abs=1e-5) and abs(plain["reward_margin"]) > 1e-3


def heldout_margin(policy, reference, heldout):
    """Mean implicit reward margin per held-out pair, antithetic masks (exactly 0 at start)."""
    import dare_plugins.vrpo as vrpo

    with torch.no_grad():
        _, m = vrpo.vrpo(policy, heldout, vrpo.VRPOConfig(beta=0.1, n_t=8), LLADA, reference=reference)
    pairs = len(heldout) // 2
    return m["reward_margin"] / pairs, m["reward_accuracy"] / pairs


def test_dpo_learns_to_prefer_chosen_on_heldout_pairs():
    reference = tiny_llada().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    train, heldout = synthetic_pairs(8, seed=0), synthetic_pairs(8, seed=1, step=999)
    before = heldout_margin(policy, reference, heldout)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    config = DPOConfig(beta=0.1, n_mc=2)
    for step in range(25):
        batch = synthetic_pairs(8, seed=0, step=step)  # same pairs, fresh noise seeds
        loss, _ = dpo(policy, batch, config, LLADA, reference=reference)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = heldout_margin(policy, reference, heldout)
    print(f"dpo held-out reward margin per pair: {before[0]:.3f} -> {after[0]:.3f}, "
          f"accuracy {before[1]:.2f} -> {after[1]:.2f}")
    assert before[0] == 0
    assert after[0] > 0.5 and after[1] >= 0.75


# --- registration and config -----------------------------------------------------------------


def test_registered_with_pairs_preference_data_and_reference():
    pm = PluginManager(plugins=[dpo_plugin, preference], entry_points=False)
    assert not pm.failures
    algo = pm.registry.algorithms.get("dpo")
    assert (algo.rows_per_unit, algo.data_format, algo.needs_reference) == (2, "preference", True)
    assert algo.config_type is DPOConfig and algo.loss is dpo
    assert pm.registry.datasets.get("preference_file").splits == ("train", "heldout")


def test_config_parsing_rejects_unknown_and_bad_values():
    cfg = parse_options(DPOConfig, {"beta": 0.2, "n_mc": 4, "estimator": "time"}, "algorithm")
    assert (cfg.beta, cfg.n_mc, cfg.estimator, cfg.antithetic) == (0.2, 4, "time", False)
    with pytest.raises(RecipeError, match="n_mcc"):
        parse_options(DPOConfig, {"n_mcc": 4}, "algorithm")
    with pytest.raises(RecipeError, match="estimator"):
        parse_options(DPOConfig, {"estimator": "exact"}, "algorithm")
    with pytest.raises(RecipeError, match="n_mc must be >= 1"):
        parse_options(DPOConfig, {"n_mc": 0}, "algorithm")


# --- the preference_file dataset --------------------------------------------------------------


def test_shipped_preference_file_splits():
    train, heldout = preference.load("train"), preference.load("heldout")
    assert (len(train), len(heldout)) == (336, 64)
    assert preference.DEFAULT_PATH.stat().st_size < 300_000
    row = train[0]
    assert row["prompt"][0]["role"] == "user" and "####" in row["chosen"]
    assert "####" not in row["rejected"] and row["rejected"].endswith(".") and "The answer is" in row["rejected"]
    assert all(r["chosen"] != r["rejected"] and r["chosen"].split("####")[0] != r["rejected"].split("####")[0]
               for r in train + heldout)
    assert all(r["chosen"].rsplit("####", 1)[1].strip().replace(",", "") == r["ground_truth"].replace(",", "")
               for r in train)
    assert preference.load("train", limit=5) == train[:5]
    assert preference.load("heldout", heldout=10) == (train + heldout)[-10:]


def test_preference_file_reads_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "extra": i} for i in range(5)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        assert preference.load("train", path=str(path), heldout=2) == rows[:3]
        assert preference.load("heldout", path=str(path), heldout=2) == rows[3:]
    with pytest.raises(ValueError, match="split"):
        preference.load("test", path=str(jsonl))
    with pytest.raises(ValueError, match="heldout"):
        preference.load("train", path=str(jsonl), heldout=5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="row 1 lacks rejected"):
        preference.load("train", path=str(bad), heldout=0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preference.load("train", path=str(tmp_path / "nope.jsonl"))


def test_missing_default_file_names_the_path(monkeypatch, tmp_path):
    monkeypatch.setattr(preference, "DEFAULT_PATH", tmp_path / "recipes" / "data" / "gsm8k_pref.jsonl")
    with pytest.raises(FileNotFoundError, match="gsm8k_pref.jsonl.*make_preference_data"):
        preference.load("train")


def test_preference_rows_encode_into_pairs(shared):
    from dare.data import collate_units, encode_units

    tokenizer = dare.load_tokenizer(shared("fixtures", "llada-tiny"))
    rows = preference.load("heldout", limit=4)
    units = encode_units("preference", rows, tokenizer, max_length=256, eos_id=126081)
    assert len(units) == 4 and all(len(u) == 2 for u in units)
    assert all(u[0].prompt_length == u[1].prompt_length for u in units)
    batch = collate_units(units, 256, 126081, run_seed=0, step=0)
    assert len(batch) == 8 and not torch.equal(batch.input_ids[0], batch.input_ids[1])


def test_make_preference_data_reproduces_the_shipped_file(shared, tmp_path):
    source = shared("data", "sft", "train", "gsm8k.parquet")
    out = tmp_path / "pref.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_preference_data.py"),
                    "--source", str(source), "--out", str(out)], check=True, capture_output=True)
    assert out.read_bytes() == preference.DEFAULT_PATH.read_bytes()
