"""Which pair of sampled replies is shown for judgment: the rules on hand-made scores and texts, and
bench.loop's --pair-rule picking, on the tiny model, the pair it claims among the replies it sampled."""

from __future__ import annotations

import json
import re
from itertools import combinations

import pytest

from playground.metrics.pair_choice import (
    PAIR_RULES,
    TIE_MODEL_MAX_VOTES,
    TieModel,
    choose_pair,
    least_separated,
    least_tie,
    most_different,
    pair_features,
    word_distance,
)


def test_least_separated_picks_the_two_closest_rewards():
    assert least_separated([0.0, 5.0, 5.2, -3.0]) == (1, 2)
    assert least_separated([1.0, -1.0]) == (0, 1)
    # Ties (every reward 0, as under v0) go to the lowest indices: the first two, as the random rule.
    assert least_separated([0.0, 0.0, 0.0, 0.0]) == (0, 1)
    assert least_separated([3.0, 1.0, 2.0, 0.0]) == (0, 2)  # |3-2| = |1-2| = |1-0|: the lowest pair wins


def test_most_different_picks_the_two_texts_that_share_fewest_words():
    texts = ["The cat sat on the mat.", "the cat sat on a mat", "Dogs bark loudly at night.", "The cat sat."]
    assert most_different(texts) == (0, 2)  # "dogs bark loudly at night" shares no word with text 0 (first found)
    assert word_distance("Same words here", "here words same") == 0.0
    assert word_distance("", "") == 0.0 and word_distance("a b", "c d") == 1.0
    assert word_distance("a b c", "a b d") == pytest.approx(1 - 2 / 4)


def test_choose_pair_applies_each_rule_and_refuses_what_it_cannot_do():
    texts = ["one two", "one two three", "four five", "one"]
    rewards = [0.5, 2.0, 2.1, -1.0]
    assert choose_pair("random", texts) == (0, 1)
    assert choose_pair("least_separated", texts, rewards) == (1, 2)
    assert choose_pair("most_different", texts) == (0, 2)
    assert set(PAIR_RULES) == {"random", "least_separated", "most_different", "least_tie"}
    with pytest.raises(ValueError, match="unknown pair rule"):
        choose_pair("closest", texts)
    with pytest.raises(ValueError, match="one implicit reward per candidate"):
        choose_pair("least_separated", texts, rewards[:2])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        choose_pair("random", ["alone"])


def test_bench_loop_least_separated_shows_the_pair_the_live_version_separates_least(tiny_model_dir, tmp_path):
    from bench.loop import LoopBench, parse_args
    from playground.evaluation.evaluator import sample_seed

    args = parse_args(["--model", str(tiny_model_dir), "--workdir", str(tmp_path), "--max-new-tokens", "8",
                       "--eval-prompts", "4", "--pair-rule", "least_separated", "--candidates", "3",
                       "--labels-per-round", "8", "--config", '{"epochs": 1}'])
    bench = LoopBench(args)
    # A first round from v0 (every implicit reward 0: the first two candidates), then v1 is live.
    bench.label_and_store(bench.sample_pairs(bench.base, 8, seed=1), "v0", 8)
    summary = bench.train_round(1)
    assert summary["status"] == "succeeded", summary
    target = bench.version_target(summary["version"], tmp_path / "adapters" / summary["version"])

    state = bench.rng.getstate()
    pairs = bench.sample_pairs(target, 6, seed=2)
    # The same prompts and seeds again, every candidate kept: the pair shown must be the closest one.
    bench.rng.setstate(state)
    texts = [bench.rng.choice(bench.train_prompts) for _ in range(6)]
    ids = [bench.render(t) for t in texts]
    groups = bench.sample(target, ids, [[sample_seed(2, i, j) for j in range(3)] for i in range(6)])
    separated = 0
    for (prompt, a, b), text, prompt_ids, group in zip(pairs, texts, ids, groups):
        replies = [g.reply for g in group]
        rewards = bench.implicit_rewards(target, prompt_ids, [r.token_ids for r in replies])
        gaps = {(i, j): abs(rewards[i] - rewards[j]) for i, j in combinations(range(3), 2)}
        shown = [(i, j) for (i, j) in gaps if (replies[i].text, replies[j].text) == (a, b)]
        assert prompt == text and shown, "the pair shown is not two of the sampled candidates"
        assert min(gaps[p] for p in shown) == pytest.approx(min(gaps.values()))
        separated += max(gaps.values()) > min(gaps.values())
    assert separated, "v1 gave every candidate the same implicit reward: the rule was not exercised"


def keyword_votes():
    """Votes of a judge who notices only "here": a pair ties unless exactly one reply says it."""
    replies = ["The answer is here in the text.", "The answer is in the text.", "Look over there, friend.",
               "Look over here, friend.", "It rains a lot in spring.", "Spring brings much rain.",
               "Here is what I think.", "This is what I think.", "Dogs like long walks.", "Cats like short naps.",
               "Start here and go on.", "Start now and go on."]
    def says(text: str) -> bool:
        return "here" in re.findall(r"\w+", text.lower())  # the word: "there" does not count

    return [(a, b, says(a) == says(b)) for a, b in zip(replies[0::2], replies[1::2])]


