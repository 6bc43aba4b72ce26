"""Gold preferences, the simulated annotator and the autopilot's prompt file, on hand-written inputs."""

from __future__ import annotations

import math

import pytest

from playground.sim.annotator import Annotator, AnnotatorConfig, sigmoid
from playground.sim.gold import (
    EARLY_MENTION_BONUS,
    GOLD_NAMES,
    QUESTION_ELSEWHERE_SCORE,
    Gold,
    GoldError,
    concise,
    count_words,
    keyword,
    reply_format,
    resolve_gold,
    sentiment,
)
from playground.sim.prompt_file import DEFAULT_PROMPTS_PATH, PromptFileError, load_prompts

CTX = [{"role": "user", "content": "How do I keep basil alive?"}]
DRAWS = 4000


def within_sampling_error(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def fixed_gold(scores: dict[str, float], scale: float = 1.0) -> Gold:
    """A gold that looks replies up in a table, so a test sets the score gap exactly."""
    return Gold("table", lambda context, reply: scores[reply], scale=scale)


def annotator(scores: dict[str, float], **config) -> Annotator:
    return Annotator(AnnotatorConfig(gold="concise", **config), gold=fixed_gold(scores))


# --- concise --------------------------------------------------------------------------------------------

def test_count_words_treats_contractions_numbers_and_hyphens_as_one_word():
    assert count_words("Don't pay 3.14 for a well-known pie!") == 7
    assert count_words("- item one\n- item two") == 4
    assert count_words("") == 0


def test_concise_is_zero_at_the_target_and_a_log_ratio_away_from_it():
    gold = concise(target_words=3)
    assert gold.score(CTX, "Water it daily.") == 0.0
    assert gold.score(CTX, "Water it daily, please.") == pytest.approx(-math.log(5 / 4))
    assert gold.score(CTX, "Water.") == pytest.approx(-math.log(2))  # (1 + 1) / (3 + 1) = 1/2
    assert gold.score(CTX, "") == pytest.approx(-math.log(4))
    seven = "one two three four five six seven"
    assert gold.score(CTX, seven) == pytest.approx(-math.log(2))  # (7 + 1) / 4: double is as bad as half


def test_concise_prefers_the_shorter_of_two_long_replies_by_the_same_margin_at_any_length():
    gold = concise()  # target 25
    words = lambda n: " ".join(["word"] * n)  # noqa: E731
    gap_long = gold.score(CTX, words(120)) - gold.score(CTX, words(180))
    gap_short = gold.score(CTX, words(40)) - gold.score(CTX, words(60))
    assert gap_long > 0 and gap_short > 0
    assert gap_long == pytest.approx(math.log(181 / 121))
    assert gap_short == pytest.approx(math.log(61 / 41))


# --- keyword --------------------------------------------------------------------------------------------

def test_keyword_scores_presence_plus_a_small_bonus_for_an_early_mention():
    gold = keyword(word="banana")
    assert gold.score(CTX, "banana bread is nice") == pytest.approx(1 + EARLY_MENTION_BONUS)
    reply = "Try a Banana."
    assert gold.score(CTX, reply) == pytest.approx(1 + EARLY_MENTION_BONUS * (1 - 6 / len(reply)))
    assert gold.score(CTX, "No fruit here.") == 0.0
    assert gold.score(CTX, "") == 0.0


def test_keyword_is_case_insensitive_and_matches_whole_words_only():
    gold = keyword(word="banana")
    assert gold.score(CTX, "BANANA!") > 1
    assert gold.score(CTX, "(banana)") > 1
    assert gold.score(CTX, "bananas are great") == 0.0
    assert gold.score(CTX, "a bananabread recipe") == 0.0
    assert gold.score(CTX, "unbanana") == 0.0


def test_keyword_phrases_match_across_whitespace_and_punctuation_keywords_work():
    assert keyword(word="ice cream").score(CTX, "I love ice\n  cream") > 1
    assert keyword(word="ice cream").score(CTX, "ice creamery") == 0.0
    assert keyword(word="C++").score(CTX, "Learn C++ first") > 1


# --- sentiment ------------------------------------------------------------------------------------------

def test_sentiment_is_vaders_compound_and_orders_replies_by_positivity():
    gold = sentiment()
    happy = gold.score(CTX, "I love this, it is great!")
    neutral = gold.score(CTX, "The pot is on the table.")
    sad = gold.score(CTX, "This is terrible and I hate it.")
    assert happy == pytest.approx(0.8622, abs=1e-4)  # VADER 3.3.2's own number for this sentence
    assert neutral == 0.0 and gold.score(CTX, "") == 0.0
    assert -1 <= sad < neutral < happy <= 1


def test_sentiment_per_sentence_averages_so_a_long_reply_does_not_saturate():
    text = "I love it. It is great. The box is brown. The box is square."
    whole, mean = sentiment().score(CTX, text), sentiment(per_sentence=True).score(CTX, text)
    assert whole > 0.8 and 0 < mean < whole


# --- format ---------------------------------------------------------------------------------------------

def test_format_bullets_is_the_fraction_of_lines_that_are_list_items():
    gold = reply_format(shape="bullets")
    assert gold.score(CTX, "- sun\n* water\n• soil\n1. pinch\n2) repot") == 1.0
    assert gold.score(CTX, "Here is how:\n\n- sun\n- water\n- soil") == 0.75  # blank lines do not count
    assert gold.score(CTX, "**Sun** matters.\n-5 degrees kills it.\n---") == 0.0  # not list items
    assert gold.score(CTX, "Just one paragraph.") == 0.0
    assert gold.score(CTX, "") == 0.0


def test_format_question_wants_the_reply_to_end_with_a_question():
    gold = reply_format(shape="question")
    assert gold.score(CTX, "Water it. Want more tips?") == 1.0
    assert gold.score(CTX, 'Ask yourself: "is it dry?"') == 1.0
    assert gold.score(CTX, "Ready to start?**\n") == 1.0
    assert gold.score(CTX, "Is it dry? Then water it.") == QUESTION_ELSEWHERE_SCORE
    assert gold.score(CTX, "Water it.") == 0.0


# --- registry and parser --------------------------------------------------------------------------------

def test_resolve_gold_builds_each_builtin_with_defaults_and_parameters():
    assert set(GOLD_NAMES) == {"concise", "keyword", "sentiment", "format"}
    assert resolve_gold("concise").params == {"target_words": 25}
    gold = resolve_gold(" concise:target_words=40 ")
    assert (gold.name, gold.params["target_words"], gold.spec) == ("concise", 40, "concise:target_words=40")
    assert resolve_gold("keyword:word=ice cream").score(CTX, "ice cream") > 1
    assert resolve_gold("sentiment:per_sentence=yes").params == {"per_sentence": True}
    assert resolve_gold("format:shape=question").score(CTX, "Ok?") == 1.0
    for spec in ("concise:target_words=40", "keyword:word=banana", "sentiment:per_sentence=true",
                 "format:shape=bullets"):
        assert resolve_gold(spec).spec == spec  # the spec round-trips, for provenance


def test_resolve_gold_imports_a_user_function():
    gold = resolve_gold("tests.gold_example:mentions_user_words")
    assert gold.name == "tests.gold_example:mentions_user_words" and gold.scale == 1.0
    assert gold.score(CTX, "Keep basil alive with sun.") == pytest.approx(3 / 6)
    assert resolve_gold("tests.gold_example:Scorers.length").score(CTX, "abc") == 3.0


@pytest.mark.parametrize("spec, message", [
    ("consise", "Did you mean 'concise'"),
    ("nonsense", "Known: concise:target_words=25"),
    ("", "non-empty string"),
    ("concise:target=40", "unknown parameter 'target'; concise takes target_words"),
    ("concise:target_words=forty", "must be a whole number, got 'forty'"),
    ("concise:target_words=0", "target_words must be an integer from 1"),
    ("concise:target_words=4,target_words=5", "given twice"),
    ("concise:40", "is not name=value"),
    ("keyword:word=", "non-empty word or phrase"),
    ("sentiment:per_sentence=maybe", "must be true or false, got 'maybe'"),
    ("format:shape=table", "shape must be one of bullets, question"),
    ("tests.no_such_module:f", "could not import module 'tests.no_such_module'"),
    ("tests.gold_example:missing", "has no 'missing'; its functions: "),
    ("tests.gold_example:NOT_A_FUNCTION", "is a int, not a function"),
    ("tests.gold_example:mentions_user_words:x=1", "parameters are for the built-in golds only"),
    ("tests.gold_example:returns_text", "returned 'good' (str), not a number"),
    ("tests.gold_example:returns_nan", "returned nan; a gold score must be finite"),
    ("tests.gold_example:returns_inf", "returned inf"),
    ("tests.gold_example:fails_on_empty", "raised ZeroDivisionError"),
])
def test_resolve_gold_refuses_bad_specs_before_anything_runs(spec, message):
    with pytest.raises(GoldError) as err:
        resolve_gold(spec)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_a_gold_that_goes_bad_at_run_time_raises_a_gold_error():
    gold = Gold("flaky", lambda context, reply: float("nan") if reply == "bad" else 1.0)
    assert gold.score(CTX, "fine") == 1.0
    with pytest.raises(GoldError, match="must be finite"):
        gold.score(CTX, "bad")


# --- annotator ------------------------------------------------------------------------------------------

def test_annotator_config_names_bad_values():
    for bad, message in [({"flip_rate": 0.7}, "flip_rate must be in [0, 0.5], got 0.7"),
                         ({"tau": 0}, "tau must be a finite number > 0"),
                         ({"tau": float("nan")}, "got nan"),
                         ({"position_bias": 1.5}, "position_bias must be in [-1, 1], got 1.5"),
                         ({"tie_margin": -0.1}, "tie_margin must be a finite number >= 0, got -0.1"),
                         ({"seed": 1.5}, "seed must be an integer, got 1.5"),
                         ({"gold": ""}, "gold must be a gold spec")]:
        with pytest.raises(ValueError) as err:
            AnnotatorConfig(**{"gold": "concise", **bad})
        assert message in str(err.value)


def test_annotator_config_defaults_and_names():
    config = AnnotatorConfig(gold="concise:target_words=40", seed=1)
    assert (config.tau, config.flip_rate, config.position_bias, config.tie_margin) == (None, 0.25, 0.0, 0.0)
    assert config.name == "sim-concise-1"
    assert AnnotatorConfig(gold="tests.gold_example:mentions_user_words").name == "sim-mentions_user_words-0"
    assert AnnotatorConfig(gold="concise", name="alice").name == "alice"


def test_annotator_defaults_tau_to_the_gold_scale_and_refuses_a_bad_gold():
    assert Annotator(AnnotatorConfig(gold="concise")).tau == resolve_gold("concise").scale
    assert Annotator(AnnotatorConfig(gold="concise", tau=2.0)).tau == 2.0
    with pytest.raises(GoldError, match="unknown gold"):
        Annotator(AnnotatorConfig(gold="nope"))


def test_probability_a_is_the_sigmoid_of_the_gap_over_tau():
    ann = annotator({"A": 1.0, "B": 0.4}, tau=0.5)
    assert ann.probability_a(CTX, "A", "B") == pytest.approx(1 / (1 + math.exp(-1.2)))
    assert ann.probability_a(CTX, "B", "A") == pytest.approx(1 / (1 + math.exp(1.2)))
    assert ann.probability_a(CTX, "A", "A") == 0.5
    assert sigmoid(1e6) == 1.0 and sigmoid(-1e6) == 0.0  # no overflow on a huge gap


def test_vote_rate_matches_the_sigmoid_within_sampling_error():
    ann = annotator({"A": 0.3, "B": 0.0}, tau=0.5, flip_rate=0.0, seed=7)
    p = sigmoid(0.3 / 0.5)  # 0.646
    n_a = sum(ann.vote(CTX, "A", "B") == "a" for _ in range(DRAWS))
    assert within_sampling_error(n_a, DRAWS, p)


def test_flip_rate_is_the_chance_of_choosing_the_worse_reply_when_the_gap_is_huge():
    ann = annotator({"good": 100.0, "bad": 0.0}, tau=0.1, flip_rate=0.25, seed=3)
    worse = sum(ann.vote(CTX, "good", "bad") == "b" for _ in range(DRAWS // 2))
    worse += sum(ann.vote(CTX, "bad", "good") == "a" for _ in range(DRAWS // 2))
    assert within_sampling_error(worse, DRAWS, 0.25)
    assert sum(annotator({"good": 100.0, "bad": 0.0}, flip_rate=0.0).vote(CTX, "good", "bad") == "b"
               for _ in range(200)) == 0


def test_flips_and_bias_combine_into_the_final_probability():
    ann = annotator({"A": 0.0, "B": 0.0}, flip_rate=0.2, position_bias=0.1)
    assert ann.final_probability_a(0.9) == pytest.approx(0.8 * 0.9 + 0.2 * 0.1 + 0.1)
    assert ann.final_probability_a(1.0) == pytest.approx(0.9)
    assert annotator({}, position_bias=0.5).final_probability_a(0.9) == 1.0  # clipped


def test_position_bias_shifts_the_a_rate():
    equal = {"x": 0.5, "y": 0.5 + 1e-6}  # a hair apart (the same score would be a tie): P(A) = 0.5 before bias
    for bias in (0.15, -0.15):
        ann = annotator(equal, position_bias=bias, seed=11)
        n_a = sum(ann.vote(CTX, "x", "y") == "a" for _ in range(DRAWS))
        assert within_sampling_error(n_a, DRAWS, 0.5 + bias)


def test_ties_only_when_the_scores_are_closer_than_the_margin():
    ann = annotator({"a1": 1.0, "a2": 1.05, "far": 2.0}, tie_margin=0.1, flip_rate=0.0, seed=5)
    assert {ann.vote(CTX, "a1", "a2") for _ in range(50)} == {"tie"}
    assert "tie" not in {ann.vote(CTX, "a1", "far") for _ in range(200)}
    # tie_margin 0: the same score is still a tie (a person sees no difference and presses Tie; a coin
    # flip would enter training as a preference), floating-point rounding included; a hair apart is not.
    same = annotator({"a1": 1.0, "a2": 1.0, "close": 1.0 + 1e-6, "sum": 0.1 + 0.2, "exact": 0.3}, seed=5)
    assert {same.vote(CTX, "a1", "a2") for _ in range(50)} == {"tie"}
    assert same.vote(CTX, "sum", "exact") == "tie"
    assert "tie" not in {same.vote(CTX, "a1", "close") for _ in range(200)}


def test_votes_are_deterministic_under_a_seed_and_ties_do_not_shift_later_votes():
    scores = {"A": 0.2, "B": 0.0, "C": 0.19}
    pairs = [("A", "B"), ("B", "C"), ("A", "C")] * 30
    one, two = annotator(scores, seed=42), annotator(scores, seed=42)
    votes_one = [one.vote(CTX, a, b) for a, b in pairs]
    assert votes_one == [two.vote(CTX, a, b) for a, b in pairs]
    other = annotator(scores, seed=43)
    assert votes_one != [other.vote(CTX, a, b) for a, b in pairs]
    tying = annotator(scores, seed=42, tie_margin=0.05)
    with_ties = [tying.vote(CTX, a, b) for a, b in pairs]
    assert "tie" in with_ties
    assert all(t == v for t, v in zip(with_ties, votes_one) if t != "tie")


def test_judge_reports_the_scores_and_probabilities_behind_a_vote():
    j = annotator({"A": 1.0, "B": 0.0}, tau=1.0, flip_rate=0.0).judge(CTX, "A", "B")
    assert (j.score_a, j.score_b) == (1.0, 0.0)
    assert j.probability_a == j.final_probability_a == pytest.approx(sigmoid(1.0))
    assert j.choice in ("a", "b")


# --- edits ----------------------------------------------------------------------------------------------

def test_concise_edit_cuts_the_better_reply_at_a_sentence_end():
    ann = Annotator(AnnotatorConfig(gold="concise:target_words=7"))
    long = "Give it sun. Water it when dry. Pinch the flowers off. Repot it in spring."
    longer = long + " " + long
    edited = ann.edit(CTX, longer, long)  # B is shorter, so B is the one edited
    assert edited == "Give it sun. Water it when dry."
    assert ann.edit(CTX, "Give it sun daily.", "Give it sun and water every day.") is None  # B is at target


def test_concise_edit_cuts_mid_sentence_when_the_first_sentence_is_too_long():
    ann = Annotator(AnnotatorConfig(gold="concise:target_words=4"))
    edited = ann.edit(CTX, "Basil likes sun, water, warmth and a lot of love, always.", "x " * 30)
    assert edited == "Basil likes sun, water…"


def test_keyword_format_and_sentiment_edits_score_higher_than_the_better_reply():
    ctx = CTX
    kw = Annotator(AnnotatorConfig(gold="keyword:word=banana"))
    assert kw.edit(ctx, "Water it.", "Sun helps.") == "Banana! Water it."
    assert kw.edit(ctx, "banana first", "no") is None  # already at the best score it can get
    bullets = Annotator(AnnotatorConfig(gold="format:shape=bullets"))
    assert bullets.edit(ctx, "Sun helps. Water it.", "Plain.") == "- Sun helps.\n- Water it."
    question = Annotator(AnnotatorConfig(gold="format:shape=question"))
    assert question.edit(ctx, "Water it.", "Sun.").endswith("?")
    assert question.edit(ctx, "Water it?", "Sun.") is None
    happy = Annotator(AnnotatorConfig(gold="sentiment"))
    assert happy.edit(ctx, "Water it.", "Sun.").startswith("Great question!")


def test_a_user_gold_without_an_edit_offers_none():
    ann = Annotator(AnnotatorConfig(gold="tests.gold_example:mentions_user_words"))
    assert ann.edit(CTX, "basil", "sun") is None


# --- prompts --------------------------------------------------------------------------------------------

def test_the_shipped_prompts_are_many_unique_and_not_empty():
    prompts = load_prompts()
    lines = [line.strip() for line in DEFAULT_PROMPTS_PATH.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(prompts) >= 64 and len(set(lines)) == len(lines) == len(prompts)
    assert all(5 <= len(p) <= 300 for p in prompts)


def test_load_prompts_skips_blanks_comments_and_repeats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n  Why is the sky blue?  \nHi\nHi\n")
    assert load_prompts(path) == ["Why is the sky blue?", "Hi"]


@pytest.mark.parametrize("content, message", [
    ("", "has no prompts"),
    ("\n  \n# only a comment\n", "has no prompts"),
    (b"\xff\xfe bad bytes", "is not UTF-8 text"),
    ("x" * 9000, "line 1: the prompt has 9000 characters"),
])
def test_load_prompts_refuses_an_unusable_file_and_names_it(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptFileError) as err:
        load_prompts(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_load_prompts_refuses_a_missing_file_or_a_folder(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")
    with pytest.raises(PromptFileError, match="is a folder"):
        load_prompts(tmp_path)
    assert issubclass(PromptFileError, ValueError)
