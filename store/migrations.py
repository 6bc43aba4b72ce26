"""The schema, as an ordered list of sqlite-utils migrations.

Never edit a migration that has shipped: append a new one. Each runs in a transaction together with
the record of it having been applied, so a database is always at a whole schema version.
"""

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATION_SET = "rlhf_playground"
migrations = Migrations(MIGRATION_SET)


@migrations()
def m001_initial(db: Database) -> None:
    db["conversations"].create(
        {
            "id": int,
            "session_id": str,
            "user": str,
            "model_id": str,
            "system_prompt": str,
            "created_at": str,
        },
        pk="id",
    )
    db["turns"].create(
        {
            "id": int,
            "conversation_id": int,
            "idx": int,  # position of the user message within its conversation, from 0
            "context_json": str,  # every message the model saw, chat-template roles, as JSON
            "user_message": str,  # exactly what the person typed, before any truncation
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("conversation_id", "conversations", "id")],
    )
    db["replies"].create(
        {
            "id": int,
            "turn_id": int,
            "pair": int,  # 0 for the first pair of a turn, +1 per regenerate
            "slot": str,  # 'a' or 'b'
            "text": str,
            "policy_version": str,
            "model_id": str,
            "seed": int,
            "temperature": float,
            "top_p": float,
            "max_new_tokens": int,
            "finish_reason": str,  # 'stop' (end of turn) or 'length'
            "n_tokens": int,
            "logprob_sum": float,
            "latency_s": float,
            "superseded": int,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("turn_id", "turns", "id")],
        defaults={"superseded": 0},
        not_null={"turn_id", "pair", "slot", "text", "policy_version"},
    )
    db["feedback"].create(
        {
            "id": int,
            "turn_id": int,
            "pair": int,
            "reply_id": int,  # set for ratings: the reply the thumb was on
            "kind": str,  # 'choice', 'rating' or 'edit'
            "value": str,
            "user": str,
            "session_id": str,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("turn_id", "turns", "id"), ("reply_id", "replies", "id")],
        not_null={"turn_id", "pair", "kind", "value"},
    )
    db["policy_versions"].create(
        {
            "id": int,
            "name": str,  # 'v0' is the base model, v1.. are LoRA adapters
            "model_id": str,
            "parent": str,
            "adapter_dir": str,
            "manifest_json": str,
            "created_at": str,
        },
        pk="id",
    )
    db["policy_versions"].create_index(["model_id", "name"], unique=True)
    db["training_runs"].create(
        {
            "id": int,
            "algo": str,
            "status": str,  # 'running', 'succeeded', 'failed', 'skipped'
            "config_json": str,
            "parent_version": str,
            "version": str,
            "n_pairs": int,
            "reason": str,
            "metrics_json": str,
            "started_at": str,
            "finished_at": str,
        },
        pk="id",
    )


@migrations()
def m002_provenance_and_history(db: Database) -> None:
    # Time to first token and the sampled token ids make replies re-scorable exactly (KL, staleness)
    # without re-tokenising text; a replaced vote keeps its row and points at its successor.
    db["replies"].add_column("ttft_s", float)
    db["replies"].add_column("token_ids_json", str)
    db["feedback"].add_column("replaced_by", int)
    db["turns"].add_column("note", str)  # shown to the person when the context was truncated
    db["replies"].create_index(["turn_id", "pair"])
    db["feedback"].create_index(["turn_id", "pair", "kind"])
    db["turns"].create_index(["conversation_id", "idx"])


@migrations()
def m003_training_loop(db: Database) -> None:
    # A round's live progress (the UI polls it), what data it consumed, and its step curves; which
    # version is live is an append-only log, so rollbacks are recorded and nothing is deleted.
    for column, kind in [("step", int), ("total_steps", int), ("loss", float), ("max_feedback_id", int),
                         ("model_id", str), ("pid", int), ("trigger", str)]:
        db["training_runs"].add_column(column, kind)
    db["metrics"].create(
        {"id": int, "run_id": int, "step": int, "name": str, "value": float},
        pk="id",
        foreign_keys=[("run_id", "training_runs", "id")],
    )
    db["metrics"].create_index(["run_id", "name", "step"])
    db["live_events"].create(
        {"id": int, "model_id": str, "version": str, "action": str, "note": str, "created_at": str},
        pk="id",
    )


@migrations()
def m004_simulated_users(db: Database) -> None:
    # Votes from the autopilot's simulated annotators are marked, so training can include or exclude them.
    db["conversations"].add_column("simulated", int, not_null_default=0)


