"""A PPO round: a reward model (a new one when enough new pairs arrived), then PPO against it.

    python -m trainers.run --algo ppo --db data/playground.db --adapters-dir adapters

1. The reward model: the one `--reward-model` names (the admin's explicit choice, used even at chance),
   else a new one fitted first (trainers/reward_round.py) when at least `--min-new-pairs` pairs arrived
   since the latest, else the latest. One whose held-out accuracy interval does not clear chance stops
   the round (skipped, with the reason): optimising a proxy that agrees with nobody teaches noise.
2. Prompts: contexts people wrote (stored turns), drawn across conversations; the held-out split's
   conversations are left for evaluation.
3. PPO (trainers/ppo.py) from the live version's adapter, scored by the reward model, normalised with
   its stored mean and standard deviation and clipped.
4. The adapter is published as adapters/vN/ exactly as a DPO round's (hot-swap, rollback and the
   version history need no change), its manifest and the round naming the reward model used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.rounds import Round, RoundStopped, log, open_round

# Stored contexts a round draws its rollouts from (each iteration samples from these).
PPO_PROMPT_POOL = 256


def ppo_config(args: argparse.Namespace):
    from trainers.ppo import PPOConfig
    from trainers.run import parse_config

    return parse_config(PPOConfig, args.config)


def choose_reward_model(rnd: Round, args: argparse.Namespace) -> tuple[dict, str]:
    """(the reward model's row, how it was chosen): named, fitted now, or the latest reused."""
    from trainers.reward_round import fit_reward_model, reward_config

    store = rnd.store
    if args.reward_model:
        row = store.reward_model(rnd.model_id, args.reward_model)
        if row is None:
            known = [r["name"] for r in store.reward_models(rnd.model_id)]
            raise RoundStopped("failed", f"no reward model {args.reward_model} for {rnd.model_id} (there are: "
                                         f"{', '.join(known) or 'none'})")
        return row, "named"
    latest = store.latest_reward_model(rnd.model_id)
    config = reward_config(args)
    waiting = None if latest is None else store.count_pairs_after(
        rnd.model_id, latest["max_feedback_id"], not args.exclude_simulated, config.max_length,
        include_arena=args.include_arena, without_users=store.excluded_users())
    if latest is None or waiting >= args.min_new_pairs:
        return fit_reward_model(rnd, args, config, prefix="rm/"), "fitted"
    return latest, "reused"


def run_ppo_round(args: argparse.Namespace) -> tuple[int, dict]:
    from playground.serving.adapters import AdapterError, check_files, clean_temporary, load_version, publish
    from trainers.data import rollout_prompts
    from trainers.ppo import config_dict, save_adapter, train_ppo
    from trainers.reward import load_reward_model
    from trainers.dpo import TrainingAborted
    from trainers.reward_round import chance_reason, reward_summary
    from trainers.run import _progress_bar

    config = ppo_config(args)
    rnd = open_round(args, "ppo", config_dict(config))
    store, loaded = rnd.store, rnd.loaded
    adapters_dir = Path(args.adapters_dir)
    try:
        for name in clean_temporary(adapters_dir):
            log.info("removed half-written %s left by an earlier round", name)
        # The judgments this round answers for: every pair that existed when it started. Recorded as consumed
        # on success whichever reward model it used, so the schedule waits for new votes instead of starting
        # round after round against a named (older) reward model.
        waiting_until = store.newest_pair_feedback_id()
        # 1. The reward model.
        row, how = choose_reward_model(rnd, args)
        store.set_run_reward_model(rnd.run_id, row["name"])
        rm = reward_summary(row) | {"chosen": how}
        if not row["usable"] and how != "named":
            raise RoundStopped("skipped", f"{chance_reason(row)}; more votes, or name it (--reward-model, the admin"
                                          " panel) to use it anyway", reward_model=row["name"],
                               metrics={"reward_model": rm})
        scorer = load_reward_model(loaded.model, Path(row["folder"]), rnd.model_id)

        # 2. Prompts people wrote, never the held-out conversations.
        window = int(getattr(loaded.model.config, "max_position_embeddings", 2048))
        prompts = rollout_prompts(store, loaded.tokenizer, rnd.model_id, PPO_PROMPT_POOL,
                                  max_prompt_tokens=window - config.max_new_tokens, seed=config.seed,
                                  include_simulated=not args.exclude_simulated)
        if not prompts:
            raise RoundStopped("skipped", "no stored prompts to roll out on (outside the held-out split)",
                               reward_model=row["name"], metrics={"reward_model": rm})

        # 3. PPO from the live version, against the normalised reward model (rollouts scored on their text
        # rendered after their context, as the reward model was trained).
        reward_fn = scorer.ppo_reward(loaded.tokenizer, {tuple(ids): messages for ids, messages in prompts})

        init_adapter = None
        if rnd.parent != "v0":
            init_adapter = adapters_dir / rnd.parent
            check_files(init_adapter, rnd.model_id)
        bar = _progress_bar(args.no_progress, desc="ppo", accuracy_key="score/mean")
        result = train_ppo(loaded.model, loaded.tokenizer, [ids for ids, _ in prompts], reward_fn, config,
                           init_adapter_dir=init_adapter,
                           on_step=rnd.progress("", bar))

        # 4. Publish as DPO does.
        name = store.next_version_name(rnd.model_id)
        metrics = {"reward_model": rm, "last_step": result.steps[-1] if result.steps else None,
                   "first_step": result.steps[0] if result.steps else None, "prompts": len(prompts),
                   "generate_seconds": round(result.generate_seconds, 2),
                   "train_seconds": round(result.train_seconds, 2)}
        manifest = {"base_model_id": rnd.model_id, "parent": rnd.parent, "algo": "ppo",
                    "config": config_dict(config), "reward_model": row["name"], "metrics": metrics,
                    "run_id": rnd.run_id}
        folder = publish(adapters_dir, name, lambda tmp: save_adapter(result, tmp), manifest,
                         verify=lambda tmp: load_version(loaded.model, tmp, rnd.model_id))
        store.record_version(name, rnd.model_id, rnd.parent, str(folder), manifest)
        consumed = max(waiting_until, int(row["max_feedback_id"] or 0), store.last_consumed_feedback_id(rnd.model_id))
        return rnd.finish("succeeded", version=name, n_pairs=row["n_pairs"], metrics=metrics,
                          max_feedback_id=consumed, reward_model=row["name"])
    except RoundStopped as exc:
        return rnd.stopped(exc)
    except TrainingAborted as exc:  # PPO diverged (PPOAborted), or the reward model fitted first did
        return rnd.finish("failed", f"training stopped: {exc}")
    except AdapterError as exc:
        return rnd.finish("failed", f"adapter refused: {exc}")
    except Exception as exc:  # recorded as failed whatever went wrong, with the reason
        log.exception("round %s failed", rnd.run_id)
        return rnd.finish("failed", f"{type(exc).__name__}: {exc}")
