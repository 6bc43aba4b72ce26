"""What the dashboard shows, as plain data: `dashboard_data(store, model_id) -> dict`.

The Dashboard tab, its data endpoint (`/dashboard`), the CSV and JSON exports and `python -m
playground.report` all read this one dict, so the page, the export and the shared report agree. Every
number comes with its count, and every interval is a 95% interval. A plot with nothing to show has a
sentence in `notes` saying why (no versions yet, one version only, an evaluation that failed...).

The dict (JSON-serialisable; lists are ordered by version, oldest first):

    model_id: str, generated_at: str (ISO time), live: str (the live version)
    versions: [{name, parent, created_at, live: bool, algo ('base'|'dpo'|'ppo')}]
    evaluations: [{version, status ('running'|'succeeded'|'failed'|'missing'), error, attempt,
                   n_probes, n_samples, finished_at,
                   kl_v0: {mean, lo, hi, n}, kl_prev: {mean, lo, hi, n} | None,
                   sqrt_kl_v0: float,
                   length: {mean, median, limit_share, stop_share, n},
                   distinct_1, distinct_2: float, self_similarity: {mean, lo, hi, n} | None,
                   semantic_drift: float | None (1 - cosine of mean embeddings, against v0),
                   held_out: [{source_version, accuracy, lo, hi, n}]}]   (one row per sampling version)
    map: [{version, probe_idx, x, y}]        the 2-D map of probe replies (one shared projection)
    prompt_drift: [{window, start, end, n, drift}]   user prompts per time window against the first
    length_bias: {longer_won, lo, hi, n}     votes between replies of different lengths won by the longer
    identical_pairs: {share, n_identical, n}  pairs whose two replies were the same text
    staleness: [{run_id, version, parent, n, share_older, mean_lag, off_policy_gap}]
    arena: {win_vs_v0: [{version, wins, losses, ties, n, rate, lo, hi}],
            leaderboard: [{version, rating, lo, hi, n, rating_lc, lo_lc, hi_lc}]}
    frontier: {points: [{version, sqrt_kl, win_rate, lo, hi, n}], fit: {alpha, beta, curve: [[x, y]...]} | None}
    curves: {run_id, series: [{step, name, value}]}
    annotators: [{user, simulated, votes, left_share, left_lo, left_hi, n_left (A among the A/B choices),
                  tie_share, both_bad_share, agreement, agreement_lo, agreement_hi, n_agreement,
                  majority_agreement, majority_lo, majority_hi, n_majority, training_pairs,
                  excluded: bool, excluded_by, excluded_reason,
                  held_out: {version, rate, lo, hi, n} | None (the live version on their held-out votes),
                  trial: {run_id, status, reason, with, without: {accuracy, lo, hi, n, pairs},
                          difference, held_out_n, their_pairs} | None}]
    overopt: [{bench_id, gold, reward_model, created_at, points: [{method, x, kl, proxy, proxy_low,
               proxy_high, gold_score, gold_low, gold_high, n_prompts}]}]   bench.overopt runs, newest last
    notes: {plot_key: sentence}              why a plot is empty or what a number means
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from playground import metrics
from playground.serving.policy import BASE_VERSION, version_order
from store import Store
from trainers.trial import TRIAL_TRIGGER_PREFIX

log = logging.getLogger(__name__)

# Probe replies per version drawn on the 2-D map: the first sample of each probe (more would hide the
# shape of each version's cloud under the others').
MAP_SAMPLES_PER_PROBE = 1
# Time windows of user prompts compared against the first, and the fewest prompts a window needs.
PROMPT_WINDOWS = 6
MIN_PROMPTS_PER_WINDOW = 5
# Bootstrap resamples of the arena ratings: FastChat uses 100-1000; 200 keeps a refresh under a second
# at a few thousand votes.
ARENA_BOOTSTRAP = 200
# Fewest points the over-optimisation curve is fitted through.
FRONTIER_MIN_POINTS = 4


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _embedding(blob) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)


def dashboard_data(store: Store, model_id: str, embed: Callable[[list[str]], np.ndarray] | None = None,
                   prompt_cache: dict | None = None) -> dict:
    """The whole dashboard as one dict (the module docstring has its shape). `embed` turns texts into
    sentence embeddings (the prompt-drift plot needs it; without it that plot says so); `prompt_cache`
    (turn id -> embedding) spares re-embedding prompts seen at an earlier refresh."""
    notes: dict[str, str] = {}
    versions = _versions(store, model_id)
    names = [v["name"] for v in versions]
    evaluations, samples = _evaluations(store, model_id, names, notes)
    votes = store.votes(model_id)
    arena = _arena(votes, names, notes)
    live = next((v["name"] for v in versions if v["live"]), BASE_VERSION)
    data = {
        "model_id": model_id,
        "generated_at": _now(),
        "live": live,
        "versions": versions,
        "evaluations": evaluations,
        "map": _map(samples, notes),
        "prompt_drift": _prompt_drift(store, model_id, embed, prompt_cache, notes),
        "length_bias": _length_bias(votes, notes),
        "identical_pairs": _identical(store, model_id),
        "staleness": _staleness(store, model_id, notes),
        "arena": arena,
        "frontier": _frontier(evaluations, arena, notes),
        "curves": _curves(store, notes),
        "annotators": _annotators(store, model_id, votes, live, notes),
        "overopt": _overopt(store, model_id, notes),
        "notes": notes,
    }
    if len(names) <= 1:
        notes.setdefault("versions", "Only v0 (the base model) exists yet: the plots fill in once a round has "
                                     "trained a version and it has gone live.")
    return data


def _versions(store: Store, model_id: str) -> list[dict]:
    live = store.live_version(model_id) or BASE_VERSION
    rows = sorted(store.policy_versions(model_id), key=lambda v: version_order(v["name"]))
    return [{"name": v["name"], "parent": v["parent"], "created_at": v["created_at"], "live": v["name"] == live,
             "algo": v.get("algo") or ("base" if v["name"] == BASE_VERSION else "dpo")} for v in rows]


# Over-optimisation runs drawn: the newest few (each is one gold function's best-of-n and PPO curves).
OVEROPT_RUNS_SHOWN = 4


def _overopt(store: Store, model_id: str, notes: dict) -> list[dict]:
    """The stored `bench.overopt` points of this model, one entry per run, newest last."""
    runs: dict[str, dict] = {}
    for p in store.overopt_points(model_id):
        run = runs.setdefault(p["bench_id"], {"bench_id": p["bench_id"], "gold": p["gold"],
                                              "reward_model": p["reward_model"], "created_at": p["created_at"],
                                              "points": []})
        run["points"].append({k: p[k] for k in ("method", "x", "kl", "kl_low", "kl_high", "proxy", "proxy_low",
                                                "proxy_high", "gold_score", "gold_low", "gold_high", "n_prompts")})
    if not runs:
        notes.setdefault("overopt", "No over-optimisation run is stored for this model yet: `python -m bench.overopt "
                                    "--gold concise` adds one to this database (its --db).")
    return list(runs.values())[-OVEROPT_RUNS_SHOWN:]


# -- the background evaluation's numbers ------------------------------------------------------------

def _evaluations(store: Store, model_id: str, names: list[str], notes: dict) -> tuple[list[dict], dict]:
    """Per version the newest evaluation's summary, and {version: its samples} for the succeeded ones."""
    # The store gives each version's newest attempt.
    latest = {row["version"]: row for row in store.evaluations(model_id) if row["version"] in names}
    samples = {v: store.eval_samples(row["id"]) for v, row in latest.items() if row["status"] == "succeeded"}
    base_embeddings = _stack(samples.get(BASE_VERSION, []))
    out = []
    for name in names:
        row = latest.get(name)
        if row is None:
            out.append({"version": name, "status": "missing", "error": None, "attempt": None})
            continue
        entry = {"version": name, "status": row["status"], "error": row["error"], "attempt": row["attempt"],
                 "n_probes": row["n_probes"], "finished_at": row["finished_at"]}
        if row["status"] == "succeeded":
            entry.update(_summary(samples[name], base_embeddings, name))
            entry["held_out"] = _held_out(store.eval_pairs(row["id"]))
        out.append(entry)
    failed = [e["version"] for e in out if e["status"] == "failed"]
    if failed:
        notes["evaluations"] = (f"The evaluation of {', '.join(failed)} failed (it is retried once; the error is "
                                "in the versions table). Its numbers are missing, not zero.")
    if not samples:
        notes.setdefault("kl", "No version has been evaluated yet: the evaluation runs in the background after "
                               "each version goes live (v0 first, as the baseline).")
    elif BASE_VERSION not in samples:
        notes.setdefault("semantic", "v0 has not been evaluated yet, so drift against it cannot be measured.")
    return out, samples


