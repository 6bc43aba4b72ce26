"""What one annotator's votes do to the model: two DPO rounds, with and without them, publishing nothing.

    python -m trainers.run --trial-without sim-poisoner-1 --db data/playground.db

The question "what would the held-out accuracy of a round trained without them gain or lose" is
answered by training that round, and its twin with them, under the same conditions:

- the same pairs: the newest TRIAL_MAX_PAIRS training pairs (consumed or not) of every annotator not
  excluded now, the annotator included; the "without" arm is the same sample minus the annotator's
  pairs, so the only difference between the arms is those pairs;
- the same start: both from the base model with a fresh adapter (a warm start from the live version
  would carry what the annotator already taught it into both arms), the round's DPO settings, the
  same seed;
- the same yardstick: the held-out pairs of everyone else (the annotator's own held-out votes are
  what is in question, so they are not the measure), scored by each arm's implicit reward after
  training, with a Wilson interval each, and their difference (on the same pairs, so it is the
  annotator's doing up to the noise the intervals show).

The round is recorded (trigger `trial:USER`, status succeeded or skipped, the result under the metrics'
`trial`) but consumes no pairs (no max_feedback_id) and publishes no version, so the schedule and the
live version do not notice it. It costs two rounds of at most TRIAL_MAX_PAIRS pairs.
"""

from __future__ import annotations

import argparse
import logging

from trainers.rounds import RoundStopped, open_round

log = logging.getLogger("trainers.run")

# Pairs each arm trains on at most (the newest): two rounds of this size take about two minutes of the
# bundled model on a 2-core CPU (a 32-pair DPO round is well under one), so a trial fits a demo.
TRIAL_MAX_PAIRS = 64
TRIAL_TRIGGER_PREFIX = "trial:"


def _accuracy(held: dict) -> dict:
    from playground.metrics import wilson

    n, accuracy = held.get("n") or 0, held.get("accuracy")
    lo, hi = wilson(accuracy * n, n) if n and accuracy is not None else (None, None)
    return {"n": n, "accuracy": accuracy, "lo": lo, "hi": hi, "margin": held.get("margin")}


def run_trial(args: argparse.Namespace) -> tuple[int, dict]:
    from trainers.data import excluded_users, stored_specs, tokenize_within
    from trainers.dpo import TrainingAborted, config_dict, train_dpo
    from trainers.run import dpo_config

    user = args.trial_without.strip()
    config = dpo_config(args)
    if args.trigger == "manual":
        args.trigger = f"{TRIAL_TRIGGER_PREFIX}{user}"
    rnd = open_round(args, "dpo", config_dict(config))
    store, loaded = rnd.store, rnd.loaded
    try:
        others_out = excluded_users(store, also=[user])
        with_them = tuple(u for u in others_out if u != user)
        options = dict(include_simulated=not args.exclude_simulated, include_arena=args.include_arena,
                       max_length=config.max_length)
        rows = store.training_pairs(rnd.model_id, held_out=False, new=None, without_users=with_them,
                                    **options)[-TRIAL_MAX_PAIRS:]
        theirs = sum(1 for r in rows if r["user"] == user)
        if not theirs:
            raise RoundStopped("skipped", f"{user} has no training pair among the newest {len(rows)}: nothing to "
                                          "take out")
        if theirs == len(rows):
            raise RoundStopped("skipped", f"all {len(rows)} pairs are {user}'s: a round without them has nothing "
                                          "to train on")
        held_rows = store.training_pairs(rnd.model_id, held_out=True, new=None, without_users=others_out, **options)
        skipped: dict[str, int] = {}
        held_out = tokenize_within(loaded.tokenizer, stored_specs(held_rows), config.max_length, skipped)
        if not held_out:
            raise RoundStopped("skipped", "no held-out pairs of other annotators to measure the two rounds on")
        arms = {"with": rows, "without": [r for r in rows if r["user"] != user]}
        results = {}
        for name, arm_rows in arms.items():
            pairs = tokenize_within(loaded.tokenizer, stored_specs(arm_rows), config.max_length, skipped)
            log.info("trial %s %s: %d pairs, %d held out", name, user, len(pairs), len(held_out))
            result = train_dpo(loaded.model, pairs, held_out, config,
                               on_step=rnd.progress(f"trial_{name}/"))
            results[name] = {"pairs": len(pairs), "held_out_before": _accuracy(result.eval_before),
                             **_accuracy(result.eval_after)}
            del result  # a private copy of the base weights: one at a time
        difference = None
        if results["with"]["accuracy"] is not None and results["without"]["accuracy"] is not None:
            difference = results["without"]["accuracy"] - results["with"]["accuracy"]
        trial = {"annotator": user, "excluded_already": list(with_them), "max_pairs": TRIAL_MAX_PAIRS,
                 "their_pairs": theirs, "held_out_n": len(held_out), "with": results["with"],
                 "without": results["without"], "difference": difference, "skipped": skipped}
        return rnd.finish("succeeded", f"trial without {user}: nothing published", n_pairs=len(rows),
                          metrics={"trial": trial})
    except RoundStopped as exc:
        return rnd.stopped(exc)
    except TrainingAborted as exc:
        return rnd.finish("failed", f"training stopped: {exc}")
    except Exception as exc:  # recorded as failed whatever went wrong, with the reason
        log.exception("trial round %s failed", rnd.run_id)
        return rnd.finish("failed", f"{type(exc).__name__}: {exc}")
