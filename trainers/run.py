"""One training round from stored feedback to a published adapter version (or reward model).

    python -m trainers.run --algo dpo --db data/playground.db --adapters-dir adapters
    python -m trainers.run --algo reward   # fit a reward model rN to every pair so far: reward_models/rN/
    python -m trainers.run --algo ppo      # PPO against the latest reward model (a new one first when
                                           # enough new pairs arrived), publishing adapters/vN/ as DPO does

The scheduler in the app starts this as a subprocess (so serving never stalls and the served model is
never the one being trained); a person can run it by hand too. It records the round in
`training_runs` (progress, step curves in `metrics`, a skip or failure reason), publishes
`adapters/vN/` atomically, records the version, and prints the round's metrics as JSON on stdout.
Exit status: 0 succeeded or skipped, 1 failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

from store import DEFAULT_DB
from store.pairs import IMPORT_VERSION
from trainers.defaults import (DEFAULT_ADAPTERS_DIR, DEFAULT_REPLAY_RATIO, DEFAULT_REWARD_MODELS_DIR,
                               MANUAL_MIN_NEW_PAIRS)

ALGOS = ("dpo", "reward", "ppo")

log = logging.getLogger("trainers.run")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from playground.serving.models import BUNDLED, DEFAULT_CACHE_DIR, DEVICES

    p = argparse.ArgumentParser(prog="python -m trainers.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="dpo", choices=ALGOS, help="training algorithm (default: %(default)s)")
    p.add_argument("--db", default=DEFAULT_DB, help="the app's SQLite file (default: %(default)s)")
    p.add_argument("--adapters-dir", default=DEFAULT_ADAPTERS_DIR,
                   help="where versions vN/ are published (default: %(default)s)")
    p.add_argument("--model", default=BUNDLED, help="base model, as for app.py (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="training device (default: %(default)s)")
    p.add_argument("--model-cache", default=DEFAULT_CACHE_DIR, help="GGUF conversion cache (default: %(default)s)")
    p.add_argument("--min-new-pairs", type=int, default=MANUAL_MIN_NEW_PAIRS,
                   help="skip the round with fewer new training pairs (default: %(default)s)")
    p.add_argument("--replay-ratio", type=float, default=DEFAULT_REPLAY_RATIO,
                   help="older pairs replayed per new pair (default: %(default)s)")
    p.add_argument("--ref", choices=("base", "previous"), default=None,
                   help="reference policy: the base model (default) or the previous version")
    p.add_argument("--exclude-simulated", action="store_true",
                   help="train only on votes from people, not on the autopilot's simulated annotators")
    p.add_argument("--include-arena", action="store_true",
                   help="train on arena votes (two versions shown blind) too; by default they are left out")
    p.add_argument("--config", default="{}",
                   help="JSON object of the algorithm's settings (DPOConfig, RewardConfig or PPOConfig) overriding"
                        " the defaults")
    p.add_argument("--reward-models-dir", default=DEFAULT_REWARD_MODELS_DIR,
                   help="where reward models rN/ are published (default: %(default)s)")
    p.add_argument("--reward-config", default="{}",
                   help="JSON object of RewardConfig settings for the reward model a PPO round trains first")
    p.add_argument("--reward-model", default=None,
                   help="PPO against this reward model (rN), even one whose held-out accuracy is at chance: the"
                        " admin's explicit choice (default: the latest, a new one first when --min-new-pairs new"
                        " pairs arrived since it)")
    p.add_argument("--trial-without", default=None, metavar="USER",
                   help="a trial, publishing nothing: two DPO rounds from the base model on the same pairs, with and"
                        " without USER's, and the held-out accuracy of each (trainers/trial.py)")
    p.add_argument("--run-id", type=int, default=None, help="a round the scheduler already recorded")
    p.add_argument("--trigger", default="manual", help="what started the round, recorded on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def parse_config(cls, text: str, flag: str = "--config", extra: dict | None = None):
    """A config dataclass from a JSON object of overrides; SystemExit naming what is wrong."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{flag} is not JSON: {exc}")
    if not isinstance(overrides, dict):
        raise SystemExit(f"{flag} must be a JSON object")
    overrides.update(extra or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise SystemExit(f"unknown {cls.__name__} settings {unknown}; known: {sorted(known)}")
    try:
        return cls(**overrides)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"{flag}: {exc}")


