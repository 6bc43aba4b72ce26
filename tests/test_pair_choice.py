"""Which pair of sampled replies is shown for judgment: the rules on hand-made scores and texts, and
bench.loop's --pair-rule picking, on the tiny model, the pair it claims among the replies it sampled."""

from __future__ import annotations

from itertools import combinations

import pytest

from playground.metrics.pair_choice import PAIR_RULES, choose_pair, least_separated, most_different, word_distance


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
    assert set(PAIR_RULES) == {"random", "least_separated", "most_different"}
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
    bench.label_and_store(bench.sample_pairs(bench.base, 8, seed=1), "v0")
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
