"""The dashboard dict drawn: one figure per plot, and the sentence that replaces a plot with nothing to draw.

Everything here is a pure function of the dict `playground.dashboard.dashboard_data` returns (its shape is
in that module's docstring), so the Dashboard tab, the CSV/JSON/HTML downloads and
`python -m playground.report` show the same numbers (the tables and headline: `web/tables.py`; the HTML
report: `web/report_html.py`). A plot function returns `None` when there is
nothing to draw, never empty axes; `empty_sentence(data, key)` then says why.

Figures are `matplotlib.figure.Figure` objects made without pyplot: no global figure registry, so
sessions drawing on Gradio's worker threads never share state.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from typing import Callable

import matplotlib
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
import pandas as pd

# Gradio imports pyplot to close the figures it is given; on a desktop that would pick a GUI backend,
# which must not start from a worker thread. Nothing here draws through pyplot.
matplotlib.use("Agg")

SIZE = (5.0, 3.0)  # inches: one plot, small enough for two side by side
WIDE = (7.0, 3.0)  # two panels
LABEL_PT, TICK_PT, NOTE_PT = 9, 8, 7
SERIES = ("#222222", "#d62728", "#7f7f7f")  # series that share a version axis (not versions themselves)
CHANCE = dict(color="#999999", linestyle="--", linewidth=1)  # the 0.5 line: a coin flip
SHOWN_ERROR_CHARS = 160  # a failed evaluation's error, cut to fit a sentence

CAPTIONS: dict[str, str] = {
    "kl": "KL to v0: how far each version's replies moved from the base model's; rising means the policy "
          "drifts further from where it started (dashed: the step from the version before each).",
    "win_rate": "People's blind arena win rate against v0 (ties count half, 95% Wilson bars); rising means people "
                "prefer the newer versions more, and a bar crossing the dashed coin-flip line is not yet chance apart.",
    "frontier": "Win rate against sqrt(KL to v0), the over-optimisation frontier; rising to the right means drift "
                "buys preference, a curve falling again means more drift now costs preference.",
    "leaderboard": "Bradley-Terry rating of every version from all arena votes (95% bootstrap bars); rising means "
                   "people prefer the version, and a length-controlled rating (square) falling below it means "
                   "length, not content, wins its votes.",
    "length": "Reply length in tokens per version; rising means the policy writes longer replies (bars: the share "
              "cut off by the length limit, rising means it runs out of room).",
    "diversity": "Distinct n-grams and self-similarity of each version's replies; falling distinct-n and rising "
                 "self-similarity mean the replies collapse toward one another (mode collapse).",
    "semantic": "Semantic drift: 1 minus the cosine between each version's mean reply embedding and v0's; rising "
                "means the replies say different things, not just in different words.",
    "map": "Every version's probe replies on one 2-D map of their embeddings; a cloud moving away from v0's "
           "(the line joins the centres in version order) means rising drift in what the replies say.",
    "prompt_drift": "Drift of people's prompts per time window against the first window; rising means people now "
                    "ask different things, so the votes come from a different mix of prompts.",
    "staleness": "Per training round: the share of its pairs sampled by older versions (label: mean lag in "
                 "versions) and the off-policy gap; rising means the round learns from replies its policy no "
                 "longer writes.",
    "held_out": "Held-out implicit-reward accuracy of each version, split by the version that sampled the pairs; "
                "rising means it ranks unseen votes better, but a bar whose interval crosses the dashed line is "
                "not different from chance, whatever its height.",
    "curves": "The latest round's training curves, one panel per metric; a falling loss with falling chosen "
              "log-probs is likelihood displacement, a rising grad norm is the round going unstable.",
    "overopt": "Over-optimising a reward model (bench.overopt): the reward model's score (dashed) and the true "
               "preference's (solid) against sqrt(KL to v0), each as its change from the start (95% bars); a "
               "solid line that peaks and falls while the dashed one keeps rising is the proxy being gamed.",
}


# -- the versions and their colours ---------------------------------------------------------------

def version_names(data: dict) -> list[str]:
    """Every version the dict names, oldest first: `versions`, then any only an evaluation names."""
    names = [v["name"] for v in data.get("versions") or []]
    for row in data.get("evaluations") or []:
        if row.get("version") not in names:
            names.append(row["version"])
    return names


def in_version_order(data: dict, names) -> list[str]:
    """`names` oldest first: in the order of `versions`, any the dict does not list after them."""
    known = version_names(data)
    names = list(dict.fromkeys(names))
    return [n for n in known if n in names] + [n for n in names if n not in known]


def base_version(data: dict) -> str:
    versions = data.get("versions") or []
    return versions[0]["name"] if versions else "v0"


def version_colors(data: dict) -> dict[str, str]:
    """One colour per version, the same in every plot: viridis from dark (oldest) to light (newest)."""
    names = version_names(data)
    cmap = matplotlib.colormaps["viridis"]
    top = len(names) - 1
    return {name: to_hex(cmap(0.88 * i / top if top else 0.0)) for i, name in enumerate(names)}


def _evaluations(data: dict) -> dict[str, dict]:
    return {row["version"]: row for row in data.get("evaluations") or []}


def _succeeded(data: dict) -> dict[str, dict]:
    return {name: row for name, row in _evaluations(data).items() if row.get("status") == "succeeded"}


def _values(data: dict, get: Callable[[dict], object]) -> dict[str, object]:
    """{version: value} over the succeeded evaluations whose value is there, in version order."""
    done = _succeeded(data)
    out = {}
    for name in version_names(data):
        row = done.get(name)
        value = get(row) if row is not None else None
        if value is not None:
            out[name] = value
    return out


def _stat(value: dict | None) -> dict | None:
    """A {mean, lo, hi, n} (or {mean, median, ...}) that has a mean; None for a missing or empty one."""
    return value if value and value.get("mean") is not None else None


def _moved(data: dict, values: dict) -> bool:
    """Whether a per-version plot has something to compare: a value for a version other than the base."""
    return any(name != base_version(data) for name in values)


# -- drawing helpers ------------------------------------------------------------------------------

def _figure(size=SIZE, ncols: int = 1):
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.tick_params(labelsize=TICK_PT)
        ax.grid(axis="y", alpha=0.3)
    return fig, list(axes)


def _version_axis(ax, names: list[str]) -> None:
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("version", fontsize=LABEL_PT)


def _status_marks(ax, data: dict, names: list[str], shown: dict, missing: str = "no data") -> None:
    """Under each version without a value, why: 'running', 'failed', 'not evaluated', or `missing`."""
    rows = _evaluations(data)
    for i, name in enumerate(names):
        if name in shown:
            continue
        status = (rows.get(name) or {}).get("status")
        text = {"running": "running", "failed": "failed", "missing": "not evaluated", None: "not evaluated"}.get(
            status, missing)
        ax.text(i, 0.04, text, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                fontsize=NOTE_PT, color="#777777", rotation=90)


def _yerr(rows: list[dict], mean_key: str = "mean") -> list[list[float]]:
    """Asymmetric error bars from each row's lo/hi (zero where the interval is missing)."""
    below, above = [], []
    for row in rows:
        m, lo, hi = row.get(mean_key), row.get("lo"), row.get("hi")
        below.append(max(m - lo, 0.0) if lo is not None else 0.0)
        above.append(max(hi - m, 0.0) if hi is not None else 0.0)
    return [below, above]


