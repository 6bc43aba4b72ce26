"""The dashboard dict as tables (pandas, for the tab, the CSV downloads and the report) and as a headline
in words: how far the policy moved, whether people prefer it, what it cost, how stale the data is."""

from __future__ import annotations

import html
import math
import re
from typing import Callable

import pandas as pd

from playground.web.charts import (
    _arena_rows, _cut, _evaluations, _stat, _succeeded, base_version, in_version_order, staleness_label,
    version_names,
)

TABLE_TITLES = {"versions": "Versions", "leaderboard": "Leaderboard", "annotators": "Annotators"}


# -- the tables -----------------------------------------------------------------------------------

def _round(x):
    if x is None or isinstance(x, bool):
        return x
    if not math.isfinite(x):
        return None
    return round(x) if abs(x) >= 100 else round(x, 1) if abs(x) >= 10 else round(x, 2)


def _interval(lo, hi, fmt: str = ".2f") -> str:
    if lo is None or hi is None:
        return ""
    return f"{lo:{fmt}}–{hi:{fmt}}"


LEADERBOARD_COLUMNS = ["version", "rating", "95% interval", "n", "rating (length-controlled)",
                       "95% interval (length-controlled)"]
ANNOTATOR_COLUMNS = ["user", "simulated", "votes", "left share", "left share 95% CI", "tie share", "both-bad share",
                     "agreement", "n (agreement)", "majority agreement", "n (majority)", "training pairs",
                     "in training", "live version on their held-out votes (n)",
                     "trial: held-out accuracy with → without them"]
VERSION_COLUMNS = ["version", "live", "parent", "made by", "evaluation", "KL to v0 (95% CI)", "win rate vs v0 (95% CI, n)",
                   "mean length (tokens)", "distinct-2", "semantic drift", "held-out accuracy (n)"]


def leaderboard_table(data: dict) -> pd.DataFrame:
    rows = (data.get("arena") or {}).get("leaderboard") or []
    scale = max([abs(r.get("rating") or 0) for r in rows] or [0])
    fmt = ".0f" if scale >= 100 else ".2f"  # Elo-like ratings near 1000, or Bradley-Terry logits near 0
    return pd.DataFrame([[r["version"], _round(r.get("rating")), _interval(r.get("lo"), r.get("hi"), fmt),
                          r.get("n"), _round(r.get("rating_lc")), _interval(r.get("lo_lc"), r.get("hi_lc"), fmt)]
                         for r in rows], columns=LEADERBOARD_COLUMNS)


def _held_out_cell(held: dict | None) -> str:
    if not held or not held.get("n"):
        return ""
    return f"{held['rate']:.2f} ({_interval(held.get('lo'), held.get('hi'))}, n={held['n']})"


def trial_cell(trial: dict | None) -> str:
    """'0.61 → 0.72 (+0.11, n=40)' from an annotator's newest trial round; its status while it has no result."""
    if not trial:
        return ""
    if trial.get("status") != "succeeded" or not trial.get("with") or not trial.get("without"):
        return f"round {trial['run_id']}: {trial.get('status')}" + (f" ({_cut(trial['reason'], 60)})"
                                                                     if trial.get("reason") else "")
    with_, without = trial["with"], trial["without"]
    if with_.get("accuracy") is None or without.get("accuracy") is None:
        return f"round {trial['run_id']}: no held-out pairs"
    return (f"{with_['accuracy']:.2f} → {without['accuracy']:.2f} ({trial['difference']:+.2f}, "
            f"n={with_.get('n')}; round {trial['run_id']})")


def annotator_table(data: dict) -> pd.DataFrame:
    rows = data.get("annotators") or []
    return pd.DataFrame([[r.get("user"), bool(r.get("simulated")), r.get("votes"), _round(r.get("left_share")),
                          _interval(r.get("left_lo"), r.get("left_hi")),
                          _round(r.get("tie_share")), _round(r.get("both_bad_share")), _round(r.get("agreement")),
                          r.get("n_agreement"), _round(r.get("majority_agreement")), r.get("n_majority"),
                          r.get("training_pairs"),
                          "excluded" + (f" by {r['excluded_by']}" if r.get("excluded_by") else "")
                          if r.get("excluded") else "yes",
                          _held_out_cell(r.get("held_out")), trial_cell(r.get("trial"))]
                         for r in rows], columns=ANNOTATOR_COLUMNS)


