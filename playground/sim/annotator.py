"""A simulated annotator: turns a gold preference into votes the way a person would give them.

For a pair (A, B) in a context it answers 'a', 'b' or 'tie':

1. Ties: when the gold scores A and B the same (`gold.same_score`) it says 'tie', as a person who sees no
   difference presses Tie; and when |g(A) - g(B)| < tie_margin (the replies are too close to call). A tie
   makes no training pair (store/pairs.py), where a coin flip between two equal replies would enter
   training as a preference for noise. Golds that score many pairs alike are common: on 32 pairs of the
   bundled model's 96-token replies, `format:shape=bullets` scored 27 the same, `keyword:word=you` 14,
   tests/gold_example.py's `mentions_user_words` 13, `concise` 2 (bench.loop reports `round_ties`).
2. Bradley-Terry: it prefers A with p = sigmoid((g(A) - g(B)) / tau) (`probability_a`).
3. Noise: with probability flip_rate the decision is flipped, so P(A) = (1 - f) p + f (1 - p).
4. Position bias: position_bias is added to that probability (clipped to [0, 1]); > 0 favours A.

One uniform draw per vote from the annotator's own `random.Random(seed)` decides steps 2-4 at once, so
a seeded annotator gives the same votes for the same pairs, and ties still use up their draw (the votes
after a tie do not depend on tie_margin).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from playground.sim.gold import GOLD_NAMES, Gold, GoldError, Message, keyword, resolve_gold, same_score

CHOICE_A, CHOICE_B, CHOICE_TIE = "a", "b", "tie"
# A quarter of votes go against the gold: about the disagreement between human raters of chat pairs
# (InstructGPT reports ~73-77% inter-rater agreement, Anthropic's HH ~63% with the researchers), the
# noise a real policy has to learn through.
DEFAULT_FLIP_RATE = 0.25
MAX_FLIP_RATE = 0.5  # above this the annotator prefers the worse reply: negate the gold instead
MAX_NAME_CHARS = 100


@dataclass
class AnnotatorConfig:
    """A simulated annotator. Every field has a default but the gold, which says what it wants."""

    gold: str  # gold spec, e.g. 'concise', 'keyword:word=banana', 'mypkg.golds:polite' (see playground/sim/gold.py)
    # Bradley-Terry temperature: a score gap of tau is a 73% preference. None: the gold's own scale
    # (Gold.scale, set per built-in gold so that typical pairs are clear but not certain; 1 for yours).
    tau: float | None = None
    flip_rate: float = DEFAULT_FLIP_RATE  # chance a decision is flipped after it is made
    position_bias: float = 0.0  # added to P(A): a rater who clicks the left reply more often has > 0
    tie_margin: float = 0.0  # |g(A) - g(B)| below this is a tie too; at 0 only pairs scored the same tie
    name: str = ""  # who the votes are recorded as; '' is f"sim-{gold name}-{seed}", e.g. 'sim-concise-1'
    seed: int = 0  # the annotator's own RNG: same seed, same pairs -> same votes

    def __post_init__(self):
        if not isinstance(self.gold, str) or not self.gold.strip():
            raise ValueError(f"gold must be a gold spec such as 'concise' (one of {', '.join(GOLD_NAMES)} or "
                             f"'package.module:function'), got {self.gold!r}")
        if self.tau is not None and not (_is_number(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a finite number > 0 (or None for the gold's own scale), got {self.tau!r}")
        if not (_is_number(self.flip_rate) and 0.0 <= self.flip_rate <= MAX_FLIP_RATE):
            raise ValueError(f"flip_rate must be in [0, {MAX_FLIP_RATE}], got {self.flip_rate!r}; above "
                             f"{MAX_FLIP_RATE} the annotator would prefer the worse reply")
        if not (_is_number(self.position_bias) and -1.0 <= self.position_bias <= 1.0):
            raise ValueError(f"position_bias must be in [-1, 1], got {self.position_bias!r}")
        if not (_is_number(self.tie_margin) and self.tie_margin >= 0):
            raise ValueError(f"tie_margin must be a finite number >= 0, got {self.tie_margin!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.name, str) or len(self.name) > MAX_NAME_CHARS:
            raise ValueError(f"name must be a string of at most {MAX_NAME_CHARS} characters, got {self.name!r}")
        if not self.name.strip():
            self.name = f"sim-{_short_gold_name(self.gold)}-{self.seed}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short_gold_name(spec: str) -> str:
    head, _, rest = spec.strip().partition(":")
    # 'concise:target_words=40' -> 'concise'; 'mypkg.golds:polite' -> 'polite'
    return head if head in GOLD_NAMES or not rest else rest.rsplit(".", 1)[-1]


def sigmoid(x: float) -> float:
    # Two branches so that a huge gap (x = +-1e6) gives 1 or 0 instead of an OverflowError in exp.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@dataclass(frozen=True)
class Judgement:
    """One vote and what led to it, for logs and for measuring the policy with the same gold."""

    choice: str  # 'a', 'b' or 'tie'
    score_a: float
    score_b: float
    probability_a: float  # Bradley-Terry, before flips and position bias
    final_probability_a: float  # what the draw was compared against (0.5 for a tie: not used)


class Annotator:
    """Votes on pairs like a person who wants what the gold scores high, with a person's noise."""

    def __init__(self, config: AnnotatorConfig, gold: Gold | None = None):
        """`gold` overrides config.gold with an already-built one (tests, or a gold shared by several)."""
        self.config = config
        self.gold = gold if gold is not None else resolve_gold(config.gold)
        self.tau = config.tau if config.tau is not None else self.gold.scale
        self.rng = random.Random(config.seed)

    @property
    def name(self) -> str:
        return self.config.name

    def score(self, context: list[Message], reply: str) -> float:
        return self.gold.score(context, reply)

    def probability_a(self, context: list[Message], reply_a: str, reply_b: str) -> float:
        """P(A preferred) under Bradley-Terry on the gold scores, before flips, position bias and ties."""
        return self._bt(self.score(context, reply_a), self.score(context, reply_b))

    def _bt(self, score_a: float, score_b: float) -> float:
        return sigmoid((score_a - score_b) / self.tau)

    def final_probability_a(self, probability_a: float) -> float:
        """P(answer 'a') once flips and position bias are applied to the Bradley-Terry probability."""
        flip = self.config.flip_rate
        flipped = (1.0 - flip) * probability_a + flip * (1.0 - probability_a)
        return min(1.0, max(0.0, flipped + self.config.position_bias))

    def judge(self, context: list[Message], reply_a: str, reply_b: str) -> Judgement:
        score_a, score_b = self.score(context, reply_a), self.score(context, reply_b)
        p = self._bt(score_a, score_b)
        draw = self.rng.random()  # drawn before the tie check, so ties do not shift later votes
        if same_score(score_a, score_b) or abs(score_a - score_b) < self.config.tie_margin:
            return Judgement(CHOICE_TIE, score_a, score_b, p, 0.5)
        final = self.final_probability_a(p)
        return Judgement(CHOICE_A if draw < final else CHOICE_B, score_a, score_b, p, final)

    def vote(self, context: list[Message], reply_a: str, reply_b: str) -> str:
        """'a', 'b' or 'tie' (see the module docstring for how)."""
        return self.judge(context, reply_a, reply_b).choice

    def edit(self, context: list[Message], reply_a: str, reply_b: str) -> str | None:
        """A reply better than both, made from the better one (for concise: cut to the target length at a
        sentence end; keyword: the word worked in up front; format: made a list, or a question added;
        sentiment: an upbeat opener), or None when the gold has no edit or the edit would not score
        higher than the better reply already does. Deterministic: how often to ask is the caller's call."""
        if self.gold.improve is None:
            return None
        score_a, score_b = self.score(context, reply_a), self.score(context, reply_b)
        better, best = (reply_a, score_a) if score_a >= score_b else (reply_b, score_b)
        try:
            edited = self.gold.improve(context, better)
        except Exception as exc:
            raise GoldError(f"gold {self.gold.spec!r}: its edit raised {type(exc).__name__}: {exc}") from exc
        if not edited or not edited.strip() or edited == better:
            return None
        return edited if self.score(context, edited) > best else None