def _stack(rows: list[dict]) -> np.ndarray:
    vectors = [e for e in (_embedding(r.get("embedding")) for r in rows) if e is not None]
    return np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)


def _summary(rows: list[dict], base_embeddings: np.ndarray, name: str) -> dict:
    kl_v0 = [r["kl_v0"] for r in rows if r["kl_v0"] is not None]
    kl_prev = [r["kl_prev"] for r in rows if r["kl_prev"] is not None]
    by_probe = defaultdict(list)
    for r in rows:
        e = _embedding(r.get("embedding"))
        if e is not None:
            by_probe[r["probe_idx"]].append(e)
    similarities = [s for s in (metrics.mean_pairwise_similarity(np.stack(v)) for v in by_probe.values())
                    if s is not None]
    texts = [r["text"] for r in rows]
    embeddings = _stack(rows)
    kl = metrics.mean_interval(kl_v0)
    return {
        "n_samples": len(rows),
        "kl_v0": kl,
        "kl_prev": metrics.mean_interval(kl_prev) if kl_prev else None,
        "sqrt_kl_v0": math.sqrt(max(0.0, kl["mean"])) if kl["mean"] is not None else None,
        "length": metrics.length_summary([r["n_tokens"] for r in rows], [r["finish_reason"] for r in rows]),
        "distinct_1": metrics.distinct_n(texts, 1),
        "distinct_2": metrics.distinct_n(texts, 2),
        "self_similarity": metrics.mean_interval(similarities) if similarities else None,
        "semantic_drift": (metrics.semantic_drift(embeddings, base_embeddings)
                           if len(embeddings) and len(base_embeddings) else None),
    }


