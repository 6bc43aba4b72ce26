"""From stored feedback to a round's preference pairs: the pairs from the store, tokenisation, replay.

Which judgments make pairs (the rules, the held-out split by conversation) is the store's
(`store/pairs.py`): it keeps every pair in an index as judgments arrive, so the app's schedule and this
module count and read the same pairs. Here they are tokenised with the chat template, checked, and
mixed with a replay sample of older pairs.

The annotators excluded from training (`Store.exclude_annotator`) are left out of everything here:
the new pairs, the replay, the held-out pairs and the counts, read once per round and recorded in the
round's data counts (`excluded_annotators`), so the schedule's count and the round agree.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass, field

from playground.serving.prompting import render
from store.pairs import is_held_out, pair_rows
from trainers.pairs import PreferencePair

__all__ = ["PairSpec", "ReplySampling", "RoundData", "build_round", "count_new_pairs", "excluded_users", "is_held_out",
           "pair_specs", "tokenize"]


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


def _spec(context, conversation_id: int, turn_id: int, row: dict) -> PairSpec:
    return PairSpec(tuple((m["role"], m["content"]) for m in context), row["chosen"], row["rejected"],
                    row["source"], conversation_id, turn_id, row["chosen_reply_id"], row["rejected_reply_id"],
                    row["policy_version"], tuple(row["feedback_ids"]))


def pair_specs(judged: list[dict]) -> list[PairSpec]:
    """The store's rules applied to judged (turn, pair) groups (each with its context messages)."""
    return [_spec(group["context"], group["conversation_id"], group["turn_id"], row)
            for group in judged for row in pair_rows(group)]


@dataclass(frozen=True)
class ReplySampling:
    """How a stored reply was sampled: its `logprob_sum` under the version that sampled it, and the settings."""

    logprob_sum: float | None
    temperature: float | None
    top_p: float | None

    @property
    def exact(self) -> bool:
        """The stored log-prob is the sampling distribution's own: it is always taken at temperature 1 with no
        top-p filter, which is the distribution the reply came from only when it was sampled that way."""
        return self.logprob_sum is not None and self.temperature == 1 and self.top_p in (1, None)


def reply_sampling(rows: list[dict]) -> dict[int, ReplySampling]:
    """The sampled replies of `Store.training_pairs` rows, by reply id (an edit's chosen text has none)."""
    out = {}
    for row in rows:
        for side in ("chosen", "rejected"):
            reply_id = row.get(f"{side}_reply_id")
            if reply_id is not None:
                out[reply_id] = ReplySampling(row.get(f"{side}_logprob_sum"), row.get(f"{side}_temperature"),
                                              row.get(f"{side}_top_p"))
    return out


def stored_specs(rows: list[dict]) -> list[PairSpec]:
    """`Store.training_pairs` rows as specs."""
    return [_spec(r["context"], r["conversation_id"], r["turn_id"], r) for r in rows]


class BoundaryError(ValueError):
    """The prompt's tokens are not a prefix of prompt+reply: training on it would shift every label."""


def tokenize(tokenizer, spec: PairSpec) -> PreferencePair:
    messages = [{"role": role, "content": content} for role, content in spec.context]
    prompt = render(tokenizer, messages)
    replies = []
    for text in (spec.chosen, spec.rejected):
        # Rendered like the prompt, so a reply (sampled, or written by a person) that holds marker text such
        # as "<|im_end|>" is trained on as text, never as a forged end of turn (issue 15).
        full = render(tokenizer, messages + [{"role": "assistant", "content": text}], add_generation_prompt=False)
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
    # How each sampled reply of the training pairs was drawn, by reply id (the staleness metrics read it).
    sampling: dict[int, ReplySampling] = field(default_factory=dict)
    excluded: tuple[str, ...] = ()  # the annotators whose pairs the round left out

    def counts(self) -> dict:
        return {"train": len(self.train), "held_out": len(self.held_out), "new": self.new_pairs,
                "replayed": self.replayed, "skipped": dict(self.skipped),
                "excluded_annotators": list(self.excluded)}


def tokenize_within(tokenizer, specs, max_length: int, skipped: dict[str, int]) -> list[PreferencePair]:
    """The specs tokenised, leaving out (and counting in `skipped`) those whose prompt is not a prefix of
    prompt + reply ('boundary') and those longer than `max_length` ('too_long')."""
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


def excluded_users(store, also: Collection[str] = ()) -> tuple[str, ...]:
    """The annotators a round leaves out: those excluded now, and `also` (a trial round's one more)."""
    return tuple(sorted(set(store.excluded_users()) | {u for u in also if u}))