def evaluation_status(row: dict | None) -> str:
    if not row or row.get("status") in (None, "missing"):
        return "not evaluated"
    if row["status"] == "failed":
        return f"failed: {_cut(row.get('error') or 'no reason given', 80)}"
    if row["status"] == "running":
        return "running"
    return f"done ({row['n_probes']} probes)" if row.get("n_probes") else "done"


def _with_interval(value: dict | None, fmt: str) -> str:
    """'4.20 (3.10–5.30)' from {mean, lo, hi}; '' when there is no value."""
    if not value or value.get("mean") is None:
        return ""
    interval = _interval(value.get("lo"), value.get("hi"), fmt)
    return f"{value['mean']:{fmt}} ({interval})" if interval else f"{value['mean']:{fmt}}"


def pooled_held_out(rows: list[dict]) -> tuple[float, int] | None:
    """All of a version's held-out pairs together: (accuracy, n), whatever version sampled them."""
    rows = [r for r in rows or [] if r.get("n") and r.get("accuracy") is not None]
    n = sum(r["n"] for r in rows)
    return (sum(r["accuracy"] * r["n"] for r in rows) / n, n) if n else None


def versions_table(data: dict) -> pd.DataFrame:
    evaluations = _evaluations(data)
    arena = _arena_rows(data)
    live = data.get("live")
    parents = {v["name"]: v.get("parent") for v in data.get("versions") or []}
    algos = {v["name"]: v.get("algo") for v in data.get("versions") or []}
    out = []
    for name in version_names(data):
        ev = evaluations.get(name) or {}
        done = ev.get("status") == "succeeded"
        kl = _stat(ev.get("kl_v0")) if done else None
        win = arena.get(name)
        length = (ev.get("length") or {}) if done else {}
        held = pooled_held_out(ev.get("held_out")) if done else None
        out.append([
            name, name == live, parents.get(name), algos.get(name) or "", evaluation_status(ev), _with_interval(kl, ".2f"),
            f"{win['rate']:.0%} ({_interval(win.get('lo'), win.get('hi'), '.0%')}, n={win['n']})" if win else "",
            _round(length.get("mean")),
            _round(ev.get("distinct_2")) if done else None,
            _round(ev.get("semantic_drift")) if done else None,
            f"{held[0]:.2f} (n={held[1]})" if held else "",
        ])
    return pd.DataFrame(out, columns=VERSION_COLUMNS)


TABLES: dict[str, Callable[[dict], pd.DataFrame]] = {
    "versions": versions_table, "leaderboard": leaderboard_table, "annotators": annotator_table}


def tables(data: dict) -> dict[str, pd.DataFrame]:
    return {name: table(data) for name, table in TABLES.items()}


def compare_table(rows: list[dict], version_a: str, version_b: str) -> pd.DataFrame:
    """The two versions' replies to the same probe prompts, side by side (rows as `get_compare` gives them)."""
    a, b = (version_a, version_b) if version_a != version_b else (f"A: {version_a}", f"B: {version_b}")
    return pd.DataFrame([[r.get("prompt"), r.get("a"), r.get("b")] for r in rows or []], columns=["prompt", a, b])


# -- the headline in words ------------------------------------------------------------------------

def _verdict(row: dict, base: str) -> str:
    lo, hi = row.get("lo"), row.get("hi")
    if lo is not None and lo > 0.5:
        return "people prefer it."
    if hi is not None and hi < 0.5:
        return f"people prefer {base}."
    return "not yet distinguishable from a coin flip."