def _held_out(pairs: list[dict]) -> list[dict]:
    """Held-out preference accuracy of the version's implicit reward, by the version that sampled the pair."""
    by_source = defaultdict(list)
    for p in pairs:
        by_source[p["source_version"]].append(p["margin"])
    out = []
    for source in sorted(by_source, key=version_order):
        margins = by_source[source]
        right = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)  # a zero margin is a coin flip
        lo, hi = metrics.wilson(right, len(margins))
        out.append({"source_version": source, "accuracy": right / len(margins), "lo": lo, "hi": hi,
                    "n": len(margins)})
    return out


def _map(samples: dict[str, list[dict]], notes: dict) -> list[dict]:
    points = []
    for version in sorted(samples, key=version_order):
        for r in samples[version]:
            if r["sample"] < MAP_SAMPLES_PER_PROBE and r.get("embedding") is not None:
                points.append((version, r["probe_idx"], _embedding(r["embedding"])))
    if len({p[0] for p in points}) < 1 or len(points) < 2:
        notes.setdefault("map", "The map needs evaluated probe replies: none yet.")
        return []
    xy = metrics.project_2d(np.stack([p[2] for p in points]))
    return [{"version": v, "probe_idx": int(i), "x": float(x), "y": float(y)}
            for (v, i, _), (x, y) in zip(points, xy)]


# -- people's prompts and votes ---------------------------------------------------------------------

