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
    for group in judged_groups(db):
        db["training_pairs"].insert_all(index_rows(group))


def apply(db: Database, stop_before: str | None = None) -> None:
    migrations.apply(db, stop_before=stop_before)


def all_names() -> list[str]:
    return [m.name for m in migrations._migrations]


def applied_names(db: Database) -> list[str]:
    return [m.name for m in migrations.applied(db)]
