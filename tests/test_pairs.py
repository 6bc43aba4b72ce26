"""The pair builder on hand-written feedback rows, then on a real store with the tiny tokenizer."""

from __future__ import annotations

import pytest

from trainers.data import build_round, count_new_pairs, is_held_out, pair_specs, tokenize

CONTEXT = [{"role": "user", "content": "hi"}]


def group(feedback, superseded=False, a="reply A", b="reply B", turn=1, conversation=1):
    return {"turn_id": turn, "pair": 0, "conversation_id": conversation, "context": CONTEXT,
            "superseded": superseded, "feedback": feedback,
            "replies": {"a": {"id": 10, "text": a, "policy_version": "v0"},
                        "b": {"id": 11, "text": b, "policy_version": "v0"}}}


def fb(id_, kind, value, reply_id=None):
    return {"id": id_, "kind": kind, "value": value, "reply_id": reply_id}


def triples(groups):
    return sorted((s.chosen, s.rejected, s.source) for s in pair_specs(groups))


def test_choice_a_gives_a_over_b():
    assert triples([group([fb(1, "choice", "a")])]) == [("reply A", "reply B", "choice")]


def test_choice_b_gives_b_over_a_and_keeps_provenance():
    (spec,) = pair_specs([group([fb(1, "choice", "b")])])
    assert (spec.chosen_reply_id, spec.rejected_reply_id, spec.policy_version) == (11, 10, "v0")
    assert spec.feedback_ids == (1,)


def test_tie_and_both_bad_give_nothing():
    assert triples([group([fb(1, "choice", "tie")]), group([fb(2, "choice", "both_bad")], turn=2)]) == []


def test_edit_gives_two_pairs_against_both_samples():
    assert triples([group([fb(1, "edit", "my reply")])]) == [("my reply", "reply A", "edit"),
                                                              ("my reply", "reply B", "edit")]


def test_edit_plus_choice_gives_three_pairs():
    assert len(pair_specs([group([fb(1, "choice", "a"), fb(2, "edit", "mine")])])) == 3


def test_thumbs_up_on_one_and_down_on_the_other_give_a_pair():
    assert triples([group([fb(1, "rating", "up", 11), fb(2, "rating", "down", 10)])]) == [
        ("reply B", "reply A", "ratings")]


def test_a_lone_thumb_or_two_thumbs_the_same_way_give_nothing():
    assert triples([group([fb(1, "rating", "up", 11)])]) == []
    assert triples([group([fb(1, "rating", "down", 10), fb(2, "rating", "down", 11)])]) == []


def test_thumbs_agreeing_with_a_choice_do_not_double_the_pair():
    assert triples([group([fb(1, "choice", "b"), fb(2, "rating", "up", 11), fb(3, "rating", "down", 10)])]) == [
        ("reply B", "reply A", "choice")]


def test_superseded_pairs_give_nothing():
    assert triples([group([fb(1, "choice", "a")], superseded=True)]) == []


def test_identical_replies_give_nothing():
    assert triples([group([fb(1, "choice", "a")], a="same", b="same")]) == []


def test_held_out_split_is_by_conversation_and_about_ten_percent():
    held = [c for c in range(1, 2001) if is_held_out(c)]
    assert 150 < len(held) < 250
    assert held == [c for c in range(1, 2001) if is_held_out(c)]  # fixed across calls (and rounds)


def test_tokenized_pair_prompt_is_a_prefix_and_reply_ends_the_turn(tiny_loaded):
    (spec,) = pair_specs([group([fb(1, "choice", "a")], a="Paris is the capital.", b="I don't know.")])
    pair = tokenize(tiny_loaded.tokenizer, spec)
    tok = tiny_loaded.tokenizer
    assert tok.decode(pair.chosen_ids).startswith("Paris is the capital.")
    assert tok.decode(pair.chosen_ids).rstrip().endswith("<|im_end|>")
    assert tok.decode(pair.prompt_ids).endswith("<|im_start|>assistant\n")


def make_judged_turn(store, conversation_session, choice, a="Paris.", b="London.", simulated=False,
                     versions=("v0", "v0")):
    conv = store.start_conversation(conversation_session, "u", "tiny", "", simulated=simulated)
    rows = []
    for slot, text, version in (("a", a, versions[0]), ("b", b, versions[1])):
        rows.append({"slot": slot, "text": text, "policy_version": version, "model_id": "tiny", "seed": 1,
                     "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "finish_reason": "stop",
                     "n_tokens": 2, "logprob_sum": -1.0, "latency_s": 0.1})
    turn_id, _ = store.record_turn(conv, 0, CONTEXT, "hi", rows)
    store.record_choice(turn_id, 0, choice, "u", "s")
    return conv