def _prompt_drift(store: Store, model_id: str, embed, cache: dict | None, notes: dict) -> list[dict]:
    prompts = store.user_prompts(model_id)
    windows = min(PROMPT_WINDOWS, len(prompts) // MIN_PROMPTS_PER_WINDOW)
    if windows < 2:
        notes["prompt_drift"] = (f"{len(prompts)} user prompts so far: the input-side drift needs at least "
                                 f"{2 * MIN_PROMPTS_PER_WINDOW} to compare two time windows.")
        return []
    if embed is None:
        notes["prompt_drift"] = "The sentence-embedding model is not loaded, so prompt drift is not measured."
        return []
    cache = {} if cache is None else cache
    missing = [p for p in prompts if p["id"] not in cache]
    if missing:
        try:
            vectors = embed([p["user_message"] for p in missing])
        except Exception as exc:  # the rest of the dashboard stands without this plot
            log.exception("embedding the prompts failed")
            notes["prompt_drift"] = f"The prompts could not be embedded ({exc}), so prompt drift is not measured."
            return []
        for p, e in zip(missing, vectors):
            cache[p["id"]] = np.asarray(e, dtype=np.float32)
    rows = metrics.windowed_drift(np.stack([cache[p["id"]] for p in prompts]), windows)
    bounds = np.array_split(np.arange(len(prompts)), windows)
    for row, idx in zip(rows, bounds):
        row["start"], row["end"] = prompts[idx[0]]["created_at"], prompts[idx[-1]]["created_at"]
    return rows


def _length_bias(votes: list[dict], notes: dict) -> dict:
    pairs = []
    for v in votes:
        if v["choice"] in ("a", "b") and v["a_tokens"] is not None and v["b_tokens"] is not None:
            chosen, rejected = (v["a_tokens"], v["b_tokens"]) if v["choice"] == "a" else (v["b_tokens"], v["a_tokens"])
            pairs.append((chosen, rejected))
    bias = metrics.length_bias(pairs)
    if bias["n"]:
        notes["length_bias"] = (f"The longer reply won {bias['longer_won']:.0%} of {bias['n']} votes between "
                                f"replies of different lengths (95% CI {bias['lo']:.0%}-{bias['hi']:.0%}); "
                                "above 50% means the votes reward length, which the policy will learn.")
    return bias


def _identical(store: Store, model_id: str) -> dict:
    counts = store.pair_texts_counts(model_id)
    return {"share": counts["n_identical"] / counts["n"] if counts["n"] else None, **counts}


def _staleness(store: Store, model_id: str, notes: dict) -> list[dict]:
    rows = []
    for run in sorted(store.runs(limit=1000), key=lambda r: r["id"]):
        if run["status"] != "succeeded" or run.get("model_id") not in (None, model_id):
            continue
        stale = json.loads(run["metrics_json"] or "{}").get("staleness")
        if stale:
            rows.append({"run_id": run["id"], "version": run["version"], "parent": run["parent_version"],
                         **{k: stale.get(k) for k in ("n", "share_older", "mean_lag", "off_policy_gap", "n_gap")}})
    if not rows:
        notes["staleness"] = "No round has finished yet: staleness is measured per round, on its training pairs."
    return rows


def _battles(votes: list[dict]) -> list[dict]:
    """Arena votes as FastChat's battles: both-bad counts as a tie, as in FastChat's arena."""
    winner = {"a": "model_a", "b": "model_b", "tie": "tie", "both_bad": "tie"}
    return [{"model_a": v["a_version"], "model_b": v["b_version"], "winner": winner[v["choice"]],
             "len_a": v["a_tokens"], "len_b": v["b_tokens"]}
            for v in votes if v["a_version"] != v["b_version"]]


def _arena(votes: list[dict], names: list[str], notes: dict) -> dict:
    battles = _battles(votes)
    win_vs_v0 = []
    for name in names:
        if name == BASE_VERSION:
            continue
        wins = losses = ties = 0
        for b in battles:
            if {b["model_a"], b["model_b"]} != {name, BASE_VERSION}:
                continue
            if b["winner"] == "tie":
                ties += 1
            elif (b["winner"] == "model_a") == (b["model_a"] == name):
                wins += 1
            else:
                losses += 1
        win_vs_v0.append({"version": name, **metrics.win_rate(wins, losses, ties)})
    leaderboard = []
    if battles:
        plain = metrics.bootstrap_bradley_terry(battles, n_boot=ARENA_BOOTSTRAP, anchor=BASE_VERSION)
        controlled = metrics.style_controlled_bradley_terry(battles, n_boot=ARENA_BOOTSTRAP, anchor=BASE_VERSION)
        for name in sorted(plain, key=version_order):
            lc = controlled.get(name, {})
            leaderboard.append({"version": name, **plain[name], "rating_lc": lc.get("rating"),
                                "lo_lc": lc.get("lo"), "hi_lc": lc.get("hi")})
    else:
        notes["arena"] = ("No blind arena votes yet: a share of turns (--arena-rate) pits the live version against "
                          "an earlier one once a version beyond v0 is live.")
    return {"win_vs_v0": win_vs_v0, "leaderboard": leaderboard, "n_battles": len(battles)}


def _frontier(evaluations: list[dict], arena: dict, notes: dict) -> dict:
    kl = {e["version"]: e.get("sqrt_kl_v0") for e in evaluations}
    points = [{"version": w["version"], "sqrt_kl": kl[w["version"]], "win_rate": w["rate"], "lo": w["lo"],
               "hi": w["hi"], "n": w["n"]}
              for w in arena["win_vs_v0"] if w["rate"] is not None and kl.get(w["version"]) is not None]
    fit = None
    if len(points) >= FRONTIER_MIN_POINTS:
        fit = metrics.fit_frontier([p["sqrt_kl"] for p in points], [p["win_rate"] for p in points])
    else:
        notes["frontier"] = (f"{len(points)} version(s) have both a KL and blind votes against v0; the "
                             f"over-optimisation curve is fitted once {FRONTIER_MIN_POINTS} do.")
    return {"points": points, "fit": fit}


def _curves(store: Store, notes: dict) -> dict:
    logged = [r for r in store.runs(limit=50) if r["step"]]
    if not logged:
        notes["curves"] = "No round has logged a training step yet."
        return {"run_id": None, "series": []}
    run_id = logged[0]["id"]
    return {"run_id": run_id, "series": store.metrics_for_run(run_id)}


def _annotators(store: Store, model_id: str, votes: list[dict], live: str, notes: dict) -> list[dict]:
    """Per person: how they vote (counted by the store; what "the same pair" is, is said in
    store/annotators.py), shares with 95% Wilson intervals, their pairs and whether they are excluded
    from training, how the live version's implicit reward scores their held-out votes (from its newest
    evaluation), and their newest trial round (trained with and without them)."""
    evaluation = store.latest_succeeded_evaluation(model_id, live)
    held_out = store.annotator_held_out(evaluation["id"]) if evaluation else {}
    trials = _trials(store, model_id)
    rows = []
    for counts in store.annotator_counts(model_id, votes):
        user, summary = counts["user"], metrics.annotator_summary(counts)
        excluded = counts["excluded"]
        held = held_out.get(user)
        rows.append({
            "user": user, "simulated": bool(counts["simulated"]), "votes": counts["votes"],
            "left_share": summary["left"]["rate"], "left_lo": summary["left"]["lo"], "left_hi": summary["left"]["hi"],
            "n_left": summary["left"]["n"],
            "tie_share": summary["tie"]["rate"], "both_bad_share": summary["both_bad"]["rate"],
            "agreement": summary["agreement"]["rate"], "agreement_lo": summary["agreement"]["lo"],
            "agreement_hi": summary["agreement"]["hi"], "n_agreement": summary["agreement"]["n"],
            "majority_agreement": summary["majority"]["rate"], "majority_lo": summary["majority"]["lo"],
            "majority_hi": summary["majority"]["hi"], "n_majority": summary["majority"]["n"],
            "training_pairs": counts["training_pairs"], "excluded": excluded is not None,
            "excluded_by": excluded["by_user"] if excluded else None,
            "excluded_reason": excluded["reason"] if excluded else None,
            "held_out": None if not held else {"version": live, **metrics.annotator_share(held["right"], held["n"])},
            "trial": trials.get(user),
        })
    if not rows:
        notes["annotators"] = "No votes yet."
    elif not any(r["n_agreement"] for r in rows):
        notes["annotators"] = ("No two annotators have judged the same pair yet (the same two reply texts, or an "
                               "arena pair of the same two versions on the same prompt), so agreement is not measured.")
    return rows


def annotator_rows(store: Store, model_id: str) -> list[dict]:
    """The dashboard's per-annotator table alone (`annotators` of the module docstring): the admin's
    annotator view and its `/annotators` endpoint read it fresh, right after an exclusion."""
    live = store.live_version(model_id) or BASE_VERSION
    return _annotators(store, model_id, store.votes(model_id), live, {})


def _trials(store: Store, model_id: str) -> dict[str, dict]:
    """Each annotator's newest trial round (`trainers/trial.py`): {run_id, status, reason, and when it
    succeeded with: {accuracy, lo, hi, n}, without: the same, difference, held_out_n, their_pairs}."""
    out: dict[str, dict] = {}
    for run in sorted(store.runs(limit=1000), key=lambda r: r["id"]):
        trigger = run.get("trigger") or ""
        if not trigger.startswith(TRIAL_TRIGGER_PREFIX) or run.get("model_id") not in (None, model_id):
            continue
        trial = json.loads(run["metrics_json"] or "{}").get("trial") or {}
        entry = {"run_id": run["id"], "status": run["status"], "reason": run["reason"]}
        for key in ("with", "without"):
            if key in trial:
                entry[key] = {k: trial[key].get(k) for k in ("accuracy", "lo", "hi", "n", "pairs")}
        entry.update({k: trial.get(k) for k in ("difference", "held_out_n", "their_pairs")})
        out[trigger[len(TRIAL_TRIGGER_PREFIX):]] = entry
    return out


# -- the service the page and the report call ---------------------------------------------------------

class Dashboard:
    """The dashboard's data for the app: computed when something it reads changed, else served from the
    last computation (every open tab refreshes, one computation serves them)."""

    def __init__(self, store: Store, model_id: str, embed: Callable[[list[str]], np.ndarray] | None = None,
                 probes: list[list[dict]] | None = None):
        self.store = store
        self.model_id = model_id
        self.embed = embed
        self.probes = probes or []
        self._lock = threading.Lock()
        self._cached: tuple[tuple, dict] | None = None
        self._prompt_cache: dict = {}

    def data(self) -> dict:
        with self._lock:
            marker = self.store.change_marker()
            if self._cached is not None and self._cached[0] == marker:
                return self._cached[1]
            data = dashboard_data(self.store, self.model_id, self.embed, self._prompt_cache)
            self._cached = (marker, data)
            return data

    def compare(self, version_a: str, version_b: str) -> list[dict]:
        """Both versions' first reply to each probe prompt, side by side: [{prompt, a, b}]."""
        return compare(self.store, self.model_id, version_a, version_b, self.probes)


def compare(store: Store, model_id: str, version_a: str, version_b: str, probes: list[list[dict]] | None = None,
            ) -> list[dict]:
    replies = {}
    for version in (version_a, version_b):
        newest = store.latest_succeeded_evaluation(model_id, version)
        if newest is None:
            return []
        replies[version] = {r["probe_idx"]: r["text"] for r in store.eval_samples(newest["id"]) if r["sample"] == 0}
    out = []
    for idx in sorted(set(replies[version_a]) & set(replies[version_b])):
        prompt = probes[idx][-1]["content"] if probes and idx < len(probes) else f"probe {idx + 1}"
        out.append({"prompt": prompt, "a": replies[version_a][idx], "b": replies[version_b][idx]})
    return out
