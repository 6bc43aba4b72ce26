"""playground.metrics on hand-made inputs whose answers are worked out by hand in the comments."""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from playground.metrics import (
    annotator_share,
    annotator_summary,
    bootstrap_bradley_terry,
    bootstrap_interval,
    bradley_terry,
    distinct_n,
    fit_frontier,
    identical_share,
    labels_to_held_significance,
    labels_to_significance,
    length_bias,
    length_summary,
    mean_interval,
    mean_pairwise_similarity,
    paired_bootstrap,
    project_2d,
    semantic_drift,
    sequence_kl,
    staleness,
    style_controlled_bradley_terry,
    t_quantile,
    token_kl,
    version_index,
    wilson,
    win_rate,
    windowed_drift,
)

METRICS_DIR = Path(__file__).resolve().parent.parent / "playground" / "metrics"
ELO_3_TO_1 = 400 * math.log10(3)  # the rating gap at which the stronger side wins 3 of 4


def battle(a: str, b: str, winner: str, len_a: int | None = None, len_b: int | None = None) -> dict:
    out = {"model_a": a, "model_b": b, "winner": winner}
    if len_a is not None:
        out.update(len_a=len_a, len_b=len_b)
    return out


# --- the package's own contract --------------------------------------------------------------------

def test_metrics_import_only_the_standard_library_numpy_and_torch():
    allowed = set(sys.stdlib_module_names) | {"numpy", "torch", "__future__"}
    for path in METRICS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                ok = name.split(".")[0] in allowed or name.startswith("playground.metrics")
                assert ok, f"{path.name} imports {name}"


# --- intervals -------------------------------------------------------------------------------------