def count_new_pairs(store, model_id: str, include_simulated: bool = True, max_length: int | None = None,
                    include_arena: bool = False, without_users: Collection[str] | None = None) -> int:
    """New training pairs within `max_length` tokens: the one definition the schedule and the trainer use.
    Arena pairs (two versions shown blind) count only with `include_arena`; the excluded annotators'
    pairs (`without_users`, by default those excluded now) never count."""
    without = excluded_users(store) if without_users is None else tuple(without_users)
    return store.count_new_pairs(model_id, include_simulated, max_length, include_arena=include_arena,
                                 without_users=without)


def build_round(store, tokenizer, model_id: str, max_length: int, replay_ratio: float = 1.0,
                seed: int = 0, include_simulated: bool = True, include_arena: bool = False,
                without_users: Collection[str] | None = None) -> RoundData:
    """The pairs of one round: every new pair, plus a replay sample of older ones (replay_ratio x new).

    Pairs the store measured as longer than `max_length` are left out (and counted); the rest are
    tokenised here, and any the store could not measure are measured now. Arena pairs are left out
    (train, replay and held out alike) unless `include_arena`; so are the pairs of `without_users`
    (by default the annotators excluded now)."""
    without = excluded_users(store) if without_users is None else tuple(sorted(set(without_users)))
    options = dict(include_simulated=include_simulated, max_length=max_length, include_arena=include_arena,
                   without_users=without)
    new_rows = store.training_pairs(model_id, held_out=False, new=True, **options)
    new = stored_specs(new_rows)
    old_ids = store.training_pair_ids(model_id, held_out=False, new=False, **options)
    rng = random.Random(seed)
    replay_ids = rng.sample(old_ids, min(len(old_ids), int(round(replay_ratio * len(new)))))
    replay_rows = store.training_pairs(model_id, held_out=False, new=False, ids=replay_ids, **options)
    replay = stored_specs(replay_rows)
    held_out = stored_specs(store.training_pairs(model_id, held_out=True, new=None, **options))
    skipped: dict[str, int] = {}
    too_long = store.count_too_long_pairs(model_id, max_length, include_simulated, include_arena=include_arena,
                                          without_users=without)
    if too_long:
        skipped["too_long"] = too_long
    # Every pair this round could use, consumed or not: the next round's "new" starts after it.
    newest = max([s.newest_feedback_id for s in new], default=store.last_consumed_feedback_id(model_id))

    def tokenized(specs):
        return tokenize_within(tokenizer, specs, max_length, skipped)

    train_new = tokenized(new)
    train_replay = tokenized(replay)
    return RoundData(train=train_new + train_replay, held_out=tokenized(held_out), new_pairs=len(train_new),
                     replayed=len(train_replay), max_feedback_id=newest, skipped=skipped,
                     sampling=reply_sampling(new_rows + replay_rows), excluded=without)


def build_reward_data(store, tokenizer, model_id: str, max_length: int, include_simulated: bool = True,
                      include_arena: bool = False, without_users: Collection[str] | None = None) -> RoundData:
    """Every pair so far, for a reward model: it is fitted afresh each time (one epoch over all the
    comparisons, as InstructGPT's is), not warm-started on the new ones, so each reward model stands on
    every vote. The same rules, split and tokenisation as a DPO round's; `new_pairs` counts them all and
    `max_feedback_id` is the newest judgment among them. The excluded annotators' pairs are left out."""
    without = excluded_users(store) if without_users is None else tuple(sorted(set(without_users)))
    options = dict(include_simulated=include_simulated, max_length=max_length, include_arena=include_arena,
                   without_users=without)
    rows = store.training_pairs(model_id, held_out=False, new=None, **options)
    held_rows = store.training_pairs(model_id, held_out=True, new=None, **options)
    skipped: dict[str, int] = {}

    def tokenized(specs):
        return tokenize_within(tokenizer, specs, max_length, skipped)

    train = tokenized(stored_specs(rows))
    newest = max([max(r["feedback_ids"]) for r in rows + held_rows], default=0)
    return RoundData(train=train, held_out=tokenized(stored_specs(held_rows)), new_pairs=len(train), replayed=0,
                     max_feedback_id=newest, skipped=skipped, sampling=reply_sampling(rows), excluded=without)


def rollout_prompts(store, tokenizer, model_id: str, n: int, max_prompt_tokens: int, seed: int = 0,
                    held_out: bool = False, include_simulated: bool = True) -> list[tuple[list[int], list[dict]]]:
    """Up to `n` stored contexts (`Store.rollout_contexts`: across conversations, the held-out side only
    for evaluation) as (token ids rendered with the chat template up to the assistant's turn, the
    messages). Contexts longer than `max_prompt_tokens` are left out."""
    prompts = []
    for row in store.rollout_contexts(model_id, n, seed=seed, held_out=held_out,
                                      include_simulated=include_simulated):
        ids = render(tokenizer, row["context"])
        if len(ids) <= max_prompt_tokens:
            prompts.append((ids, row["context"]))
    return prompts