@migrations()
def m005_pair_index(db: Database) -> None:
    # The preference pairs the rules in store/pairs.py make, kept per (turn, pair) and refreshed with
    # every judgment: counting the pairs that wait for a round is then an indexed count, not a pass over
    # every judgment with its context. Token counts of prompts and of written replies give each pair its
    # length, so the app's count and the trainer's length limit agree.
    from store.pairs import index_rows, judged_groups

    db["turns"].add_column("prompt_tokens", int)
    db["feedback"].add_column("n_tokens", int)
    db["training_pairs"].create(
        {
            "id": int,
            "turn_id": int,
            "pair": int,
            "conversation_id": int,
            "source": str,  # 'choice', 'edit' or 'ratings'
            "chosen_reply_id": int,  # null for an edit: the chosen text is the edit's
            "rejected_reply_id": int,
            "edit_feedback_id": int,
            "feedback_ids_json": str,
            "newest_feedback_id": int,  # a pair is new while this is above the last round's watermark
            "policy_version": str,  # the version that sampled the replies
            "held_out": int,
            "simulated": int,
            "n_tokens": int,  # prompt + longer reply + template tail; null when a part is unknown
        },
        pk="id",
        foreign_keys=[("turn_id", "turns", "id")],
        not_null={"turn_id", "pair", "conversation_id", "source", "newest_feedback_id", "held_out", "simulated"},
    )
    db["training_pairs"].create_index(["held_out", "newest_feedback_id"])
    db["training_pairs"].create_index(["turn_id", "pair"])
    # The watermark (newest consumed judgment) is one index seek however many rounds have run.
    db["training_runs"].create_index(["model_id", "status", "max_feedback_id"])
    db["training_runs"].create_index(["status"])
    # Existing judgments: the same rules, applied once. Old turns have no prompt token count, so their
    # pairs have no length and the trainer measures them.
    # (Only the columns this schema has: later migrations add more, and the rules' rows carry them.)
    columns = set(db["training_pairs"].columns_dict)
    for group in judged_groups(db):
        db["training_pairs"].insert_all([{k: v for k, v in row.items() if k in columns} for row in index_rows(group)])


@migrations()
def m006_evaluations_and_arena(db: Database) -> None:
    # What the dashboard reads. An evaluation is one version's run over the probe set (retried once when
    # it crashes: each attempt is a row); its samples keep every probe reply with its exact per-token KL
    # to v0 and to the parent summed over the reply, and its sentence embedding (float32 bytes); its
    # pair scores are the version's implicit reward margin on each held-out pair, so accuracy can be
    # split by the version that sampled the pair. An arena pair (two versions in one pair, shown blind)
    # is marked in the pair index: its votes train only when the admin says so.
    db["evaluations"].create(
        {
            "id": int,
            "model_id": str,
            "version": str,
            "parent": str,  # the version KL-to-previous is measured against (null for v0)
            "status": str,  # 'running', 'succeeded', 'failed'
            "attempt": int,  # 1, then 2 for the one retry of a crashed evaluation
            "error": str,
            "probe_set": str,  # sha256 of the probe file: evaluations of different probe sets do not compare
            "n_probes": int,
            "samples_per_prompt": int,
            "settings_json": str,
            "metrics_json": str,  # the evaluator's own summary (timings, counts)
            "started_at": str,
            "finished_at": str,
        },
        pk="id",
    )
    db["evaluations"].create_index(["model_id", "version", "status"])
    db["eval_samples"].create(
        {
            "id": int,
            "evaluation_id": int,
            "probe_idx": int,
            "sample": int,
            "text": str,
            "n_tokens": int,
            "finish_reason": str,
            "token_ids_json": str,
            "logprob_sum": float,
            "kl_v0": float,  # sum over the reply's tokens of KL(version || v0) at each position
            "kl_prev": float,  # the same against the parent version
            "embedding": bytes,
        },
        pk="id",
        foreign_keys=[("evaluation_id", "evaluations", "id")],
    )
    db["eval_samples"].create_index(["evaluation_id", "probe_idx"])
    db["eval_pairs"].create(
        {
            "id": int,
            "evaluation_id": int,
            "training_pair_id": int,
            "source_version": str,  # the version that sampled the pair
            "margin": float,  # implicit reward of chosen minus rejected (beta * log-ratio to v0)
        },
        pk="id",
        foreign_keys=[("evaluation_id", "evaluations", "id")],
    )
    db["eval_pairs"].create_index(["evaluation_id"])
    db["training_pairs"].add_column("arena", int, not_null_default=0)
    db.execute("update training_pairs set arena = 1 where policy_version like '%|%'")


