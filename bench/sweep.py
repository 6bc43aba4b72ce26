"""The label-efficiency sweep: which settings make a label teach most, on several tastes.

    python -m bench.sweep --golds concise keyword:word=here format --out bench/sweep_results.jsonl
    python -m bench.sweep --report bench/sweep_results.jsonl        # the table and the chosen setting, again

Each setting is bench.loop's on-policy arm with one change from the base (a one-at-a-time screen: the
full grid of 12 knobs would be thousands of runs, each minutes long), run on every gold. The measure
is `labels_to_significance`: the labels after which vN's paired gold-mean difference to v0 has its 95%
interval above zero (bench/loop.py), with the KL to v0 there. A setting qualifies when that KL is at
most --max-kl (5 nats) on every gold; among those the winner reaches significance on every gold in the
fewest labels (the worst gold counts: a default must hold for every taste), ties going to the lower sum,
then to the setting whose worst gold came nearest significance (`final_z`, about a z-score of its final
gold-mean difference: the only order left when no setting reached significance everywhere).
A gold where a setting never reaches significance counts as the run's labels plus one round (worse than
any that did). The report also ranks by the crossings that hold to a run's last round (`ranking_held`,
`winner_held`): a first crossing that falls back inside noise a round later counts as never there.

A setting runs on the current winner's weakest gold first, and once its golds so far already rank it
below the winner (more golds can only rank it lower: `cannot_win`) the rest of it is skipped; --no-prune
runs everything. Every finished run appends one JSON line to --out (the setting, the gold, bench.loop's summary and its
round lines); a rerun skips what --out already has, so a sweep stopped half-way goes on where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# One change from the base per setting: the knobs that decide how much a label teaches (the list);
# the last ones combine two knobs that each did something on their own (a second stage of the screen).
# The values bracket the app's defaults (trainers/dpo.py DPOConfig, trainers/defaults.py).
SETTINGS: dict[str, list[str]] = {
    "base": [],
    "lr_1e-4": ["--config", '{"learning_rate": 1e-4}'],
    "lr_5e-4": ["--config", '{"learning_rate": 5e-4}'],
    "beta_0.03": ["--config", '{"beta": 0.03}'],
    "beta_0.3": ["--config", '{"beta": 0.3}'],
    "epochs_2": ["--config", '{"epochs": 2}'],
    "ipo": ["--config", '{"loss": "ipo"}'],
    "label_smoothing_0.25": ["--config", '{"label_smoothing": 0.25}'],  # the annotator's flip rate
    "replay_0": ["--replay-ratio", "0"],
    "replay_3": ["--replay-ratio", "3"],
    "labels_per_round_32": ["--labels-per-round", "32", "--rounds-factor", "2"],
    "temperature_0.7": ["--temperature", "0.7"],
    "pairs_least_separated": ["--pair-rule", "least_separated"],
    "pairs_most_different": ["--pair-rule", "most_different"],
    # 8 candidates instead of 4: on a taste most pairs tie on (keyword, format: 44-54 of 64 labels were
    # ties in the base runs), more candidates give the rule more chances of a pair that differs.
    "pairs_most_different_8": ["--pair-rule", "most_different", "--candidates", "8"],
    # Show the pair a tie model fit on the annotator's own votes so far rates least likely to tie: fit on
    # 48 votes, it cut the ties on 48 other prompts of 8 v0 samples from 31 to 21 (keyword) and from 36
    # to 28 (format) (python -m bench.pair_ties, docs/BENCHMARKS.md).
    "pairs_least_tie": ["--pair-rule", "least_tie"],
    "pairs_least_tie_8": ["--pair-rule", "least_tie", "--candidates", "8"],
    # A second stage, two knobs at once: least_tie doubled the judged pairs on format and keyword but the
    # policy hardly moved on them (KL 0.3 after 128 labels); 2 epochs moved it most on format.
    "pairs_least_tie_8_epochs_2": ["--pair-rule", "least_tie", "--candidates", "8", "--config", '{"epochs": 2}'],
    # The app's default since 2026-12-02 (label smoothing 0.25) with the rule that doubled the judged pairs:
    # the smoothing lets each of those few non-tied pairs count without chasing the flipped ones.
    "pairs_least_tie_8_ls_0.25": ["--pair-rule", "least_tie", "--candidates", "8",
                                  "--config", '{"label_smoothing": 0.25}'],
    # Temperature 0.7 came nearest significance of all 18 settings on format (+0.040, final_z 1.67; the
    # next best +0.018); here on the app's default label smoothing. It samples the pairs and the
    # evaluation alike, nearer the chat's own 0.8 (playground/serving/generation.py) than the bench's 1.
    "temperature_0.7_ls_0.25": ["--temperature", "0.7", "--config", '{"label_smoothing": 0.25}'],
    # The chat's own temperature (0.8, playground/serving/generation.py SamplingSettings) on its own label
    # smoothing: nearer what the app samples and trains on than the bench's temperature 1 (the chat's top-p
    # of 0.95 is not applied: bench.loop samples at top-p 1).
    "temperature_0.8_ls_0.25": ["--temperature", "0.8", "--config", '{"label_smoothing": 0.25}'],
    # The other thing a person in the chat can give: a better reply of their own (the chat's edit). Every
    # pair setting above trains on two whole samples that differ everywhere, and a taste most pairs tie on
    # (keyword, format) gives 10-20 judged pairs a round; an edit is the better reply with the taste worked
    # in, so (edit, better reply) differ only where the taste is. Each edit costs a label (bench/loop.py
    # --edit-rate); 0.1 is the autopilot's rate (playground/sim/simulate.py), 0.25 one turn in four. On the
    # app's default label smoothing, applied to the edits' pairs too (as every round did before
    # trainers/dpo.py's smooth_edits and edit_sft_weight, which these settings pin so that their kept rows
    # keep their meaning).
    "edits_0.1_ls_0.25": ["--edit-rate", "0.1",
                          "--config", '{"label_smoothing": 0.25, "smooth_edits": true, "edit_sft_weight": 0.0}'],
    "edits_0.25_ls_0.25": ["--edit-rate", "0.25",
                           "--config", '{"label_smoothing": 0.25, "smooth_edits": true, "edit_sft_weight": 0.0}'],
    # The same, with the edits' pairs trusted (the app's default since): smoothing stands for misclicks, and
    # a typed reply is no click. It won the edit settings (concise at 64 labels, format at 128).
    "edits_0.25_trusted": ["--edit-rate", "0.25",
                           "--config", '{"label_smoothing": 0.25, "smooth_edits": false, "edit_sft_weight": 0.0}'],
    # The same at the autopilot's edit rate: one turn in ten.
    "edits_0.1_trusted": ["--edit-rate", "0.1",
                          "--config", '{"label_smoothing": 0.25, "smooth_edits": false, "edit_sft_weight": 0.0}'],
    # Trusted edits also learned as demonstrations: their text's mean NLL per token, at weight 1 (RPO's
    # alpha), next to their pairs' DPO loss (trainers/dpo.py edit_sft_weight). Run before the trusted-only
    # setting above, when the smoothed edits had not moved format or keyword; trusted alone then did more on
    # both, with less drift.
    "edits_0.25_sft_1": ["--edit-rate", "0.25",
                         "--config", '{"label_smoothing": 0.25, "smooth_edits": false, "edit_sft_weight": 1.0}'],
    "edits_0.1_sft_1": ["--edit-rate", "0.1",
                        "--config", '{"label_smoothing": 0.25, "smooth_edits": false, "edit_sft_weight": 1.0}'],
}
# keyword's own default word ("banana") is in 2 of the bundled model's 256 held-out v0 replies, and every
# one of 128 training pairs tied on it, so no round ever trained (measured). "here" is in 61 of the 256
# (bench/sweep_results.v0-cache), so about a third of pairs differ on it.
DEFAULT_GOLDS = ("concise", "keyword:word=here", "format")
# The trainer settings the screen started from, the app's defaults when it began: every setting is one
# change from these, whatever the app's defaults become (a winner adopted later must not change what
# "lr_1e-4" meant), so the rows already in bench/sweep_results.jsonl stay comparable with runs to come.
# label_smoothing 0 became explicit when the app's default became 0.25 (trainers/defaults.py).
SCREEN_BASE = {"epochs": 1, "label_smoothing": 0.0}
MAX_KL = 5.0  # nats: a taste learned by drifting far from the base model is not the win we want
DEFAULT_ROUNDS = 2  # 2 x 64 labels: the goal is significance within 128 labels
DEFAULT_LABELS_PER_ROUND = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--golds", nargs="+", default=list(DEFAULT_GOLDS), help="gold specs, as bench.loop --gold takes")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), metavar="SETTING",
                   help=f"which settings to run (default: all: {', '.join(SETTINGS)})")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    p.add_argument("--labels-per-round", type=int, default=DEFAULT_LABELS_PER_ROUND)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-kl", type=float, default=MAX_KL)
    p.add_argument("--out", default=str(ROOT / "bench" / "sweep_results.jsonl"),
                   help="results, one JSON line per finished run; runs already there are skipped")
    p.add_argument("--workdir", default=None, help="where each run keeps its store and adapters (default: temp)")
    p.add_argument("--report", metavar="RESULTS", default=None, help="only print the table of a results file")
    p.add_argument("--no-prune", dest="prune", action="store_false",
                   help="run every setting on every gold, even one that already ranks below the winner on the "
                        "golds it has run (by default the rest of such a setting is skipped: it cannot win)")
    p.add_argument("loop_args", nargs=argparse.REMAINDER,
                   help="after --: more bench.loop flags for every run (e.g. -- --model PATH --eval-prompts 32)")
    args = p.parse_args(argv)
    if args.loop_args[:1] == ["--"]:
        args.loop_args = args.loop_args[1:]
    if args.rounds < 1 or args.labels_per_round < 2:
        p.error("--rounds >= 1 and --labels-per-round >= 2 are needed")
    if any(a == "--config" or a.startswith("--config=") for a in args.loop_args):
        # bench.loop keeps only the last --config: one after -- would silently replace every setting's own
        # change (and the screen's base), so each run would test that config, not its setting.
        p.error("--config after -- would replace every setting's trainer settings; add a setting to SETTINGS "
                "in bench/sweep.py instead")
    return args


def run_flags(setting: str, rounds: int, labels_per_round: int) -> list[str]:
    """bench.loop's flags for one setting: its change from SCREEN_BASE, at the same labels in all (fewer per
    round, more rounds)."""
    flags = list(SETTINGS[setting])
    if "--config" in flags:
        at = flags.index("--config") + 1
        flags[at] = json.dumps({**SCREEN_BASE, **json.loads(flags[at])})
    else:
        flags = ["--config", json.dumps(SCREEN_BASE), *flags]
    factor = 1
    if "--rounds-factor" in flags:
        at = flags.index("--rounds-factor")
        factor = int(flags[at + 1])
        del flags[at:at + 2]
    if "--labels-per-round" not in flags:
        flags += ["--labels-per-round", str(labels_per_round)]
    return flags + ["--rounds", str(rounds * factor)]


def done_runs(path: Path) -> set[tuple[str, str, int]]:
    return {(r["setting"], r["gold"], r["seed"]) for r in results_so_far(path)}


def results_so_far(path: Path) -> list[dict]:
    """The finished runs in --out; none before the first has finished."""
    return read_results(path) if path.exists() else []


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: {path} is not a results file (bench.sweep --out writes one)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise SystemExit(f"error: {path} line {number} is not JSON (a run cut off while writing?): "
                                 "remove that line and run again") from None
    return rows


def run_one(setting: str, gold: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One bench.loop run; its summary and round lines."""
    # v0's held-out replies are the same for every setting that samples alike: one folder next to --out
    # keeps them for every run (bench.loop --v0-cache keys them by model, prompts, seeds and sampling).
    v0_cache = Path(args.out).with_suffix(".v0-cache")
    command = [sys.executable, "-m", "bench.loop", "--arm", "onpolicy", "--gold", gold, "--seed", str(args.seed),
               "--workdir", str(workdir), "--v0-cache", str(v0_cache),
               *run_flags(setting, args.rounds, args.labels_per_round), *args.loop_args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines or not lines[-1].get("summary"):
        return {"setting": setting, "gold": gold, "seed": args.seed, "failed": out.stderr[-1500:],
                "command": command[1:]}
    return {"setting": setting, "gold": gold, "seed": args.seed, "summary": lines[-1], "rounds": lines[:-1],
            "command": command[1:]}


def held(row: dict) -> dict | None:
    """The run's labels to held significance (a crossing every later round agrees with), from its round
    lines, so rows kept before the summary had the key are read the same way."""
    from playground.metrics import labels_to_held_significance

    if row.get("rounds"):
        return labels_to_held_significance(row["rounds"])
    return row["summary"].get("labels_to_held_significance", row["summary"]["labels_to_significance"])


def score(row: dict, reached: dict | None) -> tuple[float, float | None]:
    """(labels to significance, or the run's labels plus one round when never; KL to v0 there or at the end),
    for `reached`: the run's first crossing (the issue's measure) or its held one."""
    summary = row["summary"]
    if reached is None:
        per_round = summary["labels"] / max(summary["rounds"], 1)
        return summary["labels"] + per_round, summary["final"]["kl_to_v0"]
    return reached["labels"], reached["kl_to_v0"]


def table(rows: list[dict], max_kl: float = MAX_KL) -> dict:
    """Per setting: labels to significance and KL on each gold, whether it qualifies, and the winner."""
    settings: dict[str, dict] = {}
    golds = sorted({r["gold"] for r in rows})
    for row in rows:
        entry = settings.setdefault(row["setting"], {"golds": {}})
        if "failed" in row:
            entry["golds"][row["gold"]] = {"failed": True}
            continue
        first, kept = row["summary"]["labels_to_significance"], held(row)
        labels, kl = score(row, first)
        held_labels, held_kl = score(row, kept)
        entry["golds"][row["gold"]] = {"labels_to_significance": first,
                                       "score": labels, "kl_to_v0": kl,
                                       "labels_to_held_significance": kept,
                                       "held_score": held_labels, "held_kl_to_v0": held_kl,
                                       "final_gold_mean_diff": row["summary"]["final"]["gold_mean_diff"],
                                       "final_gold_mean_diff_ci": row["summary"]["final"]["gold_mean_diff_ci"],
                                       "final_z": evidence(row["summary"]["final"])}
    for entry in settings.values():
        results = [entry["golds"].get(g) for g in golds]
        complete = all(r is not None and not r.get("failed") for r in results)
        entry["complete"] = complete
        entry["worst"] = max(r["score"] for r in results) if complete else None
        entry["total"] = sum(r["score"] for r in results) if complete else None
        entry["qualifies"] = complete and within_kl(results, max_kl)
        entry["min_z"] = min(r["final_z"] for r in results) if complete else None
    finished = {name: list(e["golds"].values()) for name, e in settings.items() if e["complete"]}
    ranked = order(finished, max_kl)
    winner = ranked[0] if ranked else None
    # The same order by the crossings that hold: a setting ranked by one lucky round that fell back
    # inside noise moves down here.
    ranked_held = order({name: [{**r, "score": r["held_score"], "kl_to_v0": r["held_kl_to_v0"]} for r in results]
                         for name, results in finished.items()}, max_kl)
    for entry in settings.values():
        # A setting part-way through its golds that already ranks below the winner can only fall
        # further with more golds (see cannot_win): the sweep skips the rest of it.
        entry["cannot_win"] = not entry["complete"] and winner is not None and cannot_win(
            entry["golds"].values(), settings[winner]["golds"].values(), max_kl)
    return {"golds": golds, "max_kl": max_kl, "settings": settings, "ranking": ranked, "winner": winner,
            "ranking_held": ranked_held, "winner_held": ranked_held[0] if ranked_held else None,
            "winner_reached_significance_on_every_gold": bool(winner) and all(
                settings[winner]["golds"][g]["labels_to_significance"] is not None for g in golds)}


def order(complete: dict[str, list[dict]], max_kl: float) -> list[str]:
    """The complete settings within the KL limit on every gold (those that qualify), best first."""
    qualified = [name for name, results in complete.items() if within_kl(results, max_kl)]
    return sorted(qualified, key=lambda name: rank_key(complete[name]) + (name,))


def within_kl(results, max_kl: float) -> bool:
    return all(r["kl_to_v0"] is not None and r["kl_to_v0"] <= max_kl for r in results)


def rank_key(results) -> tuple[float, float, float]:
    """The order settings rank in, lowest first: fewest labels on the worst gold, then in all; then, where
    that ties (no setting reaching significance everywhere ties at "never"), the one whose worst gold
    came closest to it (highest final_z)."""
    results = list(results)
    return (max(r["score"] for r in results), sum(r["score"] for r in results), -min(r["final_z"] for r in results))


def cannot_win(partial, leader, max_kl: float = MAX_KL) -> bool:
    """Whether a setting with results on only some golds can no longer rank above `leader` (a complete
    setting's results). More golds can only raise the worst labels and the total and lower the worst
    final_z, so each part of the partial rank_key bounds the complete one from below, and a partial key
    already above the leader's stays above it. A failed run or a KL over the limit disqualifies at once."""
    partial = list(partial)
    if any(r.get("failed") or r["kl_to_v0"] is None or r["kl_to_v0"] > max_kl for r in partial):
        return True
    return bool(partial) and rank_key(partial) > rank_key(leader)


def gold_order(golds: list[str], rows: list[dict], max_kl: float = MAX_KL) -> list[str]:
    """The golds in the order to run a setting on: the current winner's weakest first (lowest final_z), so
    a setting that cannot win shows it on its first run."""
    current = table(rows, max_kl) if rows else None
    if not current or current["winner"] is None:
        return list(golds)
    leader = current["settings"][current["winner"]]["golds"]
    return sorted(golds, key=lambda g: (leader[g]["final_z"] if g in leader else float("inf"), golds.index(g)))


def evidence(final: dict) -> float:
    """How far the final gold-mean difference is from zero in units of its interval's half-width over 1.96:
    about a z-score, above 1.96 where the interval lies above zero. It ranks settings none of which
    reached significance by how near each came."""
    low, high = final["gold_mean_diff_ci"]
    half = (high - low) / 2
    return round(final["gold_mean_diff"] / half * 1.96, 3) if half > 0 else 0.0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        print(json.dumps(table(read_results(Path(args.report)), args.max_kl), indent=1))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_runs(out)
    base = Path(args.workdir or tempfile.mkdtemp(prefix="sweep-"))
    for setting in args.settings:
        for gold in gold_order(args.golds, results_so_far(out), args.max_kl):
            if (setting, gold, args.seed) in done:
                continue
            if args.prune and table(results_so_far(out), args.max_kl)["settings"].get(setting, {}).get("cannot_win"):
                print(json.dumps({"setting": setting, "gold": gold, "skipped": "cannot win: ranks below the "
                                  "winner on the golds it has run"}), flush=True)
                continue
            workdir = base / f"{setting}-{gold.replace(':', '_').replace('=', '_')}-s{args.seed}"
            row = run_one(setting, gold, args, workdir)
            with out.open("a") as f:  # one whole line per finished run
                f.write(json.dumps(row) + "\n")
            summary = row.get("summary") or {}
            print(json.dumps({"setting": setting, "gold": gold, "failed": "failed" in row,
                              "labels_to_significance": summary.get("labels_to_significance")}), flush=True)
    print(json.dumps(table(read_results(out), args.max_kl)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
