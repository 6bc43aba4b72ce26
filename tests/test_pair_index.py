"""The store's pair index: it follows every judgment, matches the rules applied from scratch, is backfilled
for an old database, and gives the schedule and the trainer the same count at the same length limit."""

from __future__ import annotations

import random
import threading

from store import Store
from store.pairs import TEMPLATE_TAIL_TOKENS, is_held_out, judged_groups, pair_rows
from trainers.data import count_new_pairs

CONTEXT = [{"role": "user", "content": "hi"}]


def replies(a="reply A", b="reply B", n_tokens=(5, 7)):
    return [{"slot": s, "text": t, "policy_version": "v0", "model_id": "tiny", "seed": 1, "n_tokens": n,
             "finish_reason": "stop"} for s, t, n in (("a", a, n_tokens[0]), ("b", b, n_tokens[1]))]


def from_scratch(store: Store) -> list[tuple]:
    """The rules applied to every judged pair at once, as the old full pass did."""
    groups = judged_groups(store.db)
    return sorted((g["turn_id"], r["source"], r["chosen"], r["rejected"]) for g in groups for r in pair_rows(g))


def indexed(store: Store) -> list[tuple]:
    rows = store.training_pairs("tiny", held_out=False, new=None) + store.training_pairs("tiny", held_out=True, new=None)
    return sorted((r["turn_id"], r["source"], r["chosen"], r["rejected"]) for r in rows)


def test_the_index_follows_every_kind_of_judgment_and_matches_the_rules(store):
    rng = random.Random(7)
    turns = []
    for i in range(40):
        conv = store.start_conversation(f"s{i}", "u", "tiny", "")
        same = rng.random() < 0.1  # two identical replies: no pair from them
        turn, ids = store.record_turn(conv, 0, CONTEXT, "hi", replies(a=f"a{i}", b=f"a{i}" if same else f"b{i}"),
                                      prompt_tokens=3)
        turns.append((turn, ids))
    for _ in range(200):  # judgments in any order, replaced, regenerated
        turn, ids = rng.choice(turns)
        pair = max(r["pair"] for r in store.replies_for_turn(turn))
        live = [r["id"] for r in store.replies_for_turn(turn) if r["pair"] == pair]
        action = rng.random()
        if action < 0.4:
            store.record_choice(turn, pair, rng.choice(["a", "b", "tie", "both_bad"]), "u", "s")
        elif action < 0.7:
            store.record_rating(rng.choice(live), rng.choice(["up", "down"]), "u", "s")
        elif action < 0.85:
            store.record_edit(turn, pair, rng.choice(["mine", "a1", "other"]), "u", "s", n_tokens=4)
        else:
            store.record_regenerated_pair(turn, replies(a=f"new a{turn}", b=f"new b{turn}"))
        assert indexed(store) == from_scratch(store)
    assert indexed(store), "the random judgments made no pair at all: the test would prove nothing"


def test_a_regenerated_pair_leaves_the_index(store):
    conv = store.start_conversation("s", "u", "tiny", "")
    turn, _ = store.record_turn(conv, 0, CONTEXT, "hi", replies(), prompt_tokens=3)
    store.record_choice(turn, 0, "a", "u", "s")
    assert store.training_pairs("tiny", held_out=is_held_out(conv), new=None)
    store.record_regenerated_pair(turn, replies("x", "y"))
    assert store.training_pairs("tiny", held_out=is_held_out(conv), new=None) == []


def test_an_old_database_is_backfilled_when_migrated(tmp_path):
    from sqlite_utils import Database

    from store import migrations

    path = tmp_path / "old.db"
    old = Database(path)  # a database as the release before the index left it
    migrations.apply(old, stop_before="m005_pair_index")
    convs = []
    for i in range(12):
        conv = old["conversations"].insert({"session_id": f"s{i}", "user": "u", "model_id": "tiny",
                                               "system_prompt": "", "simulated": 0}).last_pk
        turn = old["turns"].insert({"conversation_id": conv, "idx": 0, "context_json": "[]",
                                       "user_message": "hi"}).last_pk
        for slot in "ab":
            old["replies"].insert({"turn_id": turn, "pair": 0, "slot": slot, "text": f"{slot}{i}",
                                      "policy_version": "v0", "superseded": 0})
        old["feedback"].insert({"turn_id": turn, "pair": 0, "kind": "choice", "value": "a", "user": "u"})
        convs.append(conv)
    old.conn.close()
    upgraded = Store(path)
    assert "m005_pair_index" in upgraded.stats()["schema"]
    expected = len([c for c in convs if not is_held_out(c)])
    # Old turns have no token counts: their pairs count at any length limit (the trainer measures them).
    assert count_new_pairs(upgraded, "tiny", max_length=1) == expected
    assert indexed(upgraded) == from_scratch(upgraded)
    upgraded.close()


def test_lengths_decide_the_count_at_the_next_rounds_limit(store):
    conv = store.start_conversation("s", "u", "tiny", "")
    while is_held_out(conv):
        conv = store.start_conversation("s", "u", "tiny", "")
    turn, _ = store.record_turn(conv, 0, CONTEXT, "hi", replies(n_tokens=(20, 30)), prompt_tokens=50)
    store.record_choice(turn, 0, "a", "u", "s")
    length = 50 + 30 + TEMPLATE_TAIL_TOKENS
    assert count_new_pairs(store, "tiny", max_length=length) == 1
    assert count_new_pairs(store, "tiny", max_length=length - 1) == 0
    assert store.count_too_long_pairs("tiny", length - 1) == 1
    # A better reply longer than both samples makes its pairs that long.
    store.record_edit(turn, 0, "a long better reply", "u", "s", n_tokens=90)
    assert count_new_pairs(store, "tiny", max_length=length) == 1
    assert count_new_pairs(store, "tiny", max_length=50 + 90 + TEMPLATE_TAIL_TOKENS) == 3


def test_concurrent_votes_keep_the_index_exact(store):
    convs = []
    for i in range(32):
        conv = store.start_conversation(f"s{i}", "u", "tiny", "")
        turn, _ = store.record_turn(conv, 0, CONTEXT, "hi", replies(a=f"a{i}", b=f"b{i}"), prompt_tokens=3)
        convs.append((conv, turn))

    def vote(chunk):
        for _, turn in chunk:
            store.record_choice(turn, 0, "b", "u", "s")
            store.record_choice(turn, 0, "a", "u", "s")  # replaces the first: still one pair

    threads = [threading.Thread(target=vote, args=(convs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count_new_pairs(store, "tiny") == len([c for c, _ in convs if not is_held_out(c)])
    assert indexed(store) == from_scratch(store)
    assert all(chosen.startswith("a") for _, _, chosen, _ in indexed(store))