def _nan(x) -> float:
    """A gap in a line where a number is missing."""
    return math.nan if x is None else x


def _ylabel(ax, text: str) -> None:
    ax.set_ylabel(text, fontsize=LABEL_PT)


def _legend(ax, **kwargs) -> None:
    ax.legend(fontsize=TICK_PT, frameon=False, **kwargs)


# -- the plots ------------------------------------------------------------------------------------

def plot_kl(data: dict) -> Figure | None:
    names = version_names(data)
    kl_v0 = _values(data, lambda r: _stat(r.get("kl_v0")))
    if not _moved(data, kl_v0):
        return None
    kl_prev = _values(data, lambda r: _stat(r.get("kl_prev")))
    fig, (ax,) = _figure()
    for values, label, color, fmt in ((kl_v0, f"KL to {base_version(data)}", SERIES[0], "-o"),
                                      (kl_prev, "KL to the previous version", SERIES[1], "--s")):
        if not values:
            continue
        rows = list(values.values())
        ax.errorbar([names.index(n) for n in values], [r["mean"] for r in rows], yerr=_yerr(rows), fmt=fmt,
                    color=color, capsize=3, markersize=4, label=label)
    _version_axis(ax, names)
    _status_marks(ax, data, names, kl_v0)
    ax.set_ylim(bottom=0)
    _ylabel(ax, "KL (nats)")
    _legend(ax, loc="upper left")
    return fig


