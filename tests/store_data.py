"""A real store with every kind of judgment, for the export and import tests: chat votes, an edit, thumbs,
a tie, arena pairs, a simulated conversation and a held-out one, through the Store API the app uses."""

from __future__ import annotations

from store import Store
from store.pairs import is_held_out

MODEL = "tiny"
# Newlines (both kinds), commas, quotes, NUL, a bell, emoji and right-to-left text: a CSV or JSON writer
# that quotes wrongly, or an encoder that drops characters, changes it.
NASTY = 'line one\nline two, with "quotes", commas\r\nand a NUL \x00 bell \x07 🙂 שלום'
SYSTEM = "Be brief."

# What `build` stores, as the exports should count it (held-out left out unless asked).
PAIRS = 7  # choice, edit (two pairs), thumbs, v1's choice, the arena choice, the simulated choice
HELD_OUT_PAIRS = 1
RATINGS = 3  # two thumbs making a pair and a lone thumb (the held-out conversation's thumb is left out)
ARENA_VOTES = 3  # b, tie, both-bad
BY_USER = {"alice": 4, "bob": 2, "sim-1": 1}
BY_VERSION = {"v0": 6, "v1": 2}  # the arena pair "v0|v1" counts for both


def reply(slot: str, text: str, version: str = "v0", seed: int = 1, n_tokens: int = 5) -> dict:
    return {"slot": slot, "text": text, "policy_version": version, "model_id": MODEL, "seed": seed,
            "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32, "finish_reason": "stop", "n_tokens": n_tokens,
            "logprob_sum": -3.0}


def context(*user_messages: str, system: str = SYSTEM) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(user_messages):
        if i:
            messages.append({"role": "assistant", "content": f"answer {i}"})
        messages.append({"role": "user", "content": text})
    return messages


def one_vote(store: Store, user: str, choice: str = "a", a: str = "left", b: str = "right",
             versions=("v0", "v0"), simulated: bool = False, conversation: int | None = None) -> tuple[int, int]:
    """A conversation (or a new turn of one) with one pair and one choice; returns (conversation, turn)."""
    if conversation is None:
        conversation = store.start_conversation(f"s-{user}", user, MODEL, SYSTEM, simulated=simulated)
    idx = len(store.turns_for_conversation(conversation))
    turn, _ = store.record_turn(conversation, idx, context(f"question {idx} from {user}"), f"question {idx}",
                                [reply("a", a, versions[0], seed=21), reply("b", b, versions[1], seed=22, n_tokens=9)],
                                prompt_tokens=12)
    store.record_choice(turn, 0, choice, user, f"s-{user}")
    return conversation, turn


def build(store: Store) -> dict:
    """Every kind of judgment; returns the ids the tests look up."""
    alice = store.start_conversation("s-alice", "alice", MODEL, SYSTEM)
    t1, _ = store.record_turn(alice, 0, context("hi"), "hi", [reply("a", "hello A", seed=11),
                                                               reply("b", NASTY, seed=12)], prompt_tokens=8)
    store.record_choice(t1, 0, "b", "alice", "s-alice")  # NASTY over "hello A"
    t2, _ = store.record_turn(alice, 1, context("hi", "more, please"), "more, please",
                              [reply("a", "x1"), reply("b", "x2")])
    store.record_edit(t2, 0, "my own, better reply", "alice", "s-alice")  # two pairs: over x1 and over x2
    t3, (up_a, up_b) = store.record_turn(alice, 2, context("hi", "more", "rate these"), "rate these",
                                         [reply("a", "thumbs down"), reply("b", "thumbs up")])
    store.record_rating(up_b, "up", "alice", "s-alice")
    store.record_rating(up_a, "down", "alice", "s-alice")
    t4, (lone, _) = store.record_turn(alice, 3, context("hi", "more", "rate", "tie?"), "tie?",
                                      [reply("a", "same-ish 1"), reply("b", "same-ish 2")])
    store.record_choice(t4, 0, "tie", "alice", "s-alice")  # no pair
    store.record_rating(lone, "up", "alice", "s-alice")  # a lone thumb: no pair, one KTO row

    bob, _ = one_vote(store, "bob", "a", "v1 wins", "v1 loses", versions=("v1", "v1"))
    _, arena = one_vote(store, "bob", "b", "old v0", "new v1", versions=("v0", "v1"), conversation=bob)
    one_vote(store, "bob", "tie", "v0 again", "v1 again", versions=("v0", "v1"), conversation=bob)
    one_vote(store, "bob", "both_bad", "v1 bad", "v0 bad", versions=("v1", "v0"), conversation=bob)
    sim, _ = one_vote(store, "sim-1", "a", "sim left", "sim right", simulated=True)

    while True:  # a conversation on the held-out side of the split (ids are given in order)
        held = store.start_conversation("s-carol", "carol", MODEL, SYSTEM)
        if is_held_out(held):
            break
    _, held_turn = one_vote(store, "carol", "a", "held left", "held right", conversation=held)
    store.record_rating(store.replies_for_turn(held_turn)[1]["id"], "down", "carol", "s-carol")
    return {"alice": alice, "bob": bob, "sim": sim, "held": held, "choice_turn": t1, "arena_turn": arena}