def test_round_uses_new_pairs_plus_replay_and_keeps_held_out_apart(store, tiny_loaded):
    convs = [make_judged_turn(store, f"s{i}", "a", a=f"answer {i}") for i in range(30)]
    held = [c for c in convs if is_held_out(c)]
    data = build_round(store, tiny_loaded.tokenizer, "tiny", max_length=512)
    assert data.new_pairs == 30 - len(held) and data.replayed == 0
    assert len(data.held_out) == len(held)
    assert {p.conversation_id for p in data.train}.isdisjoint({p.conversation_id for p in data.held_out})

    # A successful round consumed them: later votes are new, older pairs come back as replay.
    run = store.create_run("dpo", {}, "tiny", "v0", "test")
    store.finish_run(run, "succeeded", max_feedback_id=data.max_feedback_id)
    assert count_new_pairs(store, "tiny") == 0
    fresh = [make_judged_turn(store, f"t{i}", "b") for i in range(5)]
    data2 = build_round(store, tiny_loaded.tokenizer, "tiny", max_length=512, replay_ratio=1.0)
    new_train = len([c for c in fresh if not is_held_out(c)])
    assert data2.new_pairs == new_train and data2.replayed == new_train


def test_too_long_pairs_are_skipped_and_counted(store, tiny_loaded):
    make_judged_turn(store, "long", "a", a="word " * 400)
    data = build_round(store, tiny_loaded.tokenizer, "tiny", max_length=64)
    assert data.train == [] and sum(data.skipped.values()) == 1 and "too_long" in data.skipped


@pytest.mark.parametrize("choice", ["tie", "both_bad"])
def test_a_store_of_only_ties_gives_no_pairs(store, tiny_loaded, choice):
    for i in range(5):
        make_judged_turn(store, f"s{i}", choice)
    assert count_new_pairs(store, "tiny") == 0


def test_simulated_votes_can_be_left_out_of_training(store):
    people = [make_judged_turn(store, f"p{i}", "a") for i in range(20)]
    robots = [make_judged_turn(store, f"r{i}", "a", simulated=True) for i in range(20)]
    in_training = lambda convs: len([c for c in convs if not is_held_out(c)])  # noqa: E731
    assert count_new_pairs(store, "tiny") == in_training(people) + in_training(robots)
    assert count_new_pairs(store, "tiny", include_simulated=False) == in_training(people)


def test_an_arena_pair_is_named_by_both_versions():
    arena = group([fb(1, "choice", "b")])
    arena["replies"]["b"]["policy_version"] = "v3"
    (spec,) = pair_specs([arena])
    assert spec.policy_version == "v0|v3" and spec.chosen == "reply B"


@pytest.mark.parametrize("choice", ["a", "b"])
def test_arena_votes_count_and_train_only_when_included(store, tiny_loaded, choice):
    # An arena turn: one reply from v0, one from v1, shown blind, voted a or b.
    plain = [make_judged_turn(store, f"p{i}", choice) for i in range(12)]
    arena = [make_judged_turn(store, f"a{i}", choice, versions=("v1", "v0")) for i in range(12)]
    in_training = lambda convs: len([c for c in convs if not is_held_out(c)])  # noqa: E731
    assert count_new_pairs(store, "tiny") == in_training(plain)
    assert count_new_pairs(store, "tiny", include_arena=True) == in_training(plain) + in_training(arena)

    left_out = build_round(store, tiny_loaded.tokenizer, "tiny", max_length=512)
    assert left_out.new_pairs == in_training(plain)
    assert {p.policy_version for p in left_out.train + left_out.held_out} == {"v0"}
    assert {p.conversation_id for p in left_out.train}.isdisjoint(arena)
    included = build_round(store, tiny_loaded.tokenizer, "tiny", max_length=512, include_arena=True)
    assert included.new_pairs == in_training(plain) + in_training(arena)
    assert {p.conversation_id for p in included.train if p.policy_version == "v1|v0"} == {
        c for c in arena if not is_held_out(c)}