def dpo_config(args: argparse.Namespace):
    from trainers.dpo import DPOConfig

    return parse_config(DPOConfig, args.config, extra={"ref": args.ref} if args.ref is not None else None)


def run_round(args: argparse.Namespace) -> tuple[int, dict]:
    """The round `args.algo` names (or a trial without one annotator); (exit status, summary)."""
    if getattr(args, "trial_without", None):
        from trainers.trial import run_trial

        return run_trial(args)
    if args.algo == "reward":
        from trainers.reward_round import run_reward_round

        return run_reward_round(args)
    if args.algo == "ppo":
        from trainers.ppo_round import run_ppo_round

        return run_ppo_round(args)
    return run_dpo_round(args)


def run_dpo_round(args: argparse.Namespace) -> tuple[int, dict]:
    from playground.serving.adapters import AdapterError, check_files, clean_temporary, load_version, publish
    from playground.serving.models import load_model
    from store import Store
    from trainers.data import build_round, count_new_pairs, excluded_users
    from trainers.dpo import TrainingAborted, config_dict, save_adapter, train_dpo

    store = Store(args.db)
    config = dpo_config(args)
    loaded = load_model(args.model, args.device, args.model_cache)
    model_id = loaded.model_id
    store.ensure_base_version(model_id)
    parent = store.live_version(model_id) or "v0"
    run_id = args.run_id or store.create_run(args.algo, config_dict(config), model_id, parent, args.trigger)
    adapters_dir = Path(args.adapters_dir)
    started = time.perf_counter()
    include_simulated = not args.exclude_simulated
    include_arena = args.include_arena

    def finish(status: str, reason: str | None = None, **extra) -> tuple[int, dict]:
        store.finish_run(run_id, status, reason=reason, **extra)
        summary = {"run_id": run_id, "status": status, "reason": reason, "parent": parent,
                   "seconds": round(time.perf_counter() - started, 2), **extra}
        return (1 if status == "failed" else 0), summary

    try:
        for name in clean_temporary(adapters_dir):
            log.info("removed half-written %s left by an earlier round", name)
        # The app's schedule counted by the same definition before it started this round; the excluded
        # annotators are read once, so the count, the data and the manifest name the same ones.
        without = excluded_users(store)
        waiting = count_new_pairs(store, model_id, include_simulated, config.max_length, include_arena=include_arena,
                                  without_users=without)
        if waiting < args.min_new_pairs:
            why = f"{waiting} new training pair(s), fewer than the {args.min_new_pairs} needed"
            too_long = store.count_too_long_pairs(model_id, config.max_length, include_simulated,
                                                  include_arena=include_arena, without_users=without)
            if too_long:
                why += f" (skipped: {{'too_long': {too_long}}}, over max_length={config.max_length} tokens)"
            return finish("skipped", why, n_pairs=0,
                          metrics={"counts": {"new": waiting, "excluded_annotators": list(without)}})
        data = build_round(store, loaded.tokenizer, model_id, config.max_length, args.replay_ratio, config.seed,
                           include_simulated=include_simulated, include_arena=include_arena, without_users=without)
        counts = data.counts()
        if data.new_pairs == 0:
            why = f"none of the {waiting} new pair(s) could be tokenised (skipped: {data.skipped})"
            return finish("skipped", why, n_pairs=len(data.train), metrics={"counts": counts})

        init_adapter = None
        if parent != "v0":
            init_adapter = adapters_dir / parent
            check_files(init_adapter, model_id)

        progress = _progress_bar(args.no_progress)

        def on_step(m: dict) -> None:
            store.update_run_progress(run_id, m["step"], m["total_steps"], m.get("loss"),
                                      {k: v for k, v in m.items() if k not in ("step", "total_steps")})
            progress(m)

        result = train_dpo(loaded.model, data.train, data.held_out, config, init_adapter_dir=init_adapter,
                           on_step=on_step, score_start=gap_pairs(data))
        name = store.next_version_name(model_id)
        metrics = {"held_out_before": result.eval_before, "held_out_after": result.eval_after,
                   "last_step": result.steps[-1] if result.steps else None, "train_seconds": round(result.seconds, 2),
                   "skipped_too_long": result.skipped_too_long,
                   "staleness": round_staleness(data, result.start_logps, parent)}
        manifest = {
            "base_model_id": model_id, "parent": parent, "algo": args.algo, "config": config_dict(config),
            "data": counts, "metrics": metrics, "run_id": run_id,
        }
        folder = publish(adapters_dir, name, lambda tmp: save_adapter(result, tmp), manifest,
                         verify=lambda tmp: load_version(loaded.model, tmp, model_id))
        store.record_version(name, model_id, parent, str(folder), manifest)
        return finish("succeeded", version=name, n_pairs=len(data.train), metrics=metrics | {"counts": counts},
                      max_feedback_id=data.max_feedback_id)
    except TrainingAborted as exc:
        return finish("failed", f"training stopped: {exc}")
    except AdapterError as exc:
        return finish("failed", f"adapter refused: {exc}")
    except Exception as exc:  # the round is recorded as failed whatever went wrong, with the reason
        log.exception("round %s failed", run_id)
        return finish("failed", f"{type(exc).__name__}: {exc}")