def _arena_rows(data: dict) -> dict[str, dict]:
    rows = (data.get("arena") or {}).get("win_vs_v0") or []
    return {r["version"]: r for r in rows if r.get("n") and r.get("rate") is not None}


def plot_win_rate(data: dict) -> Figure | None:
    base = base_version(data)
    rows = _arena_rows(data)
    rows.pop(base, None)
    if not rows:
        return None
    names = [n for n in in_version_order(data, [*version_names(data), *rows]) if n != base]
    colors = version_colors(data)
    fig, (ax,) = _figure()
    shown = [rows[n] for n in names if n in rows]
    xs = [names.index(r["version"]) for r in shown]
    ax.errorbar(xs, [r["rate"] for r in shown], yerr=_yerr(shown, "rate"), fmt="-", color=SERIES[2],
                capsize=3, label=f"win rate vs {base}", zorder=1)
    ax.scatter(xs, [r["rate"] for r in shown], c=[colors.get(r["version"], SERIES[0]) for r in shown], s=30,
               zorder=2)
    for x, r in zip(xs, shown):
        ax.annotate(f"n={r['n']}", (x, r["hi"] if r.get("hi") is not None else r["rate"]),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=NOTE_PT)
    ax.axhline(0.5, **CHANCE, label="coin flip")
    _version_axis(ax, names)
    for i, name in enumerate(names):
        if name not in rows:
            ax.text(i, 0.04, "no votes", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=NOTE_PT, color="#777777", rotation=90)
    ax.set_ylim(0, 1.05)
    _ylabel(ax, f"win rate against {base}")
    _legend(ax, loc="lower left")
    return fig


def plot_frontier(data: dict) -> Figure | None:
    frontier = data.get("frontier") or {}
    points = [p for p in frontier.get("points") or [] if p.get("sqrt_kl") is not None and p.get("win_rate") is not None]
    base = base_version(data)
    if not any(p["version"] != base for p in points):
        return None
    colors = version_colors(data)
    fig, (ax,) = _figure()
    xs, ys = [p["sqrt_kl"] for p in points], [p["win_rate"] for p in points]
    ax.errorbar(xs, ys, yerr=_yerr(points, "win_rate"), fmt="none", ecolor=SERIES[2], capsize=3, zorder=1)
    ax.scatter(xs, ys, c=[colors.get(p["version"], SERIES[0]) for p in points], s=36, zorder=2)
    for p in points:
        label = f"{p['version']} (n={p['n']})" if p.get("n") else p["version"]
        ax.annotate(label, (p["sqrt_kl"], p["win_rate"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=NOTE_PT)
    fit = frontier.get("fit")
    right = max(xs)
    if fit and fit.get("curve"):
        cx, cy = zip(*fit["curve"])
        ax.plot(cx, cy, "-", color=SERIES[1], linewidth=1.2,
                label=f"fit (alpha={fit['alpha']:.2f}, beta={fit['beta']:.2f})")
        right = max(right, *cx)
    ax.axhline(0.5, **CHANCE, label="coin flip")
    ax.set_xlim(0, right * 1.2 + 0.1)  # room for the last point's label
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"sqrt(KL to {base})  (sqrt nats)", fontsize=LABEL_PT)
    _ylabel(ax, f"win rate against {base}")
    _legend(ax, loc="lower right")
    return fig


def plot_leaderboard(data: dict) -> Figure | None:
    rows = {r["version"]: r for r in (data.get("arena") or {}).get("leaderboard") or []
            if r.get("rating") is not None}
    if len(rows) < 2:
        return None
    names = in_version_order(data, rows)
    fig, (ax,) = _figure()
    shown = [rows[n] for n in names]
    xs = list(range(len(names)))
    ax.errorbar([x - 0.1 for x in xs], [r["rating"] for r in shown], yerr=_yerr(shown, "rating"), fmt="o",
                color=SERIES[0], capsize=3, markersize=4, label="rating")
    lc = [(x, r) for x, r in zip(xs, shown) if r.get("rating_lc") is not None]
    if lc:
        lc_rows = [{"m": r["rating_lc"], "lo": r.get("lo_lc"), "hi": r.get("hi_lc")} for _, r in lc]
        ax.errorbar([x + 0.1 for x, _ in lc], [r["m"] for r in lc_rows], yerr=_yerr(lc_rows, "m"), fmt="s",
                    color=SERIES[1], capsize=3, markersize=4, label="length-controlled")
    for x, r in zip(xs, shown):
        ax.annotate(f"n={r.get('n', 0)}", (x, r["hi"] if r.get("hi") is not None else r["rating"]),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=NOTE_PT)
    _version_axis(ax, names)
    ax.margins(y=0.15)  # room for the n above the top interval
    _ylabel(ax, "rating (Bradley-Terry)")
    _legend(ax, loc="upper left")
    return fig


def plot_length(data: dict) -> Figure | None:
    names = version_names(data)
    lengths = _values(data, lambda r: _stat(r.get("length")))
    if not _moved(data, lengths):
        return None
    fig, (ax,) = _figure()
    xs = [names.index(n) for n in lengths]
    rows = list(lengths.values())
    share = ax.twinx()
    share.tick_params(labelsize=TICK_PT)
    share.bar(xs, [r.get("limit_share") or 0.0 for r in rows], width=0.5, color=SERIES[1], alpha=0.2,
              label="share hitting the limit")
    share.set_ylim(0, 1)
    share.set_ylabel("share hitting the limit", fontsize=LABEL_PT, color=SERIES[1])
    ax.set_zorder(share.get_zorder() + 1)  # the lines over the bars
    ax.patch.set_visible(False)
    ax.plot(xs, [_nan(r.get("mean")) for r in rows], "-o", color=SERIES[0], markersize=4, label="mean")
    ax.plot(xs, [_nan(r.get("median")) for r in rows], "--s", color=SERIES[2], markersize=4, label="median")
    _version_axis(ax, names)
    _status_marks(ax, data, names, lengths)
    ax.set_ylim(bottom=0)
    _ylabel(ax, "reply length (tokens)")
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = share.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, fontsize=TICK_PT, frameon=False, loc="lower left")
    return fig