@migrations()
def m007_reward_models(db: Database) -> None:
    # The classic path's artefacts. A reward model is fitted to the comparisons and published as
    # reward_models/rN/ (atomic and hash-verified like adapters); its row keeps what decides whether it may
    # be used (held-out accuracy with its interval: one at chance is recorded, never used unasked) and the
    # score statistics PPO normalises with. A round records which reward model it used, and each version
    # which algorithm made it. Over-optimisation points (bench.overopt: best-of-n and PPO against a proxy,
    # scored by a gold function) are stored so the dashboard can draw them.
    db["reward_models"].create(
        {
            "id": int,
            "name": str,  # r1, r2, ... per model id
            "model_id": str,
            "folder": str,
            "run_id": int,  # the round that trained it (a reward round, or a PPO round's first phase)
            "n_pairs": int,
            "held_out_n": int,
            "held_out_accuracy": float,
            "held_out_ci_low": float,
            "held_out_ci_high": float,
            "reward_mean": float,
            "reward_std": float,
            "usable": int,  # 1 when the held-out accuracy interval lies above chance
            "max_feedback_id": int,  # the newest judgment among the pairs it was fitted to
            "manifest_json": str,
            "created_at": str,
        },
        pk="id",
    )
    db["reward_models"].create_index(["model_id", "name"], unique=True)
    db["training_runs"].add_column("reward_model", str)
    db["policy_versions"].add_column("algo", str)
    # A best-of-n reply: the best of how many samples, by which reward model, and its score.
    db["replies"].add_column("best_of", int)
    db["replies"].add_column("reward_model", str)
    db["replies"].add_column("reward_score", float)
    db.execute("update policy_versions set algo = case when name = 'v0' then 'base'"
               " else coalesce(json_extract(manifest_json, '$.algo'), 'dpo') end")
    db["overopt_points"].create(
        {
            "id": int,
            "bench_id": str,  # one bench.overopt run
            "model_id": str,
            "gold": str,
            "reward_model": str,
            "method": str,  # 'best_of_n' or 'ppo'
            "x": float,  # n for best-of-n, the round for PPO
            "kl": float,
            "kl_low": float,
            "kl_high": float,
            "proxy": float,
            "proxy_low": float,
            "proxy_high": float,
            "gold_score": float,
            "gold_low": float,
            "gold_high": float,
            "n_prompts": int,
            "created_at": str,
        },
        pk="id",
    )
    db["overopt_points"].create_index(["bench_id"])


@migrations()
def m008_accounts_and_teams(db: Database) -> None:
    # Accounts: a password is kept only as a KDF hash (never plain); a disabled account keeps its row,
    # so its votes keep their name. Sign-ins, sign-outs and refusals are logged without any password.
    db["users"].create(
        {"id": int, "name": str, "role": str, "password_hash": str, "disabled": int, "created_at": str,
         "disabled_at": str},
        pk="id",
        not_null={"name", "role", "password_hash", "disabled"},
        defaults={"disabled": 0},
    )
    db["users"].create_index(["name"], unique=True)
    db["auth_events"].create({"id": int, "user": str, "event": str, "detail": str, "created_at": str}, pk="id")
    # Excluding an annotator from training is recorded and reversible: an append-only log, the newest
    # row per user in force.
    db["annotator_exclusions"].create(
        {"id": int, "user": str, "excluded": int, "by_user": str, "reason": str, "created_at": str}, pk="id")
    db["annotator_exclusions"].create_index(["user", "id"])
    # Where a conversation came from: null for the chat, "import:<file>" for `python -m store import`.
    db["conversations"].add_column("source", str)
    # The pair index knows whose judgment made each pair (rounds can leave an annotator out with an
    # indexed filter) and which pairs were imported (kept out of on-policy metrics).
    db["training_pairs"].add_column("user", str)
    db["training_pairs"].add_column("imported", int, not_null_default=0)
    db.execute("update training_pairs set user = (select c.user from conversations c"
               " where c.id = training_pairs.conversation_id)")
    db["training_pairs"].create_index(["user"])
    # A message or reply the moderation hook refused: what was refused and why, on its turn.
    db["turns"].add_column("moderation_json", str)


def apply(db: Database, stop_before: str | None = None) -> None:
    migrations.apply(db, stop_before=stop_before)


def all_names() -> list[str]:
    return [m.name for m in migrations._migrations]


def applied_names(db: Database) -> list[str]:
    return [m.name for m in migrations.applied(db)]