def _gap_sides(pair, sampling) -> list[int]:
    """The sides (0 chosen, 1 rejected) of a training pair whose stored log-prob is exact."""
    replies = (pair.chosen_reply_id, pair.rejected_reply_id)
    return [side for side, reply_id in enumerate(replies) if reply_id in sampling and sampling[reply_id].exact]


def gap_pairs(data) -> list[int]:
    """Indices of the round's training pairs with a reply the off-policy gap can use."""
    return [i for i, pair in enumerate(data.train) if _gap_sides(pair, data.sampling)]


def round_staleness(data, start_logps: dict[int, tuple[float, float]], trained_from: str) -> dict:
    """How stale the round's training pairs are (`playground.metrics.staleness`), with `by_version`.

    Per training pair: n, share_older (sampled by a version older than `trained_from`, the round's
    parent), mean_lag (for an arena pair "v0|v2", the newer of its two versions) and by_version (pairs
    per sampling version, as stored). Per reply: the off-policy gap is the mean, over the sampled replies
    of the training pairs whose stored `logprob_sum` is exact (sampled at temperature 1 with no top-p
    filter), of that log-prob under the version that sampled the reply minus the reply's log-prob under
    `trained_from` (from `train_dpo`'s pass before its first step); n_gap counts those replies. A choice
    or ratings pair gives up to two replies, an edit pair at most one: its chosen side is the person's
    own text, which no version sampled. The trained-from side scores the reply's tokens as trained on,
    which end with the chat template's tail (its newline after the end-of-turn token, and an end-of-turn
    token added to a reply cut at the length limit) that the stored sum does not hold: a pair sampled by
    `trained_from` itself has a gap of about that tail's surprisal, near 0 for a chat-tuned model.
    Imported pairs (`python -m store import`) were sampled by no version: counted in by_version only.
    """
    from playground.metrics.staleness import staleness

    pairs = [{"policy_version": pair.policy_version} for pair in data.train if pair.policy_version != IMPORT_VERSION]
    replies = []
    for i, pair in enumerate(data.train):
        if i not in start_logps or pair.policy_version == IMPORT_VERSION:
            continue
        ids = (pair.chosen_reply_id, pair.rejected_reply_id)
        for side in _gap_sides(pair, data.sampling):
            replies.append({"policy_version": pair.policy_version,
                            "stored_logprob": data.sampling[ids[side]].logprob_sum,
                            "logprob_trained_from": start_logps[i][side]})
    try:
        # Called twice, per pair and per reply: the counts are of pairs, the gap is of replies.
        summary = staleness(pairs, trained_from)
        gap = staleness(replies, trained_from)
    except ValueError as exc:  # a version that is not "vN": the round still trains, without this metric
        log.warning("no staleness metrics: %s", exc)
        return {"error": str(exc)}
    by_version = Counter(str(pair.policy_version) for pair in data.train)
    return summary | {"off_policy_gap": gap["off_policy_gap"], "n_gap": gap["n_gap"],
                      "by_version": dict(sorted(by_version.items()))}


def _progress_bar(disabled: bool, desc: str = "dpo", accuracy_key: str = "rewards/accuracies"):
    from tqdm.auto import tqdm

    bar = None

    def update(m: dict) -> None:
        nonlocal bar
        if disabled:
            return
        if bar is None:
            bar = tqdm(total=m["total_steps"], desc=desc, file=sys.stderr)
        bar.set_postfix(loss=f"{m.get('loss', float('nan')):.4f}", acc=f"{m.get(accuracy_key, 0):.2f}")
        bar.update(m["step"] - bar.n)
        if m["step"] >= m["total_steps"]:
            bar.close()

    return update


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    code, summary = run_round(args)
    print(json.dumps(summary, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