def plot_diversity(data: dict) -> Figure | None:
    names = version_names(data)
    d1 = _values(data, lambda r: r.get("distinct_1"))
    d2 = _values(data, lambda r: r.get("distinct_2"))
    sim = _values(data, lambda r: _stat(r.get("self_similarity")))
    if not (_moved(data, d1) or _moved(data, d2) or _moved(data, sim)):
        return None
    fig, (ax,) = _figure()
    for values, label, color, fmt in ((d1, "distinct-1", SERIES[0], "-o"), (d2, "distinct-2", SERIES[2], "-s")):
        if values:
            ax.plot([names.index(n) for n in values], list(values.values()), fmt, color=color, markersize=4,
                    label=label)
    if sim:
        rows = list(sim.values())
        ax.errorbar([names.index(n) for n in sim], [r["mean"] for r in rows], yerr=_yerr(rows), fmt="--^",
                    color=SERIES[1], capsize=3, markersize=4, label="self-similarity")
    _version_axis(ax, names)
    _status_marks(ax, data, names, {**d1, **d2, **sim})
    ax.set_ylim(0, 1.05)
    _ylabel(ax, "score (0 to 1)")
    _legend(ax, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3)
    return fig


def plot_semantic(data: dict) -> Figure | None:
    names = version_names(data)
    drift = _values(data, lambda r: r.get("semantic_drift"))
    if not _moved(data, drift):
        return None
    colors = version_colors(data)
    fig, (ax,) = _figure()
    ax.bar([names.index(n) for n in drift], list(drift.values()), width=0.6,
           color=[colors[n] for n in drift])
    _version_axis(ax, names)
    _status_marks(ax, data, names, drift)
    ax.set_ylim(bottom=0)
    _ylabel(ax, f"semantic drift from {base_version(data)}")
    return fig