def headline_sentences(data: dict) -> list[str]:
    """How far the policy moved, whether people prefer it, what it cost, how stale the data is (plain text)."""
    names = version_names(data)
    if not names:
        return ["No policy versions yet: the dashboard fills in once the model has served its first replies."]
    base = base_version(data)
    live = data.get("live") or names[-1]
    if live == base:
        later = [n for n in names if n != base]
        said = [f"{base} (the base model) is live: " + (
            f"{len(later)} trained version(s) exist ({', '.join(later)}) but none serves." if later
            else "no version has been trained yet.")]
        return said + _data_checks(data)
    said = [f"{live} is live."]
    ev = _evaluations(data).get(live) or {}
    status = ev.get("status")
    kl = _stat(ev.get("kl_v0")) if status == "succeeded" else None
    if kl:
        ci = f", 95% CI {_interval(kl.get('lo'), kl.get('hi'), '.1f')}" if kl.get("lo") is not None else ""
        count = f"{ev['n_probes']} probes" if ev.get("n_probes") else f"{kl.get('n')} samples"
        said.append(f"It has moved {kl['mean']:.1f} nats from {base} (KL{ci}, {count}).")
    elif status == "running":
        said.append("Its evaluation is still running.")
    elif status == "failed":
        said.append(f"Its evaluation failed ({_cut(ev.get('error') or 'no reason given')}).")
    else:
        said.append("It has not been evaluated yet.")
    win = _arena_rows(data).get(live)
    if win:
        said.append(f"People preferred it to {base} in {win['rate']:.0%} of {win['n']} blind arena votes "
                    f"({_interval(win.get('lo'), win.get('hi'), '.0%')}): {_verdict(win, base)}")
    else:
        said.append(f"No blind arena votes compare it with {base} yet.")
    cost = _cost_sentence(data, live, base)
    if cost:
        said.append(cost)
    stale = [r for r in data.get("staleness") or [] if r.get("share_older") is not None]
    if stale:
        last = stale[-1]
        lag = f" (mean lag {last['mean_lag']:.1f} versions)" if last.get("mean_lag") is not None else ""
        said.append(f"The last round ({staleness_label(last)}) trained on {last.get('n', 0)} pairs, "
                    f"{last['share_older']:.0%} of them sampled by older versions{lag}.")
    return said + _data_checks(data)


def _cost_sentence(data: dict, live: str, base: str) -> str:
    done = _succeeded(data)
    now, then = done.get(live), done.get(base)
    if not now or not then:
        return ""
    parts = []
    length, length0 = now.get("length") or {}, then.get("length") or {}
    if length.get("mean") and length0.get("mean"):
        change = length["mean"] / length0["mean"] - 1
        way = "longer" if change > 0.05 else "shorter" if change < -0.05 else "about as long"
        size = f"{abs(change):.0%} " if way != "about as long" else ""
        limit = (f", {length['limit_share']:.0%} cut off by the length limit"
                 if (length.get("limit_share") or 0) >= 0.05 else "")
        parts.append(f"replies are {size}{way} than {base}'s ({length['mean']:.0f} vs {length0['mean']:.0f} "
                     f"tokens{limit})")
    d2, d20 = now.get("distinct_2"), then.get("distinct_2")
    if d2 is not None and d20 is not None:
        way = "less varied" if d2 < d20 - 0.02 else "more varied" if d2 > d20 + 0.02 else "as varied"
        parts.append(f"{way} (distinct-2 {d2:.2f} vs {d20:.2f})")
    return f"Cost: {' and '.join(parts)}." if parts else ""


def _data_checks(data: dict) -> list[str]:
    said = []
    bias = data.get("length_bias") or {}
    if bias.get("n") and bias.get("longer_won") is not None:
        lo, hi = bias.get("lo"), bias.get("hi")
        lean = (" Voters favour length: a policy can win votes by writing more." if lo is not None and lo > 0.5
                else "")
        said.append(f"The longer reply won {bias['longer_won']:.0%} of {bias['n']} votes between replies of "
                    f"different lengths ({_interval(lo, hi, '.0%')}).{lean}")
    same = data.get("identical_pairs") or {}
    if same.get("n") and (same.get("share") or 0) >= 0.05:
        said.append(f"{same['share']:.0%} of {same['n']} pairs had two identical replies: those votes teach "
                    "nothing.")
    return said


def markdown_text(text: str) -> str:
    """Plain text safe in gr.Markdown: HTML shown as typed, markdown's emphasis and links not triggered."""
    return re.sub(r"([\\`*_\[\]#|])", r"\\\1", html.escape(text, quote=False))


def headline_markdown(data: dict) -> str:
    return " ".join(markdown_text(s) for s in headline_sentences(data))
