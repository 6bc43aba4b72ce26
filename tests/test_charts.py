"""The dashboard's plots and tables drawn from hand-made dicts of `dashboard_data`'s documented shape.

`realistic_data()` is v0..v3 with v3 live, evaluated, voted on and trained from; the degenerate dicts are
the states a fresh or failing install is in (no versions, only v0, an evaluation failed or still running).
Each plot either draws what it should (series, points, version names on the axis) or returns None and
says why.
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from playground.web import charts, report_html
from playground.web import tables as tables_mod

VERSIONS = ["v0", "v1", "v2", "v3"]
PROBES = 6


def _evaluation(i: int, name: str) -> dict:
    kl = [0.0, 1.3, 2.8, 4.2][i]
    return {
        "version": name, "status": "succeeded", "error": None, "attempt": 1, "n_probes": 64, "n_samples": 4,
        "finished_at": f"2025-05-0{i + 1}T12:00:00+00:00",
        "kl_v0": {"mean": kl, "lo": max(kl - 0.4 - 0.2 * i, 0.0), "hi": kl + 0.4 + 0.2 * i, "n": 64},
        "kl_prev": None if i == 0 else {"mean": [0, 1.3, 1.6, 1.5][i], "lo": [0, 1.0, 1.2, 1.1][i],
                                        "hi": [0, 1.6, 2.0, 1.9][i], "n": 64},
        "sqrt_kl_v0": math.sqrt(kl),
        "length": {"mean": [154, 171, 196, 212][i], "median": [140, 160, 188, 205][i],
                   "limit_share": [0.02, 0.04, 0.08, 0.12][i], "stop_share": [0.98, 0.96, 0.92, 0.88][i], "n": 256},
        "distinct_1": [0.62, 0.58, 0.55, 0.51][i], "distinct_2": [0.58, 0.52, 0.47, 0.41][i],
        "self_similarity": {"mean": [0.21, 0.25, 0.3, 0.36][i], "lo": [0.18, 0.22, 0.26, 0.31][i],
                            "hi": [0.24, 0.28, 0.34, 0.41][i], "n": 64},
        "semantic_drift": [0.0, 0.04, 0.09, 0.15][i],
        # held-out accuracy by the version that sampled the pairs (v0's implicit reward is not a thing)
        "held_out": [] if i == 0 else [
            {"source_version": src, "accuracy": acc, "lo": lo, "hi": hi, "n": n}
            for src, acc, lo, hi, n in [("v0", 0.64 + 0.02 * i, 0.55, 0.74, 80), ("v1", 0.39, 0.18, 0.64, 12),
                                        ("v2", 0.7, 0.52, 0.84, 30)][:i]],
    }


def realistic_data() -> dict:
    versions = [{"name": n, "parent": None if i == 0 else VERSIONS[i - 1],
                 "created_at": f"2025-05-0{i + 1}T11:00:00+00:00", "live": n == "v3"} for i, n in enumerate(VERSIONS)]
    wins = {"v1": (14, 12, 2), "v2": (17, 11, 3), "v3": (17, 12, 2)}
    win_rows = []
    for name, (w, l, t) in wins.items():
        n = w + l + t
        win_rows.append({"version": name, "wins": w, "losses": l, "ties": t, "n": n, "rate": (w + t / 2) / n,
                         "lo": (w + t / 2) / n - 0.17, "hi": (w + t / 2) / n + 0.16})
    leaderboard = [{"version": n, "rating": 1000 + 25 * i, "lo": 985 + 25 * i, "hi": 1016 + 25 * i, "n": 40 + i,
                    "rating_lc": 1000 + 12 * i, "lo_lc": 984 + 12 * i, "hi_lc": 1017 + 12 * i}
                   for i, n in enumerate(VERSIONS)]
    points = [{"version": n, "sqrt_kl": math.sqrt([0.0, 1.3, 2.8, 4.2][i]),
               "win_rate": 0.5 if i == 0 else win_rows[i - 1]["rate"],
               "lo": 0.5 if i == 0 else win_rows[i - 1]["lo"], "hi": 0.5 if i == 0 else win_rows[i - 1]["hi"],
               "n": 0 if i == 0 else win_rows[i - 1]["n"]} for i, n in enumerate(VERSIONS)]
    curve = [[x / 10, 0.5 + 0.12 * (x / 10) - 0.02 * (x / 10) ** 2] for x in range(0, 23)]
    names = ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]
    series = [{"step": s, "name": name, "value": value}
              for s in range(1, 21) for name, value in zip(names, [0.693 - 0.01 * s, 0.05 * s, 0.5 + 0.015 * s,
                                                                  -120 - 0.5 * s, -125 - 1.5 * s])]
    return {
        "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "generated_at": "2025-05-04T12:30:00+00:00", "live": "v3",
        "versions": versions,
        "evaluations": [_evaluation(i, n) for i, n in enumerate(VERSIONS)],
        "map": [{"version": n, "probe_idx": p, "x": 0.5 * i + 0.1 * p, "y": 0.3 * i - 0.05 * p}
                for i, n in enumerate(VERSIONS) for p in range(PROBES)],
        "prompt_drift": [{"window": w, "start": f"2025-05-0{w + 1}T00:00:00+00:00",
                          "end": f"2025-05-0{w + 2}T00:00:00+00:00", "n": 40 + 5 * w,
                          "drift": [0.0, 0.03, 0.05, 0.04][w]} for w in range(4)],
        "length_bias": {"longer_won": 0.63, "lo": 0.55, "hi": 0.71, "n": 120},
        "identical_pairs": {"share": 0.08, "n_identical": 8, "n": 100},
        "staleness": [{"run_id": r, "version": f"v{r}", "parent": f"v{r - 1}", "n": 32 + 8 * r,
                       "share_older": [0.0, 0.25, 0.4][r - 1], "mean_lag": [0.0, 0.3, 0.6][r - 1],
                       "off_policy_gap": [0.0, 0.8, 1.4][r - 1]} for r in (1, 2, 3)],
        "arena": {"win_vs_v0": win_rows, "leaderboard": leaderboard},
        "frontier": {"points": points, "fit": {"alpha": 0.12, "beta": 0.02, "curve": curve}},
        "curves": {"run_id": 3, "series": series},
        "annotators": [
            {"user": "alice", "simulated": False, "votes": 48, "left_share": 0.52, "tie_share": 0.1,
             "both_bad_share": 0.04, "agreement": 0.78, "n_agreement": 23, "majority_agreement": 0.81,
             "n_majority": 21},
            {"user": "sim-concise-1", "simulated": True, "votes": 200, "left_share": 0.49, "tie_share": 0.02,
             "both_bad_share": 0.0, "agreement": 0.74, "n_agreement": 90, "majority_agreement": 0.77, "n_majority": 85},
        ],
        "overopt": [{"bench_id": "b1", "gold": "concise", "reward_model": "r1", "created_at": "2025-05-04T12:00:00",
                     "points": OVEROPT_POINTS}],
        "notes": {"frontier": "The fit is a quadratic in sqrt(KL), as in Gao et al.'s over-optimisation curves."},
    }


# Best-of-n for n = 1, 2, 4, 8 (KL log n - (n-1)/n) and two PPO rounds: the proxy rises, gold peaks and falls.
OVEROPT_POINTS = [
    {"method": "best_of_n", "x": n, "kl": kl, "kl_low": None, "kl_high": None, "proxy": p, "proxy_low": p - 0.1,
     "proxy_high": p + 0.1, "gold_score": g, "gold_low": g - 0.05, "gold_high": g + 0.05, "n_prompts": 24}
    for n, kl, p, g in [(1, 0.0, 0.0, 0.5), (2, 0.193, 0.4, 0.6), (4, 0.636, 0.8, 0.62), (8, 1.204, 1.1, 0.55)]
] + [
    {"method": "ppo", "x": r, "kl": kl, "kl_low": kl * 0.8, "kl_high": kl * 1.2, "proxy": p, "proxy_low": p - 0.2,
     "proxy_high": p + 0.2, "gold_score": g, "gold_low": g - 0.1, "gold_high": g + 0.1, "n_prompts": 24}
    for r, kl, p, g in [(0, 0.0, 0.0, 0.5), (1, 2.0, 0.9, 0.7), (2, 6.0, 1.6, 0.4)]
]


def no_versions() -> dict:
    return {"model_id": "m", "generated_at": "2025-05-04T12:30:00+00:00", "live": None, "versions": [],
            "evaluations": [], "map": [], "prompt_drift": [], "length_bias": {"longer_won": None, "lo": None,
                                                                               "hi": None, "n": 0},
            "identical_pairs": {"share": 0.0, "n_identical": 0, "n": 0}, "staleness": [],
            "arena": {"win_vs_v0": [], "leaderboard": []}, "frontier": {"points": [], "fit": None},
            "curves": {"run_id": None, "series": []}, "annotators": [], "notes": {}}


def only_v0() -> dict:
    data = realistic_data()
    data["versions"] = data["versions"][:1]
    data["versions"][0]["live"] = True
    data["live"] = "v0"
    data["evaluations"] = data["evaluations"][:1]
    data["map"] = [p for p in data["map"] if p["version"] == "v0"]
    data["prompt_drift"] = data["prompt_drift"][:1]
    data["staleness"] = []
    data["arena"] = {"win_vs_v0": [], "leaderboard": data["arena"]["leaderboard"][:1]}
    data["frontier"] = {"points": data["frontier"]["points"][:1], "fit": None}
    data["curves"] = {"run_id": None, "series": []}
    data["overopt"] = []
    data["notes"] = {}
    return data


def with_v1_evaluation(status: str) -> dict:
    """v0 and v1, v1 live, v1's evaluation `status` ('failed' or 'running'): nothing of v1 measured yet."""
    data = only_v0()
    data["versions"].append({"name": "v1", "parent": "v0", "created_at": "2025-05-02T11:00:00+00:00", "live": True})
    data["versions"][0]["live"] = False
    data["live"] = "v1"
    blank = {k: None for k in _evaluation(1, "v1")}
    blank.update(version="v1", status=status, attempt=2 if status == "failed" else 1, held_out=[],
                 error="CUDA out of memory while scoring probe 17" if status == "failed" else None)
    data["evaluations"].append(blank)
    return data