def plot_map(data: dict) -> Figure | None:
    points = [p for p in data.get("map") or [] if p.get("x") is not None and p.get("y") is not None]
    by_version: dict[str, list[dict]] = {}
    for p in points:
        by_version.setdefault(p["version"], []).append(p)
    if len(by_version) < 2:
        return None
    order = in_version_order(data, by_version)
    colors = version_colors(data)
    fig, (ax,) = _figure()
    ax.grid(False)
    centres = []
    for name in order:
        group = by_version[name]
        xs, ys = [p["x"] for p in group], [p["y"] for p in group]
        ax.scatter(xs, ys, s=14, alpha=0.7, color=colors.get(name, SERIES[0]), label=name, linewidths=0)
        centres.append((sum(xs) / len(xs), sum(ys) / len(ys)))
    cx, cy = zip(*centres)
    ax.plot(cx, cy, "-X", color=SERIES[0], markersize=7, linewidth=1, alpha=0.8, label="centres")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("map axis 1", fontsize=LABEL_PT)
    _ylabel(ax, "map axis 2")
    ax.legend(fontsize=TICK_PT, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5), title="version",
              title_fontsize=TICK_PT)
    return fig


def _window_label(row: dict) -> str:
    start = row.get("start") or ""
    return start[5:16].replace("T", " ") if len(start) >= 16 else str(row.get("window"))


