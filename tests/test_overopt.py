"""Over-optimisation: Gao et al.'s fits, the peak verdict, best-of-n's KL and estimator on hand-made numbers,
and bench.overopt end to end on the tiny model."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from playground.metrics.overopt import (
    best_of_n,
    best_of_n_kl,
    best_of_n_weights,
    fit_gao,
    gao_curve,
    monotone,
    peak_visible,
)

# --- Gao's forms --------------------------------------------------------------------------------------


@pytest.mark.parametrize("form, alpha, beta", [("best_of_n", 0.8, 0.3), ("rl", 0.5, 0.4)])
def test_the_fit_recovers_known_alpha_and_beta(form, alpha, beta):
    d = np.linspace(0.25, 3.0, 9)
    gain = [gao_curve({"alpha": alpha, "beta": beta}, x, form) for x in d]
    fit = fit_gao(list(d), gain, form)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert fit["n_points"] == 9


def test_the_fit_through_noise_stays_close_and_says_where_the_curve_peaks():
    rng = np.random.default_rng(0)
    d = np.linspace(0.2, 3.0, 40)
    gain = d * (0.8 - 0.3 * d) + rng.normal(0, 0.01, d.size)
    fit = fit_gao(list(d), list(gain), "best_of_n")
    assert fit["alpha"] == pytest.approx(0.8, abs=0.02) and fit["beta"] == pytest.approx(0.3, abs=0.01)
    assert 0.95 < fit["r2"] < 1
    assert fit["peak_sqrt_kl"] == pytest.approx(0.8 / 0.6, rel=0.05)
    rl = fit_gao([1.0, 2.0, 3.0], [gao_curve({"alpha": 1.0, "beta": 0.5}, x, "rl") for x in (1.0, 2.0, 3.0)], "rl")
    assert rl["peak_sqrt_kl"] == pytest.approx(math.exp(1.0 / 0.5 - 1))  # alpha = beta (log d + 1)


def test_the_fit_leaves_out_the_origin_and_needs_three_points_beyond_it():
    # Points at d = 0 are the curve's start by definition: they change nothing.
    with_origin = fit_gao([0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.6, 0.3], "best_of_n")
    without = fit_gao([1.0, 2.0, 3.0], [0.5, 0.6, 0.3], "best_of_n")
    assert with_origin == without
    assert fit_gao([0.0, 1.0, 2.0], [0.0, 0.5, 0.6], "best_of_n") is None  # two points: fitted exactly by any form
    assert fit_gao([1.0, float("nan"), 2.0, 3.0], [0.1, 0.2, float("inf"), 0.3], "rl") is None
    assert fit_gao([1.0, 2.0, 3.0], [0.45, 1.0, 1.65], "best_of_n")["peak_sqrt_kl"] is None  # never turns down
    with pytest.raises(ValueError, match="form"):
        fit_gao([1.0], [1.0], "dpo")


# --- the peak verdict -----------------------------------------------------------------------------------


def test_a_curve_that_rises_then_falls_clearly_has_a_visible_peak():
    kl = [0.0, 0.5, 1.0, 2.0, 4.0]
    gain = [0.0, 0.20, 0.30, 0.20, 0.05]
    high = [g + 0.05 for g in gain]  # the last point is 0.25 below the peak, its interval 0.05 wide
    assert peak_visible(kl, gain, high) is True


def test_a_monotone_curve_or_a_fall_within_the_interval_has_no_visible_peak():
    kl = [0.0, 0.5, 1.0, 2.0, 4.0]
    assert peak_visible(kl, [0.0, 0.1, 0.2, 0.3, 0.4], [0.05, 0.15, 0.25, 0.35, 0.45]) is False
    # Falls, but by less than the last point's own interval.
    assert peak_visible(kl, [0.0, 0.2, 0.3, 0.28, 0.26], [0.1, 0.3, 0.4, 0.38, 0.36]) is False
    # The order of the points is by KL, not by position in the list.
    assert peak_visible([4.0, 0.0, 1.0], [0.05, 0.0, 0.3], [0.1, 0.0, 0.35]) is True
    assert peak_visible([0.0], [0.0], [0.0]) is False


def test_monotone_reads_the_values_in_kl_order():
    assert monotone([0, 1, 2], [0.1, 0.2, 0.2]) is True
    assert monotone([0, 1, 2], [0.1, 0.3, 0.2]) is False
    assert monotone([2, 0, 1], [0.3, 0.1, 0.2]) is True
    assert monotone([0, 1], [0.2, 0.19], tolerance=0.05) is True


# --- best-of-n ------------------------------------------------------------------------------------------


def test_the_analytic_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            best_of_n_kl(bad)


def test_best_of_n_on_hand_made_scores():
    proxy, gold = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]
    assert best_of_n(proxy, gold, 1) == pytest.approx((2.5, 25.0))  # one sample: the mean
    assert best_of_n(proxy, gold, 4) == pytest.approx((4.0, 40.0))  # all of them: the proxy's favourite
    # n = 2: the i-th lowest is the best of a random pair with probability (i - 1) / C(4, 2).
    assert list(best_of_n_weights(4, 2)) == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6])
    assert best_of_n(proxy, gold, 2)[1] == pytest.approx((20 + 2 * 30 + 3 * 40) / 6)
    # The proxy picks; the gold only scores the pick: a proxy that disagrees with the gold lowers it.
    assert best_of_n(proxy, gold[::-1], 4) == pytest.approx((4.0, 10.0))
    # Tied proxy scores: the pick among them is random, so their gold counts as its mean.
    assert best_of_n([1.0, 1.0, 1.0], [0.0, 3.0, 6.0], 2) == pytest.approx((1.0, 3.0))
    with pytest.raises(ValueError):
        best_of_n(proxy, gold, 5)


def test_best_of_n_is_the_mean_over_every_subset():
    rng = np.random.default_rng(1)
    proxy, gold = rng.normal(size=7), rng.normal(size=7)
    proxy[3] = proxy[5]  # a tie as well
    for n in range(1, 8):
        picks = []
        for subset in itertools.combinations(range(7), n):
            best = max(proxy[i] for i in subset)
            tied = [i for i in subset if proxy[i] == best]
            picks.append((best, float(np.mean([gold[i] for i in tied]))))
        assert best_of_n(proxy, gold, n) == pytest.approx(tuple(np.mean(picks, axis=0)))


def test_best_of_n_sizes_double_up_to_max_n():
    from bench.overopt import best_of_n_sizes

    assert best_of_n_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert best_of_n_sizes(6) == [1, 2, 4, 6]
    assert best_of_n_sizes(1) == [1]


# --- the bench, end to end on the tiny model -------------------------------------------------------------

TINY = ["--labels", "16", "--eval-prompts", "3", "--max-n", "4", "--ppo-rounds", "1", "--max-new-tokens", "8",
        "--ppo-eval-samples", "2", "--reward-config", '{"batch_size": 8}',
        "--ppo-config", '{"iterations": 1, "rollouts_per_iteration": 4, "minibatch_size": 2, "ppo_epochs": 1}']
POINT_KEYS = {"kl", "kl_source", "proxy", "proxy_ci", "gold", "gold_ci", "gold_gain", "gold_gain_ci", "n_prompts"}


def test_the_bench_runs_end_to_end_and_stores_its_points(tiny_model_dir, tmp_path, capsys):
    from bench.overopt import main
    from store import Store

    db, out = tmp_path / "overopt.db", tmp_path / "out.json"
    assert main(["--gold", "concise", "--model", str(tiny_model_dir), *TINY, "--db", str(db),
                 "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads(out.read_text())
    assert {"gold", "labels", "reward_model", "best_of_n", "ppo", "fit", "gold_peak_visible", "proxy_monotone",
            "seconds"} <= set(result)
    assert result["gold"] == "concise:target_words=25" and result["labels"] == 16
    rm = result["reward_model"]
    assert rm["held_out_n"] >= 1 and 0 <= rm["ci"][0] <= rm["held_out_accuracy"] <= rm["ci"][1] <= 1

    best = result["best_of_n"]
    assert [p["n"] for p in best] == [1, 2, 4]
    for p in best:
        assert POINT_KEYS <= set(p) and p["kl_source"] == "analytic" and p["n_prompts"] == 3
        assert p["gold_ci"][0] <= p["gold"] <= p["gold_ci"][1]
    assert best[0]["kl"] == 0 and best[1]["kl"] == pytest.approx(math.log(2) - 0.5, abs=1e-4)
    assert best[0]["gold_gain"] == pytest.approx(0, abs=1e-9)  # n = 1 is the baseline gains are measured from
    assert result["proxy_monotone"]["best_of_n"] is True  # E[max of n] cannot fall as n grows

    ppo = result["ppo"]
    assert [p["round"] for p in ppo] == [0, 1]
    for p in ppo:
        assert POINT_KEYS | {"kl_ci", "seconds"} <= set(p) and p["kl_source"] == "exact"
    assert ppo[0]["kl"] == 0 and ppo[1]["kl"] > 0
    assert ppo[0]["gold"] == pytest.approx(best[0]["gold"])  # round 0 is v0: the same samples
    assert result["fit"] == {"best_of_n": None, "ppo": None}  # too few points to fit two parameters
    assert set(result["gold_peak_visible"]) == {"best_of_n", "ppo"}

    store = Store(db)
    try:
        rows = store.overopt_points(bench_id=result["bench_id"])
    finally:
        store.close()
    assert [(r["method"], r["x"]) for r in rows] == [("best_of_n", 1), ("best_of_n", 2), ("best_of_n", 4),
                                                     ("ppo", 0), ("ppo", 1)]
    assert rows[4]["kl"] == ppo[1]["kl"] and rows[4]["gold_score"] == ppo[1]["gold"]
    assert rows[0]["n_prompts"] == 3 and rows[0]["reward_model"] and rows[0]["model_id"]


def test_an_unknown_gold_or_a_gold_with_nothing_to_learn_stops_with_a_message(tiny_model_dir, tmp_path, capsys):
    from bench.overopt import main

    args = ["--model", str(tiny_model_dir), *TINY, "--db", str(tmp_path / "x.db")]
    assert main(["--gold", "brevity", *args]) == 2
    assert "unknown gold" in capsys.readouterr().err
    # The tiny model never writes this word: every pair scores 0 against 0, every vote would be a coin flip.
    assert main(["--gold", "keyword:word=zebracorn", *args]) == 2
    err = capsys.readouterr().err
    assert "only 0 carry a preference" in err and "zebracorn" in err
    assert not (tmp_path / "x.db").exists()  # stopped before anything was stored


def test_bad_settings_are_named_before_the_model_loads():
    from bench.overopt import main

    with pytest.raises(SystemExit, match="iterations"):
        main(["--ppo-config", '{"iterations": 0}', "--model", "/nonexistent"])
    with pytest.raises(SystemExit, match="learning_rat"):
        main(["--reward-config", '{"learning_rat": 1}', "--model", "/nonexistent"])
    with pytest.raises(SystemExit, match="not JSON"):
        main(["--ppo-config", "{iterations", "--model", "/nonexistent"])


def test_an_aborted_ppo_round_ends_the_curve_and_keeps_the_points_so_far(tiny_model_dir, tmp_path, capsys):
    from bench.overopt import main

    config = {"iterations": 2, "rollouts_per_iteration": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_kl": 1e-9}
    args = [a if a != TINY[TINY.index("--ppo-config") + 1] else json.dumps(config) for a in TINY]
    assert main(["--gold", "concise", "--model", str(tiny_model_dir), *args, "--ppo-rounds", "2",
                 "--db", str(tmp_path / "x.db")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ppo_stopped"]["round"] == 1 and "max_kl" in result["ppo_stopped"]["reason"]
    assert [p["round"] for p in result["ppo"]] == [0]
    assert len(result["best_of_n"]) == 3