def test_the_tie_model_learns_which_difference_the_judge_notices_and_least_tie_shows_it():
    votes = keyword_votes()
    assert [t for _, _, t in votes] == [False, False, True, False, True, False]
    model = TieModel.fit(votes)
    assert max(model.weights, key=model.weights.get) == "here"
    candidates = ["A dog runs in the park.", "A dog runs in the yard.", "A dog runs here in the park.",
                  "Dogs run in parks."]
    assert least_tie(candidates, model) == (0, 2)  # the first pair where only one says "here"
    assert model.p_tie(candidates[0], candidates[2]) < model.p_tie(candidates[0], candidates[1])
    assert choose_pair("least_tie", candidates, tie_model=model) == (0, 2)
    # Nothing to learn from yet (no votes, only ties, only non-ties): the first two, as random.
    assert TieModel.fit([]) is None and TieModel.fit([(a, b, True) for a, b, _ in votes]) is None
    assert TieModel.fit([(a, b, False) for a, b, _ in votes]) is None
    assert least_tie(candidates, None) == (0, 1) == choose_pair("least_tie", candidates)
    # Only the latest votes count: older ones beyond the window (all ties here) are not fit.
    window = [("old", "older", True)] * TIE_MODEL_MAX_VOTES
    assert TieModel.fit(window + votes).weights == TieModel.fit(window[len(votes):] + votes).weights
    assert TieModel.fit(votes + window) is None


def test_pair_features_are_what_only_one_reply_has_in_words_and_shape():
    listed, plain = "Steps:\n- boil water\n- add tea", "Boil water, then add tea."
    features = pair_features(listed, plain)
    assert features == pair_features(plain, listed)
    assert "<list>" in features and "steps" in features and "boil" not in features
    assert "<question>" in pair_features("Tea?", "Tea.") and not pair_features("Same words.", "same WORDS")


def test_bench_loop_least_tie_shows_the_pair_its_tie_model_rates_least_likely_to_tie(tiny_model_dir, tmp_path):
    from bench.loop import LoopBench, parse_args
    from playground.evaluation.evaluator import sample_seed

    args = parse_args(["--model", str(tiny_model_dir), "--workdir", str(tmp_path), "--max-new-tokens", "8",
                       "--eval-prompts", "4", "--pair-rule", "least_tie", "--candidates", "4",
                       "--labels-per-round", "8"])
    bench = LoopBench(args)
    first = bench.sample_pairs(bench.base, 8, seed=1)
    assert bench.tie_model is None  # no votes yet: the first two candidates, the very pairs random shows
    plain = LoopBench(parse_args(["--model", str(tiny_model_dir), "--workdir", str(tmp_path / "random"),
                                  "--max-new-tokens", "8", "--eval-prompts", "4", "--labels-per-round", "8"]))
    assert plain.sample_pairs(plain.base, 8, seed=1) == first
    bench.label_and_store(first, "v0", len(first))
    assert [(a, b) for a, b, _ in bench.judged] == [(a, b) for _, a, b in first]
    # The tiny model's replies are random tokens, so the judge's ties are made here: it ties a pair
    # unless the replies differ in length bucket or line count, which the model must learn.
    bench.judged = [(a, b, not any(f.startswith("<") for f in pair_features(a, b))) for a, b, _ in bench.judged]
    bench.judged += keyword_votes()  # both kinds of vote, whatever the random replies were
    state = bench.rng.getstate()
    pairs = bench.sample_pairs(bench.base, 6, seed=2)
    model = bench.tie_model
    assert model is not None and bench.tie_model_top()
    bench.rng.setstate(state)
    texts = [bench.rng.choice(bench.train_prompts) for _ in range(6)]
    groups = bench.sample(bench.base, [bench.render(t) for t in texts],
                          [[sample_seed(2, i, j) for j in range(4)] for i in range(6)])
    for (prompt, a, b), text, group in zip(pairs, texts, groups):
        replies = [g.reply.text for g in group]
        p_tie = {(i, j): model.p_tie(replies[i], replies[j]) for i, j in combinations(range(4), 2)}
        shown = [ij for ij in p_tie if (replies[ij[0]], replies[ij[1]]) == (a, b)]
        assert prompt == text and shown, "the pair shown is not two of the sampled candidates"
        assert min(p_tie[ij] for ij in shown) == pytest.approx(min(p_tie.values()))


def test_bench_pair_ties_counts_each_rules_ties_on_the_tiny_model(tiny_model_dir, capsys):
    from bench.pair_ties import main

    assert main(["--golds", "concise", "keyword:word=the", "--candidates", "2", "3", "--prompts", "6", "--",
                 "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--eval-prompts", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["gold"], r["candidates"]) for r in lines] == [
        ("concise", 2), ("concise", 3), ("keyword:word=the", 2), ("keyword:word=the", 3)]
    for r in lines:
        assert r["prompts"] == 6 and r["second_half"] == 3
        # No rule can do better than the oracle, and with K = 2 every rule shows the only pair there is.
        assert r["ties_oracle"] <= min(r["ties_random"], r["ties_most_different"]) <= 6
        assert 0 <= r["ties_least_tie"] <= 3 and r["ties_random_second_half"] <= r["ties_random"]
        if r["candidates"] == 2:
            assert r["ties_oracle"] == r["ties_random"] == r["ties_most_different"]
            assert r["ties_least_tie"] == r["ties_random_second_half"]