def plot_prompt_drift(data: dict) -> Figure | None:
    rows = [r for r in data.get("prompt_drift") or [] if r.get("drift") is not None]
    if len(rows) < 2:
        return None
    fig, (ax,) = _figure()
    xs = list(range(len(rows)))
    ax.plot(xs, [r["drift"] for r in rows], "-o", color=SERIES[0], markersize=4)
    for x, r in zip(xs, rows):
        ax.annotate(f"n={r.get('n', 0)}", (x, r["drift"]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=NOTE_PT)
    ax.set_xticks(xs, [_window_label(r) for r in rows], rotation=30, ha="right")
    ax.margins(y=0.15)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("time window (start, UTC)", fontsize=LABEL_PT)
    _ylabel(ax, "drift from the first window")
    return fig


def staleness_label(row: dict) -> str:
    return row.get("version") or f"round {row.get('run_id')}"


def plot_staleness(data: dict) -> Figure | None:
    rows = [r for r in data.get("staleness") or [] if r.get("share_older") is not None]
    if not rows:
        return None
    gaps = [(i, r["off_policy_gap"]) for i, r in enumerate(rows) if r.get("off_policy_gap") is not None]
    fig, axes = _figure(WIDE if gaps else SIZE, 2 if gaps else 1)
    colors = version_colors(data)
    labels = [staleness_label(r) for r in rows]
    xs = list(range(len(rows)))
    ax = axes[0]
    ax.bar(xs, [r["share_older"] for r in rows], width=0.6,
           color=[colors.get(r.get("version"), SERIES[2]) for r in rows])
    for x, r in zip(xs, rows):
        lag = f"lag {r['mean_lag']:.1f}" if r.get("mean_lag") is not None else ""
        ax.annotate(f"{lag}\nn={r.get('n', 0)}".strip(), (x, r["share_older"]), textcoords="offset points",
                    xytext=(0, 2), ha="center", fontsize=NOTE_PT)
    ax.set_xticks(xs, labels)
    ax.set_ylim(0, 1.15)
    ax.set_xlabel("round (the version it trained)", fontsize=LABEL_PT)
    _ylabel(ax, "share of pairs from older versions")
    if gaps:
        gap_ax = axes[1]
        gap_ax.plot([i for i, _ in gaps], [g for _, g in gaps], "-o", color=SERIES[1], markersize=4)
        gap_ax.set_xticks(xs, labels)
        gap_ax.set_xlim(-0.5, len(rows) - 0.5)
        gap_ax.axhline(0, color="#999999", linewidth=0.8)
        gap_ax.set_xlabel("round (the version it trained)", fontsize=LABEL_PT)
        _ylabel(gap_ax, "off-policy gap")
    return fig


def _includes_chance(row: dict) -> bool:
    lo, hi = row.get("lo"), row.get("hi")
    return lo is None or hi is None or lo <= 0.5 <= hi


def plot_held_out(data: dict) -> Figure | None:
    evaluated = _values(data, lambda r: [h for h in r.get("held_out") or []
                                         if h.get("n") and h.get("accuracy") is not None] or None)
    if not evaluated:
        return None
    names = list(evaluated)
    sources = in_version_order(data, [h["source_version"] for rows in evaluated.values() for h in rows])
    colors = version_colors(data)
    width = 0.8 / len(sources)
    fig, (ax,) = _figure()
    handles = []
    for k, source in enumerate(sources):
        cells = [(names.index(v), h) for v, rows in evaluated.items() for h in rows if h["source_version"] == source]
        xs = [x - 0.4 + width * (k + 0.5) for x, _ in cells]
        rows = [h for _, h in cells]
        color = colors.get(source, SERIES[2])
        bars = ax.bar(xs, [h["accuracy"] for h in rows], width=width * 0.92, yerr=_yerr(rows, "accuracy"),
                      capsize=2, color=color, label=f"pairs sampled by {source}",
                      error_kw=dict(ecolor="#444444", linewidth=1))
        handles.append(Patch(facecolor=color, label=f"pairs sampled by {source}"))
        for bar, x, h in zip(bars, xs, rows):
            if _includes_chance(h):  # faded and hatched: this bar's height says nothing yet
                bar.set_alpha(0.45)
                bar.set_hatch("///")
            top = h["hi"] if h.get("hi") is not None else h["accuracy"]
            ax.annotate(f"n={h['n']}", (x, top), textcoords="offset points", xytext=(0, 2), ha="center",
                        fontsize=NOTE_PT)
    ax.axhline(0.5, **CHANCE)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("evaluated version", fontsize=LABEL_PT)
    ax.set_ylim(0, 1.15)
    _ylabel(ax, "held-out accuracy")
    handles.append(Patch(facecolor="white", edgecolor="#444444", hatch="///", label="interval includes chance"))
    ax.legend(handles=handles, fontsize=NOTE_PT, frameon=False, loc="upper left", ncols=2)
    return fig


def plot_curves(data: dict) -> Figure | None:
    curves = data.get("curves") or {}
    series: dict[str, list[tuple[float, float]]] = {}
    for point in curves.get("series") or []:
        if point.get("value") is not None and math.isfinite(point["value"]):
            series.setdefault(point["name"], []).append((point["step"], point["value"]))
    if not series:
        return None
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(2.4 * ncols + 0.4, 1.7 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True).ravel()
    for ax, (name, points) in zip(axes, series.items()):
        points.sort()
        ax.plot([s for s, _ in points], [v for _, v in points], "-", color=SERIES[0], linewidth=1.2)
        ax.set_title(name, fontsize=LABEL_PT)
        ax.tick_params(labelsize=NOTE_PT)
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        fig.delaxes(ax)
    for i, ax in enumerate(axes[:len(series)]):
        if i + ncols >= len(series):  # the lowest panel of its column
            ax.set_xlabel("step", fontsize=NOTE_PT)
            ax.xaxis.set_tick_params(labelbottom=True)
    if curves.get("run_id") is not None:
        fig.suptitle(f"round {curves['run_id']}", fontsize=LABEL_PT)
    return fig


OVEROPT_METHODS = (("best_of_n", "best-of-n"), ("ppo", "PPO rounds"))


def plot_overopt(data: dict) -> Figure | None:
    runs = [r for r in data.get("overopt") or [] if r.get("points")]
    if not runs:
        return None
    fig, axes = _figure(WIDE, ncols=2)
    colors = matplotlib.colormaps["tab10"]
    drawn = False
    for ax, (method, title) in zip(axes, OVEROPT_METHODS):
        for k, run in enumerate(runs):
            points = sorted((p for p in run["points"] if p["method"] == method and p["kl"] is not None),
                            key=lambda p: p["kl"])
            if not points:
                continue
            x = [math.sqrt(max(0.0, p["kl"])) for p in points]
            color = to_hex(colors(k % 10))
            gold = str(run["gold"]).split(":")[0]  # "concise:target_words=25" -> "concise"
            for key, style, label in (("gold_score", "-o", f"{gold}: gold"), ("proxy", "--s", f"{gold}: proxy")):
                base = points[0][key]
                y = [_nan(p[key]) - _nan(base) for p in points]
                lo, hi = ("gold_low", "gold_high") if key == "gold_score" else ("proxy_low", "proxy_high")
                err = [[max(0.0, _nan(p[key]) - _nan(p[lo])) for p in points],
                       [max(0.0, _nan(p[hi]) - _nan(p[key])) for p in points]]
                ax.errorbar(x, y, yerr=err, fmt=style, color=color, markersize=3, linewidth=1.2, capsize=2,
                            label=label)
                drawn = True
        ax.axhline(0, **CHANCE)
        ax.set_title(title, fontsize=LABEL_PT)
        ax.set_xlabel("sqrt(KL to v0)", fontsize=NOTE_PT)
        ax.tick_params(labelsize=TICK_PT)
        ax.grid(alpha=0.3)
    if not drawn:
        return None
    _ylabel(axes[0], "change from start")
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    # Below the panels: inside, it would sit on the curves.
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=TICK_PT,
               frameon=False)
    return fig