DEGENERATE = {"no versions": no_versions, "only v0": only_v0,
              "evaluation failed": lambda: with_v1_evaluation("failed"),
              "evaluation running": lambda: with_v1_evaluation("running")}


def ticks(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


def errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def points(container: ErrorbarContainer) -> int:
    line = container.lines[0]
    return len(line.get_xdata()) if line is not None else len(container.lines[2][0].get_segments())


@pytest.fixture
def data():
    return realistic_data()


def test_every_plot_has_a_caption_and_a_title():
    assert set(charts.CAPTIONS) == set(charts.CHARTS) == set(charts.TITLES)
    for key, caption in charts.CAPTIONS.items():
        assert caption.endswith(".") and ("rising" in caption or "falling" in caption), key


def test_kl_two_series_with_intervals_and_the_versions_on_the_axis(data):
    fig = charts.plot_kl(data)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ticks(ax) == VERSIONS
    to_v0, to_prev = errorbars(ax)
    assert points(to_v0) == 4 and points(to_prev) == 3  # v0 has no previous version
    assert list(to_v0.lines[0].get_ydata()) == [0.0, 1.3, 2.8, 4.2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["KL to v0", "KL to the previous version"]
    assert ax.get_ylabel() and ax.get_xlabel() == "version"


def test_win_rate_against_v0_with_wilson_bars_a_chance_line_and_n(data):
    ax = charts.plot_win_rate(data).axes[0]
    assert ticks(ax) == ["v1", "v2", "v3"]
    (bars,) = errorbars(ax)
    assert points(bars) == 3
    assert any(list(line.get_ydata()) == [0.5, 0.5] and line.get_linestyle() == "--" for line in ax.lines)
    assert {t.get_text() for t in ax.texts} == {"n=28", "n=31"}
    assert len(ax.collections[-1].get_offsets()) == 3  # one dot per version, in its colour


def test_frontier_points_and_the_fitted_curve(data):
    ax = charts.plot_frontier(data).axes[0]
    assert len(ax.collections[-1].get_offsets()) == 4
    (fit,) = [line for line in ax.lines if line.get_label().startswith("fit")]
    assert len(fit.get_xdata()) == len(data["frontier"]["fit"]["curve"])
    assert "v3 (n=31)" in [t.get_text() for t in ax.texts]
    data["frontier"]["fit"] = None
    ax = charts.plot_frontier(data).axes[0]
    assert not [line for line in ax.lines if line.get_label().startswith("fit")]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["coin flip"]


def test_leaderboard_plot_two_ratings_per_version(data):
    ax = charts.plot_leaderboard(data).axes[0]
    assert ticks(ax) == VERSIONS
    assert [points(c) for c in errorbars(ax)] == [4, 4]


def test_length_mean_and_median_with_the_limit_share_on_a_second_axis(data):
    fig = charts.plot_length(data)
    ax, share = fig.axes
    assert ticks(ax) == VERSIONS
    assert [list(line.get_ydata()) for line in ax.lines] == [[154, 171, 196, 212], [140, 160, 188, 205]]
    assert [p.get_height() for p in share.patches] == [0.02, 0.04, 0.08, 0.12]


def test_diversity_three_series(data):
    ax = charts.plot_diversity(data).axes[0]
    assert ticks(ax) == VERSIONS
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["distinct-1", "distinct-2", "self-similarity"]
    assert [len(line.get_xdata()) for line in ax.lines if not line.get_label().startswith("_")] == [4, 4]
    (similarity,) = errorbars(ax)
    assert points(similarity) == 4


def test_semantic_drift_bars_in_the_versions_colours(data):
    ax = charts.plot_semantic(data).axes[0]
    assert ticks(ax) == VERSIONS
    assert len(ax.patches) == 4
    colors = charts.version_colors(data)
    assert [p.get_facecolor() for p in ax.patches] == [pytest.approx(_rgba(colors[v])) for v in VERSIONS]


def _rgba(hex_color: str):
    from matplotlib.colors import to_rgba
    return to_rgba(hex_color)


def test_map_one_cloud_per_version_and_the_path_of_the_centres(data):
    ax = charts.plot_map(data).axes[0]
    assert [len(c.get_offsets()) for c in ax.collections] == [PROBES] * 4
    (centres,) = ax.lines
    assert len(centres.get_xdata()) == 4
    assert [t.get_text() for t in ax.get_legend().get_texts()][:4] == VERSIONS


def test_prompt_drift_one_point_per_window(data):
    ax = charts.plot_prompt_drift(data).axes[0]
    assert len(ax.lines[0].get_xdata()) == 4
    assert ticks(ax) == ["05-01 00:00", "05-02 00:00", "05-03 00:00", "05-04 00:00"]


def test_staleness_share_older_and_the_off_policy_gap(data):
    share_ax, gap_ax = charts.plot_staleness(data).axes
    assert ticks(share_ax) == ["v1", "v2", "v3"] == ticks(gap_ax)
    assert [p.get_height() for p in share_ax.patches] == [0.0, 0.25, 0.4]
    assert "lag 0.6\nn=56" in [t.get_text() for t in share_ax.texts]
    assert len(gap_ax.lines[0].get_xdata()) == 3
    for row in data["staleness"]:
        row["off_policy_gap"] = None
    assert len(charts.plot_staleness(data).axes) == 1


def test_held_out_split_by_source_with_n_on_each_bar_and_chance_shown(data):
    ax = charts.plot_held_out(data).axes[0]
    assert ticks(ax) == ["v1", "v2", "v3"]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [len(b) for b in bars] == [3, 2, 1]  # sampled by v0 (evaluated in v1..v3), by v1 (v2, v3), by v2 (v3)
    labels = [t.get_text() for t in ax.texts]
    assert len(labels) == 6 and labels.count("n=12") == 2
    assert any(list(line.get_ydata()) == [0.5, 0.5] for line in ax.lines)
    # the 0.39 with n=12 reads as chance (faded, hatched), the 0.7 with n=30 does not
    by_source = dict(zip(["v0", "v1", "v2"], bars))
    assert all(p.get_hatch() == "///" for p in by_source["v1"])
    assert by_source["v2"][0].get_hatch() is None


def test_curves_one_line_per_metric(data):
    fig = charts.plot_curves(data)
    assert len(fig.axes) == 5
    assert sum(len(ax.lines) for ax in fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes] == ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen",
                                                   "logps/rejected"]
    assert all(len(ax.lines[0].get_xdata()) == 20 for ax in fig.axes)


def test_overopt_gold_and_proxy_per_method_as_changes_from_the_start(data):
    fig = charts.plot_overopt(data)
    best, ppo = fig.axes[:2]
    assert best.get_title() == "best-of-n" and ppo.get_title() == "PPO rounds"
    gold, proxy = errorbars(best)[:2]
    xs, ys = gold.lines[0].get_data()
    # x is sqrt(KL); y the change from n = 1: gold 0.5 -> 0.6, 0.62, 0.55; proxy 0 -> 0.4, 0.8, 1.1.
    assert list(xs) == pytest.approx([0.0, 0.193 ** 0.5, 0.636 ** 0.5, 1.204 ** 0.5])
    assert list(ys) == pytest.approx([0.0, 0.1, 0.12, 0.05])
    assert list(proxy.lines[0].get_data()[1]) == pytest.approx([0.0, 0.4, 0.8, 1.1])
    assert [points(c) for c in errorbars(ppo)] == [3, 3]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["concise: gold", "concise: proxy"]


def test_the_same_version_has_the_same_colour_in_every_plot(data):
    colors = charts.version_colors(data)
    assert len(set(colors.values())) == 4
    frontier = charts.plot_frontier(data).axes[0].collections[-1].get_facecolors()
    semantic = [p.get_facecolor() for p in charts.plot_semantic(data).axes[0].patches]
    assert [tuple(c) for c in frontier] == [pytest.approx(tuple(c)) for c in semantic]


@pytest.mark.parametrize("state", list(DEGENERATE))
def test_degenerate_data_gives_no_figure_and_a_sentence(state):
    data = DEGENERATE[state]()
    drawn = charts.figures(data)
    empty = [key for key, fig in drawn.items() if fig is None]
    if state == "no versions":
        assert empty == list(charts.CHARTS)
    else:
        # nothing moved or nothing of v1 measured: every drift plot is empty (the leaderboard of one version too)
        assert set(empty) >= set(charts.CHARTS) - {"staleness"}
    for key in empty:
        sentence = charts.empty_sentence(data, key)
        assert sentence and sentence.endswith(".")
    if state == "evaluation failed":
        assert "failed (CUDA out of memory" in charts.empty_sentence(data, "kl")
    if state == "evaluation running":
        assert "still running" in charts.empty_sentence(data, "kl")
    if state == "only v0":
        assert "Only v0" in charts.empty_sentence(data, "length")


def test_a_note_in_the_data_is_the_empty_sentence():
    data = only_v0()
    data["notes"]["kl"] = "KL is measured against v0, and v0 is all there is."
    assert charts.empty_sentence(data, "kl") == data["notes"]["kl"]


def test_a_running_evaluation_is_marked_on_the_version_axis(data):
    data["evaluations"][3] = {**{k: None for k in data["evaluations"][3]}, "version": "v3", "status": "running",
                              "held_out": []}
    ax = charts.plot_kl(data).axes[0]
    assert ticks(ax) == VERSIONS
    assert points(errorbars(ax)[0]) == 3
    assert "running" in [t.get_text() for t in ax.texts]


def test_versions_table(data):
    frame = tables_mod.versions_table(data)
    assert list(frame["version"]) == VERSIONS
    assert list(frame.columns) == tables_mod.VERSION_COLUMNS
    v3 = frame.iloc[3]
    assert v3["live"] and v3["parent"] == "v2" and v3["evaluation"] == "done (64 probes)"
    assert v3["KL to v0 (95% CI)"] == "4.20 (3.20–5.20)"
    assert v3["win rate vs v0 (95% CI, n)"] == "58% (41%–74%, n=31)"
    assert v3["mean length (tokens)"] == 212 and v3["distinct-2"] == 0.41
    assert v3["held-out accuracy (n)"] == "0.67 (n=122)"
    assert frame.iloc[0]["win rate vs v0 (95% CI, n)"] == ""
    failed = tables_mod.versions_table(with_v1_evaluation("failed"))
    assert failed.iloc[1]["evaluation"].startswith("failed: CUDA out of memory")
    assert tables_mod.versions_table(with_v1_evaluation("running")).iloc[1]["evaluation"] == "running"
    assert tables_mod.versions_table(no_versions()).empty


def test_leaderboard_and_annotator_tables(data):
    board = tables_mod.leaderboard_table(data)
    assert list(board.columns) == tables_mod.LEADERBOARD_COLUMNS
    assert board.iloc[3].tolist() == ["v3", 1075, "1060–1091", 43, 1036, "1020–1053"]
    people = tables_mod.annotator_table(data)
    assert list(people["user"]) == ["alice", "sim-concise-1"]
    assert people.iloc[0]["agreement"] == 0.78 and people.iloc[0]["n (agreement)"] == 23
    assert tables_mod.annotator_table(no_versions()).empty and list(tables_mod.annotator_table(no_versions()).columns)


def test_compare_table_puts_the_versions_side_by_side():
    rows = [{"prompt": "Hi", "a": "Hello!", "b": "Hello there, how can I help?"}]
    assert tables_mod.compare_table(rows, "v0", "v3").to_dict("records") == [
        {"prompt": "Hi", "v0": "Hello!", "v3": "Hello there, how can I help?"}]
    assert list(tables_mod.compare_table([], "v2", "v2").columns) == ["prompt", "A: v2", "B: v2"]


def test_headline_in_words(data):
    said = " ".join(tables_mod.headline_sentences(data))
    assert said.startswith("v3 is live. It has moved 4.2 nats from v0 (KL, 95% CI 3.2–5.2, 64 probes).")
    assert "People preferred it to v0 in 58% of 31 blind arena votes (41%–74%): not yet distinguishable from a " \
           "coin flip." in said
    assert "replies are 38% longer than v0's (212 vs 154 tokens, 12% cut off by the length limit)" in said
    assert "less varied (distinct-2 0.41 vs 0.58)" in said
    assert "The last round (v3) trained on 56 pairs, 40% of them sampled by older versions (mean lag 0.6" in said
    assert "The longer reply won 63% of 120 votes" in said and "Voters favour length" in said
    assert "8% of 100 pairs had two identical replies" in said


def test_headline_for_each_degenerate_state():
    assert "No policy versions yet" in tables_mod.headline_markdown(no_versions())
    assert "no version has been trained yet" in tables_mod.headline_markdown(only_v0())
    assert "Its evaluation failed (CUDA out of memory" in tables_mod.headline_markdown(with_v1_evaluation("failed"))
    assert "Its evaluation is still running." in tables_mod.headline_markdown(with_v1_evaluation("running"))


def test_headline_markdown_shows_html_and_markdown_as_typed():
    data = with_v1_evaluation("failed")
    data["evaluations"][1]["error"] = "<img src=x onerror=alert(1)> **bold** [link](http://x)"
    text = tables_mod.headline_markdown(data)
    assert "<img" not in text and "&lt;img" in text
    assert "\\*\\*bold\\*\\*" in text and "\\[link\\]" in text


def test_plots_do_not_change_the_data(data):
    before = copy.deepcopy(data)
    charts.figures(data)
    tables_mod.tables(data)
    tables_mod.headline_sentences(data)
    assert data == before


def test_tables_are_frames_for_every_state():
    for make in [realistic_data, *DEGENERATE.values()]:
        for frame in tables_mod.tables(make()).values():
            assert isinstance(frame, pd.DataFrame)
