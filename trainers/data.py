"""From stored feedback to preference pairs: the rules, the held-out split, tokenisation, replay.

The rules (each judged pair of replies that was not regenerated away):
- a choice of A or B gives (context, chosen, rejected);
- an edit (the person's own better reply) gives (context, edit, A) and (context, edit, B);
- thumbs up on one reply and down on the other give a pair, unless a choice on the same pair already did;
- a tie, both-bad, a lone thumb, or two identical texts give none.

The held-out 10% is chosen by conversation (a hash of its id), not by pair, so that no conversation's
turns sit on both sides, and it stays the same across rounds.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from playground.prompting import render
from trainers.pairs import PreferencePair

HELD_OUT_BUCKETS = 10  # 1 bucket in 10: a held-out share of about 10%


@dataclass(frozen=True)
class PairSpec:
    """A preference pair as text, before tokenisation."""

    context: tuple  # the messages the model saw (system, history, user), as (role, content) tuples
    chosen: str
    rejected: str
    source: str
    conversation_id: int
    turn_id: int
    chosen_reply_id: int | None
    rejected_reply_id: int | None
    policy_version: str | None
    feedback_ids: tuple[int, ...]

    @property
    def newest_feedback_id(self) -> int:
        return max(self.feedback_ids)


def is_held_out(conversation_id: int) -> bool:
    digest = hashlib.sha256(f"held-out:{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


def pair_specs(judged: list[dict]) -> list[PairSpec]:
    """Apply the rules above to `Store.judged_pairs()` rows."""
    specs: dict[tuple, PairSpec] = {}
    for group in judged:
        replies = group["replies"]
        if group["superseded"] or set(replies) != {"a", "b"}:
            continue
        context = tuple((m["role"], m["content"]) for m in group["context"])
        version = replies["a"]["policy_version"]

        def add(chosen_slot_or_text, rejected_slot, source, feedback_ids):
            if chosen_slot_or_text in ("a", "b"):
                chosen, chosen_id = replies[chosen_slot_or_text]["text"], replies[chosen_slot_or_text]["id"]
            else:
                chosen, chosen_id = chosen_slot_or_text, None
            rejected, rejected_id = replies[rejected_slot]["text"], replies[rejected_slot]["id"]
            if chosen == rejected or not chosen.strip():
                return
            key = (group["turn_id"], chosen, rejected)  # a choice and agreeing thumbs make one pair, not two
            if key not in specs:
                specs[key] = PairSpec(context, chosen, rejected, source, group["conversation_id"],
                                      group["turn_id"], chosen_id, rejected_id, version, tuple(feedback_ids))

        choice = next((f for f in group["feedback"] if f["kind"] == "choice"), None)
        if choice is not None and choice["value"] in ("a", "b"):
            add(choice["value"], "b" if choice["value"] == "a" else "a", "choice", [choice["id"]])
        for edit in (f for f in group["feedback"] if f["kind"] == "edit"):
            add(edit["value"], "a", "edit", [edit["id"]])
            add(edit["value"], "b", "edit", [edit["id"]])
        if choice is None or choice["value"] not in ("a", "b"):
            ratings = {f["reply_id"]: f for f in group["feedback"] if f["kind"] == "rating"}
            slot_of = {replies[s]["id"]: s for s in ("a", "b")}
            ups = [slot_of[r] for r, f in ratings.items() if f["value"] == "up" and r in slot_of]
            downs = [slot_of[r] for r, f in ratings.items() if f["value"] == "down" and r in slot_of]
            if len(ups) == 1 and len(downs) == 1 and ups[0] != downs[0]:
                add(ups[0], downs[0], "ratings", [f["id"] for f in ratings.values()])
    return list(specs.values())


class BoundaryError(ValueError):
    """The prompt's tokens are not a prefix of prompt+reply: training on it would shift every label."""


def tokenize(tokenizer, spec: PairSpec) -> PreferencePair:
    messages = [{"role": role, "content": content} for role, content in spec.context]
    prompt = render(tokenizer, messages)
    replies = []
    for text in (spec.chosen, spec.rejected):
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": text}],
                                                  tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] != prompt:
            raise BoundaryError(f"turn {spec.turn_id}: the prompt tokens are not a prefix of prompt + reply")
        replies.append(tuple(full[len(prompt):]))
    return PreferencePair(
        prompt_ids=tuple(prompt), chosen_ids=replies[0], rejected_ids=replies[1], source=spec.source,
        conversation_id=spec.conversation_id, turn_id=spec.turn_id, chosen_reply_id=spec.chosen_reply_id,
        rejected_reply_id=spec.rejected_reply_id, policy_version=spec.policy_version,
        feedback_ids=spec.feedback_ids,
    )


@dataclass
class RoundData:
    train: list[PreferencePair]
    held_out: list[PreferencePair]
    new_pairs: int  # training pairs from feedback no successful round has used yet
    replayed: int  # older training pairs mixed back in
    max_feedback_id: int
    skipped: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict:
        return {"train": len(self.train), "held_out": len(self.held_out), "new": self.new_pairs,
                "replayed": self.replayed, "skipped": dict(self.skipped)}


def split_specs(store, model_id: str, include_simulated: bool = True
                ) -> tuple[list[PairSpec], list[PairSpec], list[PairSpec], int]:
    """(new training specs, older training specs, held-out specs, newest feedback id)."""
    specs = pair_specs(store.judged_pairs(include_simulated))
    watermark = store.last_consumed_feedback_id(model_id)
    train = [s for s in specs if not is_held_out(s.conversation_id)]
    held_out = [s for s in specs if is_held_out(s.conversation_id)]
    new = [s for s in train if s.newest_feedback_id > watermark]
    old = [s for s in train if s.newest_feedback_id <= watermark]
    newest = max((s.newest_feedback_id for s in specs), default=watermark)
    return new, old, held_out, newest


def count_new_pairs(store, model_id: str, include_simulated: bool = True) -> int:
    return len(split_specs(store, model_id, include_simulated)[0])


def build_round(store, tokenizer, model_id: str, max_length: int, replay_ratio: float = 1.0,
                seed: int = 0, include_simulated: bool = True) -> RoundData:
    """The pairs of one round: every new pair, plus a replay sample of older ones (replay_ratio x new)."""
    new, old, held_out, newest = split_specs(store, model_id, include_simulated)
    rng = random.Random(seed)
    replay = rng.sample(old, min(len(old), int(round(replay_ratio * len(new)))))
    skipped: dict[str, int] = {}

    def tokenized(specs):
        out = []
        for spec in specs:
            try:
                pair = tokenize(tokenizer, spec)
            except BoundaryError:
                skipped["boundary"] = skipped.get("boundary", 0) + 1
                continue
            if pair.length > max_length:
                skipped["too_long"] = skipped.get("too_long", 0) + 1
                continue
            out.append(pair)
        return out

    train_new = tokenized(new)
    train_replay = tokenized(replay)
    return RoundData(train=train_new + train_replay, held_out=tokenized(held_out), new_pairs=len(train_new),
                     replayed=len(train_replay), max_feedback_id=newest, skipped=skipped)
