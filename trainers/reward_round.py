"""A reward-model round: fit a reward model to every pair so far and publish it as reward_models/rN/.

    python -m trainers.run --algo reward --db data/playground.db --reward-models-dir reward_models

Run alone (`--algo reward`), or as the first phase of a PPO round (`fit_reward_model`). A reward model
is fitted afresh to all the comparisons each time (trainers/data.py `build_reward_data`), published
atomically and hash-verified like an adapter, and recorded in `reward_models` with its held-out accuracy
and interval: one whose interval does not clear chance is recorded as such (usable = 0), and a PPO round
refuses it unless the admin names it. A reward round publishes no policy version and consumes no pairs:
the DPO schedule's "new pairs" are unaffected by it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.rounds import Round, RoundStopped, log, open_round


def reward_config(args: argparse.Namespace, flag: str = "--reward-config"):
    from trainers.reward import RewardConfig
    from trainers.run import parse_config

    return parse_config(RewardConfig, getattr(args, flag[2:].replace("-", "_")), flag=flag)


def fit_reward_model(rnd: Round, args: argparse.Namespace, config, prefix: str = "") -> dict:
    """Train, publish and record a reward model on every pair so far; returns its `reward_models` row.
    Raises RoundStopped('skipped') with too few pairs."""
    from playground.serving.adapters import clean_temporary, publish
    from trainers.data import build_reward_data
    from trainers.reward import (MIN_REWARD_PAIRS, REWARD_REQUIRED_FILES, load_reward_model, save_reward_model,
                                 train_reward)
    from trainers.reward import config_dict as reward_config_dict
    from trainers.run import _progress_bar

    store, loaded = rnd.store, rnd.loaded
    folder_root = Path(args.reward_models_dir)
    for name in clean_temporary(folder_root):
        log.info("removed half-written %s left by an earlier round", name)
    data = build_reward_data(store, loaded.tokenizer, rnd.model_id, config.max_length,
                             include_simulated=not args.exclude_simulated, include_arena=args.include_arena)
    if len(data.train) < MIN_REWARD_PAIRS:
        raise RoundStopped("skipped", f"{len(data.train)} training pair(s); a reward model needs at least "
                                      f"{MIN_REWARD_PAIRS}", n_pairs=len(data.train),
                           metrics={"counts": data.counts()})
    bar = _progress_bar(args.no_progress, desc="reward model", accuracy_key="accuracy")
    result = train_reward(loaded.model, data.train, data.held_out, config, on_step=rnd.progress(prefix, bar))
    held = dict(result.held_out)
    held["accuracy_ci"] = [held.get("accuracy_lo"), held.get("accuracy_hi")]
    stats = {"n_pairs": len(data.train), "held_out": held, "train": result.train,
             "mean": result.mean, "std": result.std, "usable": result.usable}
    name = store.next_reward_model_name(rnd.model_id)
    while (folder_root / name).exists():  # another base model's rN, or one published but never recorded
        name = f"r{int(name[1:]) + 1}"
    manifest = {"base_model_id": rnd.model_id, "algo": "reward", "config": reward_config_dict(config),
                "data": data.counts(), "stats": stats, "run_id": rnd.run_id,
                "train_seconds": round(result.seconds, 2), "max_feedback_id": data.max_feedback_id}
    folder = publish(folder_root, name, lambda tmp: save_reward_model(result, tmp), manifest,
                     verify=lambda tmp: load_reward_model(loaded.model, tmp, rnd.model_id),
                     required=REWARD_REQUIRED_FILES)
    store.record_reward_model(name, rnd.model_id, str(folder), rnd.run_id, manifest, data.max_feedback_id)
    log.info("reward model %s: held-out accuracy %s on %s pairs (usable: %s)", name,
             held.get("accuracy"), held.get("n"), result.usable)
    return store.reward_model(rnd.model_id, name)


def chance_reason(row: dict) -> str:
    """Why a reward model is not usable, in words."""
    if not row["held_out_n"]:
        return f"reward model {row['name']} has no held-out pairs to show it agrees with anyone"
    return (f"reward model {row['name']}'s held-out accuracy {row['held_out_accuracy']:.2f} "
            f"[{row['held_out_ci_low']:.2f}, {row['held_out_ci_high']:.2f}] on {row['held_out_n']} pairs does not "
            "clear chance")


def reward_summary(row: dict) -> dict:
    """What a round's metrics keep of a reward model."""
    return {"name": row["name"], "held_out_n": row["held_out_n"], "held_out_accuracy": row["held_out_accuracy"],
            "held_out_ci": [row["held_out_ci_low"], row["held_out_ci_high"]], "usable": bool(row["usable"]),
            "mean": row["reward_mean"], "std": row["reward_std"], "n_pairs": row["n_pairs"]}


def run_reward_round(args: argparse.Namespace) -> tuple[int, dict]:
    from playground.serving.adapters import AdapterError
    from trainers.dpo import TrainingAborted
    from trainers.reward import config_dict

    config = reward_config(args, flag="--config")
    rnd = open_round(args, "reward", config_dict(config))
    try:
        row = fit_reward_model(rnd, args, config, prefix="rm/")
        summary = reward_summary(row)
        rnd.store.set_run_reward_model(rnd.run_id, row["name"])
        why = None if row["usable"] else f"{chance_reason(row)}: PPO will not use it unless named"
        return rnd.finish("succeeded", why, n_pairs=row["n_pairs"], reward_model=row["name"],
                          metrics={"reward_model": summary})
    except RoundStopped as exc:
        return rnd.stopped(exc)
    except TrainingAborted as exc:
        return rnd.finish("failed", f"training stopped: {exc}")
    except AdapterError as exc:
        return rnd.finish("failed", f"reward model refused: {exc}")
    except Exception as exc:  # recorded as failed whatever went wrong, with the reason
        log.exception("round %s failed", rnd.run_id)
        return rnd.finish("failed", f"{type(exc).__name__}: {exc}")