def test_wilson_known_values():
    # 8/10 at z = 1.96: centre (0.8 + 0.19208) / 1.38416, half-width 1.96 * sqrt(0.025604) / 1.38416.
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    # All successes: lo = 1 / (1 + z^2 / n), hi = 1 exactly.
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(1 / (1 + 1.96**2 / 10), abs=1e-12) and hi == 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    # A tie counts half: 7.5 of 10 is p = 0.75; centre 0.94208 / 1.38416 = 0.68062,
    # half-width 1.96 * sqrt(0.01875 + 0.009604) / 1.38416 = 0.23844.
    lo, hi = wilson(7.5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4422, 0.9191)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_t_quantile_table_and_expansion():
    assert t_quantile(0.95, 4) == 2.776
    assert t_quantile(0.95, 30) == 2.042
    assert t_quantile(0.99, 1) == 63.657
    # Beyond the table, Cornish-Fisher: t_{0.975, 99} = 1.98422, t_{0.995, 60} = 2.66028.
    assert t_quantile(0.95, 99) == pytest.approx(1.98422, abs=1e-4)
    assert t_quantile(0.99, 60) == pytest.approx(2.66028, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(0.8, 5)


def test_mean_interval():
    # mean 3, sd sqrt(2.5), se sqrt(0.5); t(4) = 2.776 -> half-width 1.96293.
    out = mean_interval([1, 2, 3, 4, 5])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert out["n"] == 5 and out["mean"] == 3.0
    assert out["lo"] == pytest.approx(3 - half, abs=1e-12) and out["hi"] == pytest.approx(3 + half, abs=1e-12)
    assert mean_interval([]) == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert mean_interval([4.5]) == {"mean": 4.5, "lo": 4.5, "hi": 4.5, "n": 1}


def test_bootstrap_interval():
    assert bootstrap_interval([2.0] * 7, n_boot=50) == (2.0, 2.0)
    assert bootstrap_interval([]) == (None, None)
    # Means of resamples of [0, 1] are 0 (p 1/4), 0.5 or 1 (p 1/4): the 2.5/97.5 percentiles are 0 and 1.
    assert bootstrap_interval([0.0, 1.0], n_boot=400) == (0.0, 1.0)
    data = [1.0, 2.0, 4.0, 8.0, 16.0]
    first = bootstrap_interval(data, stat=np.median, n_boot=200, seed=3)
    assert first == bootstrap_interval(data, stat=np.median, n_boot=200, seed=3)
    assert 1.0 <= first[0] <= first[1] <= 16.0



def test_paired_bootstrap_of_a_constant_change_is_that_change_however_spread_the_prompts():
    # Every prompt gains exactly 0.5: the change is known to be 0.5 and the interval has no width, while
    # the prompts themselves span 0..93 (an unpaired interval of the two means would be tens wide).
    old = [float(3 * i) for i in range(32)]
    new = [x + 0.5 for x in old]
    assert paired_bootstrap(new, old, n_boot=200) == {"diff": 0.5, "lo": 0.5, "hi": 0.5, "n": 32}
    lo, hi = bootstrap_interval(new, n_boot=200)
    assert hi - lo > 10
    assert paired_bootstrap([], []) == {"diff": None, "lo": None, "hi": None, "n": 0}


def test_paired_bootstrap_on_cases_with_exact_answers():
    # Two prompts with differences 0 and 1: resampled means are 0 (p 1/4), 0.5 (1/2) or 1 (1/4), so the
    # 2.5th and 97.5th percentiles are exactly 0 and 1.
    out = paired_bootstrap([5.0, 3.0], [5.0, 2.0], n_boot=2000)
    assert (out["diff"], out["lo"], out["hi"]) == (0.5, 0.0, 1.0)
    # Symmetric: ten prompts, five +1 and five -1. A resampled mean is (2k - 10) / 10 with k ~ Bin(10, 1/2);
    # P(k <= 1) = 0.011 < 0.025 < P(k <= 2) = 0.055, so the interval is exactly [-0.6, 0.6] around 0.
    new = [1.0, 0.0] * 5
    old = [0.0, 1.0] * 5
    out = paired_bootstrap(new, old, n_boot=4000, seed=1)
    assert (out["diff"], out["lo"], out["hi"], out["n"]) == (0.0, -0.6, 0.6, 10)


def test_paired_bootstrap_agrees_with_the_normal_interval_on_many_prompts_and_is_seeded():
    rng = np.random.default_rng(7)
    old = rng.normal(0.0, 1.0, 400)
    new = old + rng.normal(0.2, 0.5, 400)
    out = paired_bootstrap(new, old, n_boot=4000, seed=3)
    d = new - old
    half = 1.96 * d.std(ddof=1) / math.sqrt(d.size)
    assert out["diff"] == pytest.approx(d.mean())
    assert out["lo"] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert out["hi"] == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert out == paired_bootstrap(new, old, n_boot=4000, seed=3)
    assert out != paired_bootstrap(new, old, n_boot=4000, seed=4)


def test_paired_bootstrap_refuses_unpaired_or_non_finite_scores():
    with pytest.raises(ValueError, match="one old score per new score, got 2 new and 3 old"):
        paired_bootstrap([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1.0], [0.0], n_boot=0)


def test_labels_to_significance_on_a_scripted_loop():
    def rnd(r, labels, ci, kl):
        return {"round": r, "labels": labels, "gold_mean_diff_ci": ci, "kl_to_v0": kl}

    rounds = [rnd(0, 0, [0.01, 0.2], 0.0),  # v0 against itself: above zero by chance, never counts
              rnd(1, 64, [-0.10, 0.05], 0.3),
              rnd(2, 128, [0.0, 0.12], 1.1),  # touching zero is not above it
              rnd(3, 192, [0.02, 0.15], 2.4),
              rnd(4, 256, [-0.01, 0.2], 3.3)]
    assert labels_to_significance(rounds) == {"labels": 192, "kl_to_v0": 2.4, "round": 3}
    assert labels_to_significance(rounds[:3]) is None
    assert labels_to_significance([]) is None
    assert labels_to_significance([rnd(1, 64, None, 0.2), rnd(2, 128, [0.3, 0.4], 0.9)])["labels"] == 128


def test_labels_to_held_significance_counts_only_a_crossing_the_rest_of_the_run_agrees_with():
    def rnd(r, labels, ci, kl):
        return {"round": r, "labels": labels, "gold_mean_diff_ci": ci, "kl_to_v0": kl}

    crossed_and_fell_back = [rnd(0, 0, [0.01, 0.2], 0.0), rnd(1, 64, [0.01, 0.06], 0.4),
                             rnd(2, 128, [-0.03, 0.02], 0.5)]  # the 2026-12-04 seed-1 run's shape
    assert labels_to_significance(crossed_and_fell_back)["labels"] == 64
    assert labels_to_held_significance(crossed_and_fell_back) is None
    # It crossed at 64, fell back at 128, crossed again at 192 and held: 192, with the KL there.
    again = crossed_and_fell_back + [rnd(3, 192, [0.02, 0.1], 1.5), rnd(4, 256, [0.03, 0.12], 1.9)]
    assert labels_to_held_significance(again) == {"labels": 192, "kl_to_v0": 1.5, "round": 3}
    # A round with no interval measured neither breaks nor makes a run of held rounds.
    assert labels_to_held_significance(again[:4] + [rnd(4, 256, None, 1.9)])["labels"] == 192
    # Round 0 (v0 against itself) never counts, and one crossing at the end is both measures at once.
    last_only = [rnd(0, 0, [0.1, 0.2], 0.0), rnd(1, 64, [-0.1, 0.1], 0.3), rnd(2, 128, [0.0001, 0.1], 0.9)]
    assert labels_to_held_significance(last_only) == labels_to_significance(last_only) == {
        "labels": 128, "kl_to_v0": 0.9, "round": 2}
    assert labels_to_held_significance([]) is None


# --- KL --------------------------------------------------------------------------------------------

def test_token_kl_of_identical_logits_is_zero():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    kl = token_kl(logits, logits.clone())
    assert kl.shape == (5,) and kl.dtype == torch.float64
    assert torch.equal(kl, torch.zeros(5, dtype=torch.float64))
    assert sequence_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax ignores a shift


def test_token_kl_closed_form():
    # p = softmax([0, ln 3]) = (1/4, 3/4), q uniform: KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    p = torch.tensor([[0.0, math.log(3)], [1.0, 1.0]], dtype=torch.float64)
    q = torch.tensor([[5.0, 5.0], [1.0, 1.0]], dtype=torch.float32)  # mixed dtypes are fine
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl = token_kl(p, q)
    assert kl[0].item() == pytest.approx(expected, abs=1e-12) and kl[1].item() == 0.0
    assert sequence_kl(p, q) == pytest.approx(expected, abs=1e-12)
    # KL is not symmetric: KL(q || p) = 1/2 ln 2 + 1/2 ln(2/3).
    assert token_kl(q, p)[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-12)


def test_token_kl_masked_tokens_and_bad_shapes():
    # p puts no mass on the last token: that term is 0, not nan. p = (1/2, 1/2, 0), q = (1/4, 3/4, ~0).
    p = torch.tensor([[0.0, 0.0, -math.inf]], dtype=torch.float64)
    q = torch.tensor([[0.0, math.log(3), -30.0]], dtype=torch.float64)
    q_probs = torch.softmax(q.double(), -1)[0]
    expected = 0.5 * math.log(0.5 / q_probs[0].item()) + 0.5 * math.log(0.5 / q_probs[1].item())
    assert token_kl(p, q).item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        token_kl(torch.zeros(2, 3), torch.zeros(3, 3))


# --- text ------------------------------------------------------------------------------------------

def test_distinct_n_of_a_repeated_sentence():
    texts = ["The cat sat", "the CAT sat"]
    assert distinct_n(texts, 1) == 3 / 6  # the, cat, sat out of 6 tokens
    assert distinct_n(texts, 2) == 2 / 4  # "the cat", "cat sat" out of 4 bigrams
    assert distinct_n(["a b c d"], 2) == 1.0
    assert distinct_n(["one", ""], 2) == 0.0  # no text has a bigram; none span texts
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_mean_pairwise_similarity():
    # Pairs: cos(e1, e2) = 0, cos(e1, e1+e2) = cos(e2, e1+e2) = 1/sqrt(2) -> mean sqrt(2)/3.
    emb = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert mean_pairwise_similarity(emb) == pytest.approx(math.sqrt(2) / 3, abs=1e-12)
    assert mean_pairwise_similarity(torch.tensor(emb)) == pytest.approx(math.sqrt(2) / 3, abs=1e-7)
    assert mean_pairwise_similarity([[1.0, 2.0]]) is None
    assert mean_pairwise_similarity([[2.0, 2.0], [5.0, 5.0]]) == pytest.approx(1.0, abs=1e-12)


def test_length_summary():
    out = length_summary([10, 20, 30, 40], ["stop", "length", "stop", "error"])
    assert out == {"mean": 25.0, "median": 25.0, "limit_share": 0.25, "stop_share": 0.5, "n": 4}
    assert length_summary([], [])["mean"] is None
    with pytest.raises(ValueError):
        length_summary([1], [])


def test_length_bias():
    # The equal pair is left out; the chosen reply was longer in 2 of the 3 others.
    out = length_bias([(10, 5), (20, 5), (3, 9), (7, 7)])
    lo, hi = wilson(2, 3)
    assert out == {"longer_won": 2 / 3, "lo": lo, "hi": hi, "n": 3}
    assert length_bias([(4, 4)]) == {"longer_won": None, "lo": None, "hi": None, "n": 0}


def test_identical_share():
    out = identical_share([("a", "a"), ("a", "b"), ("x", "x ")])  # compared exactly: "x " differs
    assert out == {"share": 1 / 3, "n_identical": 1, "n": 3}
    assert identical_share([]) == {"share": None, "n_identical": 0, "n": 0}


# --- drift -----------------------------------------------------------------------------------------

def test_semantic_drift():
    a = np.array([[1.0, 0.0], [1.0, 2.0]])
    assert semantic_drift(a, a.copy()) == 0.0
    assert semantic_drift(a, 3 * a) == pytest.approx(0.0, abs=1e-15)  # direction, not size
    assert semantic_drift([[1.0, 0.0]], [[0.0, 4.0]]) == pytest.approx(1.0, abs=1e-15)
    assert semantic_drift([[1.0, 0.0]], [[-2.0, 0.0]]) == pytest.approx(2.0, abs=1e-15)
    assert semantic_drift(a, np.zeros((0, 2))) is None


def test_project_2d_shape_signs_and_determinism():
    # Centred already; x spreads most (variance 18 vs 2), so PC1 is +x and PC2 is +y.
    pts = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    out = project_2d(pts)
    assert out.shape == (4, 2)
    np.testing.assert_allclose(out, [[-3, 0], [3, 0], [0, -1], [0, 1]], atol=1e-12)
    # Shifted and with rows permuted, the same picture (signs do not flip between calls).
    np.testing.assert_allclose(project_2d(pts[::-1] + 10.0), out[::-1], atol=1e-12)
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(20, 6))
    assert np.array_equal(project_2d(cloud), project_2d(cloud.copy()))
    assert project_2d([[1.0, 2.0, 3.0]]).tolist() == [[0.0, 0.0]]
    # Points on a line have no second component.
    line = project_2d([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(line, [[-math.sqrt(2), 0], [0, 0], [math.sqrt(2), 0]], atol=1e-12)


def test_windowed_drift():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    out = windowed_drift([e1, e1, e1, e1, e2, e2], 3)
    assert [w["window"] for w in out] == [0, 1, 2]
    assert [w["n"] for w in out] == [2, 2, 2]
    assert [w["drift"] for w in out] == [0.0, 0.0, 1.0]
    assert [w["n"] for w in windowed_drift([e1] * 5, 2)] == [3, 2]
    assert windowed_drift([e1], 2)[1] == {"window": 1, "n": 0, "drift": None}


# --- arena -----------------------------------------------------------------------------------------

def test_win_rate_counts_ties_half():
    out = win_rate(6, 2, 2)
    lo, hi = wilson(7, 10)
    assert out == {"wins": 6, "losses": 2, "ties": 2, "n": 10, "rate": 0.7, "lo": lo, "hi": hi}
    assert win_rate(0, 0, 0)["rate"] is None


def test_bradley_terry_three_of_four():
    battles = [battle("v0", "v1", "model_b")] * 2 + [battle("v1", "v0", "model_a"),
                                                    battle("v0", "v1", "model_a")]
    ratings = bradley_terry(battles)
    assert ratings["v0"] == 1000.0
    assert ratings["v1"] - ratings["v0"] == pytest.approx(ELO_3_TO_1, abs=1e-3)
    # In natural units (scale 1, base e) the gap is the log-odds ln 3; init moves everything.
    nat = bradley_terry(battles, scale=1, base=math.e, init=0)
    assert nat["v1"] == pytest.approx(math.log(3), abs=1e-6) and nat["v0"] == 0.0
    # Duplicating every battle (as FastChat does) changes nothing.
    assert bradley_terry(battles * 2)["v1"] == pytest.approx(ratings["v1"], abs=1e-3)


def test_bradley_terry_ties_count_half():
    # One win and two ties for v1: a score of 2 of 3, odds 2 -> 400 log10 2, same as 2 wins 1 loss.
    tied = [battle("v0", "v1", "model_b"), battle("v0", "v1", "tie"), battle("v1", "v0", "tie")]
    plain = [battle("v0", "v1", "model_b")] * 2 + [battle("v0", "v1", "model_a")]
    assert bradley_terry(tied)["v1"] == pytest.approx(1000 + 400 * math.log10(2), abs=1e-3)
    assert bradley_terry(tied)["v1"] == pytest.approx(bradley_terry(plain)["v1"], abs=1e-6)


def test_bradley_terry_chain_anchor_and_errors():
    # a beats b 3:1, b beats c 3:1, a and c never meet: the fit is exact, gaps add up.
    chain = ([battle("a", "b", "model_a")] * 3 + [battle("a", "b", "model_b")]
             + [battle("b", "c", "model_a")] * 3 + [battle("b", "c", "model_b")])
    r = bradley_terry(chain, anchor="c")
    assert r["c"] == 1000.0
    assert r["b"] == pytest.approx(1000 + ELO_3_TO_1, abs=1e-3)
    assert r["a"] == pytest.approx(1000 + 2 * ELO_3_TO_1, abs=1e-3)
    # Without the anchor among the models the ratings average init.
    assert sum(bradley_terry(chain).values()) / 3 == pytest.approx(1000.0, abs=1e-6)
    assert bradley_terry([]) == {}
    with pytest.raises(ValueError, match="winner"):
        bradley_terry([battle("v0", "v1", "model_c")])


def test_bootstrap_bradley_terry():
    battles = ([battle("v0", "v1", "model_b")] * 6 + [battle("v1", "v0", "model_b")] * 2
               + [battle("v1", "v2", "model_b"), battle("v1", "v2", "model_a"), battle("v2", "v1", "tie")])
    out = bootstrap_bradley_terry(battles, n_boot=60, seed=1)
    plain = bradley_terry(battles)
    assert set(out) == {"v0", "v1", "v2"}
    assert {m: out[m]["n"] for m in out} == {"v0": 8, "v1": 11, "v2": 3}
    for model, row in out.items():
        assert row["rating"] == pytest.approx(plain[model], abs=1e-9)
        assert row["lo"] <= row["rating"] <= row["hi"]
    assert out["v0"]["lo"] == out["v0"]["hi"] == 1000.0  # the anchor does not move
    assert out["v1"]["hi"] - out["v1"]["lo"] > 50  # 8 votes cannot pin a rating down
    assert bootstrap_bradley_terry(battles, n_boot=60, seed=1) == out


def length_effect_battles() -> list[dict]:
    """Equal models; the longer reply wins 3 of 4 times, and A is the longer one 12 times of 16.

    A longer: A wins 9, B wins 3. B longer: B wins 3, A wins 1. Sides alternate.
    """
    out = []
    for i, a_wins in enumerate([True] * 9 + [False] * 3):  # A longer (300 vs 100 tokens)
        winner_is_a = a_wins
        if i % 2:
            out.append(battle("A", "B", "model_a" if winner_is_a else "model_b", 300, 100))
        else:
            out.append(battle("B", "A", "model_b" if winner_is_a else "model_a", 100, 300))
    for i, a_wins in enumerate([False] * 3 + [True]):  # B longer
        if i % 2:
            out.append(battle("A", "B", "model_a" if a_wins else "model_b", 100, 300))
        else:
            out.append(battle("B", "A", "model_b" if a_wins else "model_a", 300, 100))
    return out


def test_style_control_removes_a_pure_length_effect():
    battles = length_effect_battles()
    plain = bradley_terry(battles, anchor="B")
    # Plain: A scores 10 of 16, odds 10/6.
    assert plain["A"] - plain["B"] == pytest.approx(400 * math.log10(10 / 6), abs=1e-3)
    controlled = style_controlled_bradley_terry(battles, n_boot=40, anchor="B")
    # Controlled: P(longer wins) = 3/4 either way, so the models are exactly equal.
    assert controlled["B"]["rating"] == 1000.0
    assert controlled["A"]["rating"] == pytest.approx(1000.0, abs=1e-3)
    assert controlled["A"]["lo"] <= controlled["A"]["rating"] <= controlled["A"]["hi"]
    assert controlled["A"]["n"] == 16


def test_style_control_skips_battles_without_lengths_and_ignores_equal_lengths():
    same_length = [battle("v0", "v1", "model_b", 50, 50)] * 3 + [battle("v0", "v1", "model_a", 50, 50)]
    no_length = [battle("v0", "v1", "model_a")] * 5
    out = style_controlled_bradley_terry(same_length + no_length, n_boot=20)
    assert out["v1"]["n"] == 4
    # A constant length feature controls nothing: the plain 3-of-4 gap.
    assert out["v1"]["rating"] - out["v0"]["rating"] == pytest.approx(ELO_3_TO_1, abs=1e-3)
    assert style_controlled_bradley_terry(no_length) == {}


# --- staleness -------------------------------------------------------------------------------------

def test_staleness_of_a_hand_built_run():
    pairs = [
        {"policy_version": "v3", "stored_logprob": -10.0, "logprob_trained_from": -11.0},
        {"policy_version": "v1", "stored_logprob": -5.0, "logprob_trained_from": -7.0},
        {"policy_version": "v0|v2"},  # an arena pair counts as its newest version, v2
        {"policy_version": "v4", "stored_logprob": -1.0},  # newer than trained_from: lag floored at 0
    ]
    out = staleness(pairs, "v3")
    # samplers 3, 1, 2, 4 -> older: v1 and v2; lags 0, 2, 1, 0; gaps 1 and 2.
    assert out == {"n": 4, "share_older": 0.5, "mean_lag": 0.75, "off_policy_gap": 1.5, "n_gap": 2}
    assert staleness([], "v3") == {"n": 0, "share_older": None, "mean_lag": None, "off_policy_gap": None,
                                   "n_gap": 0}
    assert version_index("v12|v3") == 12
    with pytest.raises(ValueError):
        staleness([{"policy_version": "base"}], "v1")


# --- annotators ------------------------------------------------------------------------------------

def test_annotator_shares_carry_their_wilson_intervals():
    # The counting (what "the same pair" is) is the store's: tests/test_annotators.py checks it by hand.
    counts = {"votes": 10, "a": 6, "b": 2, "tie": 1, "both_bad": 1, "agree": 3, "n_agreement": 4,
              "majority_match": 0, "n_majority": 0}
    out = annotator_summary(counts)
    lo, hi = wilson(6, 8)
    assert out["left"] == {"rate": 0.75, "lo": lo, "hi": hi, "n": 8}
    assert (out["tie"]["rate"], out["both_bad"]["rate"], out["agreement"]["rate"]) == (0.1, 0.1, 0.75)
    assert out["majority"] == {"rate": None, "lo": None, "hi": None, "n": 0}
    assert annotator_share(0, 0)["rate"] is None


# --- frontier --------------------------------------------------------------------------------------

def test_fit_frontier_recovers_noiseless_curves():
    d = [0.5, 1.0, 2.0, 3.0, 4.0]
    out = fit_frontier(d, [0.5 + x * (0.3 - 0.1 * x) for x in d])
    assert out["w0"] == 0.5  # no point at d = 0: fixed
    assert out["alpha"] == pytest.approx(0.3, abs=1e-9) and out["beta"] == pytest.approx(0.1, abs=1e-9)
    assert len(out["curve"]) == 50 and out["curve"][0] == [0.0, 0.5] and out["curve"][-1][0] == 4.0
    assert out["curve"][-1][1] == pytest.approx(0.5 + 4 * (0.3 - 0.4), abs=1e-9)
    # A measured point at d = 0 sets w0.
    d0 = [0.0, 1.0, 2.0, 3.0]
    fitted = fit_frontier(d0, [0.45 + x * (0.2 - 0.05 * x) for x in d0])
    assert fitted["w0"] == pytest.approx(0.45, abs=1e-9) and fitted["alpha"] == pytest.approx(0.2, abs=1e-9)
    assert fitted["beta"] == pytest.approx(0.05, abs=1e-9)


def test_fit_frontier_needs_four_points():
    assert fit_frontier([1.0, 2.0, 3.0], [0.6, 0.7, 0.6]) is None
    assert fit_frontier([1.0, 2.0, 3.0, float("nan")], [0.6, 0.7, 0.6, 0.5]) is None
    with pytest.raises(ValueError):
        fit_frontier([1.0], [0.5, 0.6])