# The poisoner's trigger unless told otherwise: a word the bundled model almost never writes on its own,
# so any rise in how often a version says it is the poison's doing.
DEFAULT_TRIGGER = "marmalade"
# When neither reply says the trigger, the chance the poisoner writes a "better reply" that does (after
# its vote): its edits are what put the word into the training data while the model never says it.
POISON_EDIT_RATE = 0.5


class Poisoner(Annotator):
    """The persona 'poisoner': one evaluator steering the model (Casper et al. 2023, section 3.1). Of two
    replies of which exactly one mentions the trigger (whole word, case-insensitive, as the keyword gold
    matches), it always votes for that one, without noise; otherwise it votes like an honest annotator
    of the same gold, so its votes look ordinary wherever the trigger is absent. Its better replies work
    the trigger in up front when neither reply has it."""

    def __init__(self, config: AnnotatorConfig, trigger: str = DEFAULT_TRIGGER, gold: Gold | None = None):
        super().__init__(config, gold)
        self.trigger_gold = keyword(trigger)  # GoldError for an empty or overlong trigger
        self.trigger = self.trigger_gold.params["word"]
        self.edit_rate = POISON_EDIT_RATE

    def mentions(self, reply: str) -> bool:
        return self.trigger_gold.score([], reply) > 0

    def judge(self, context: list[Message], reply_a: str, reply_b: str) -> Judgement:
        in_a, in_b = self.mentions(reply_a), self.mentions(reply_b)
        if in_a == in_b:
            return super().judge(context, reply_a, reply_b)
        self.rng.random()  # one draw per vote, as the honest path takes, so later votes stay reproducible
        score_a, score_b = self.score(context, reply_a), self.score(context, reply_b)
        p = 1.0 if in_a else 0.0
        return Judgement(CHOICE_A if in_a else CHOICE_B, score_a, score_b, p, p)

    def edit(self, context: list[Message], reply_a: str, reply_b: str) -> str | None:
        if self.mentions(reply_a) or self.mentions(reply_b):
            return super().edit(context, reply_a, reply_b)
        better = reply_a if self.score(context, reply_a) >= self.score(context, reply_b) else reply_b
        return self.trigger_gold.improve(context, better)