CHARTS: dict[str, Callable[[dict], Figure | None]] = {
    "kl": plot_kl,
    "win_rate": plot_win_rate,
    "frontier": plot_frontier,
    "leaderboard": plot_leaderboard,
    "length": plot_length,
    "diversity": plot_diversity,
    "semantic": plot_semantic,
    "map": plot_map,
    "prompt_drift": plot_prompt_drift,
    "staleness": plot_staleness,
    "held_out": plot_held_out,
    "curves": plot_curves,
    "overopt": plot_overopt,
}
PLOTS = tuple(CHARTS)
TITLES = {"kl": "Distance from v0 (KL)", "win_rate": "Win rate against v0", "frontier": "Over-optimisation frontier",
          "leaderboard": "Leaderboard", "length": "Reply length", "diversity": "Diversity",
          "semantic": "Semantic drift", "map": "Map of probe replies", "prompt_drift": "Drift of people's prompts",
          "staleness": "Staleness of training data", "held_out": "Held-out accuracy",
          "curves": "Training curves (latest round)", "overopt": "Reward over-optimisation (bench.overopt)"}


def figures(data: dict) -> dict[str, Figure | None]:
    """Every plot of the dict, by key."""
    return {key: chart(data) for key, chart in CHARTS.items()}


# -- why a plot is empty --------------------------------------------------------------------------

# The dict's notes that also explain an empty plot, after the plot's own (`dashboard_data` writes one
# note for what several plots share: no evaluation yet, an evaluation that failed, no arena votes).
EVALUATED = ("evaluations", "versions", "kl")
NOTE_FALLBACKS = {"kl": EVALUATED, "length": EVALUATED, "diversity": EVALUATED, "semantic": EVALUATED,
                  "map": EVALUATED, "held_out": EVALUATED, "win_rate": ("arena", "versions"),
                  "leaderboard": ("arena", "versions"), "frontier": ("arena", "versions")}


def empty_sentence(data: dict, key: str) -> str:
    """Why plot `key` has nothing to show: the dict's note on it (or on what it is drawn from), else a
    sentence from the dict's state."""
    notes = data.get("notes") or {}
    for name in (key, *NOTE_FALLBACKS.get(key, ())):
        if notes.get(name):
            return notes[name]
    if key == "overopt":
        return ("No over-optimisation run is stored for this model yet: `python -m bench.overopt --gold concise` "
                "adds one to the app's database.")
    names = version_names(data)
    base = base_version(data)
    if not names:
        return "No policy versions yet: the dashboard fills in once the model has served its first replies."
    if key == "prompt_drift":
        return "Not enough prompts yet: drift needs people's prompts from at least two time windows."
    if key == "curves":
        return "No training round has logged curves yet."
    if key == "map" and not data.get("map"):
        return "No map yet: it is drawn from the embeddings of the evaluated versions' probe replies."
    if names == [base]:
        return f"Only {base} (the base model) exists: nothing has moved yet. This fills in once a round trains v1."
    if key == "staleness":
        return "No training round has recorded where its pairs came from yet."
    if key in ("win_rate", "leaderboard", "frontier"):
        pending = _pending_sentence(data)
        return ("No blind arena votes between versions yet: the arena compares each version with "
                f"{base} by people's votes." + (f" {pending}" if pending and key == "frontier" else ""))
    return _pending_sentence(data) or f"No evaluated version besides {base} yet."


def _pending_sentence(data: dict) -> str:
    rows = _evaluations(data)
    base = base_version(data)
    parts = []
    for name in version_names(data):
        if name == base:
            continue
        row = rows.get(name) or {}
        status = row.get("status")
        if status == "running":
            parts.append(f"The evaluation of {name} is still running; this fills in when it finishes.")
        elif status == "failed":
            parts.append(f"The evaluation of {name} failed ({_cut(row.get('error') or 'no reason given')}).")
        elif status in (None, "missing"):
            parts.append(f"{name} has not been evaluated yet.")
    return " ".join(parts)


def _cut(text: str, limit: int = SHOWN_ERROR_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
