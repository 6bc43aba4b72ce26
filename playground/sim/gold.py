"""Gold preferences: functions that score a (context, reply) with a float, higher = preferred.

A simulated annotator (`playground/sim/annotator.py`) votes by comparing two replies' gold scores, so a
gold function stands in for "what this person wants", and the same score measures whether the policy
learnt it. `context` is the conversation up to and including the user's message, as chat messages
`[{"role": "user" | "assistant" | "system", "content": str}, ...]`; `reply` is the assistant's text.

Built-in golds, named by a spec string `name[:param=value,param=value]`:

    concise                  -|log((words + 1) / (target_words + 1))|: 0 at the target, smooth either side
    concise:target_words=40
    keyword:word=banana      1 + 0.25 * (how early it appears) when the word or phrase is there, else 0
    sentiment                VADER compound score of the reply, in [-1, 1]
    sentiment:per_sentence=true   the mean compound of its sentences (does not saturate on long replies)
    format:shape=bullets     fraction of non-empty lines that are list items (`-`, `*`, `•`, `1.`)
    format:shape=question    1 when the reply ends with a question, 0.25 when it asks one elsewhere, else 0

Or your own function, `package.module:function`, imported with importlib: it takes (context, reply)
and returns a number. A score gap of about 1 should then be a clear preference (else set the
annotator's tau). Every gold is probed on sample replies when it is resolved, so a broken one stops
the run before anything starts rather than in the middle of it.

    >>> gold = resolve_gold("concise:target_words=10")
    >>> gold.score([{"role": "user", "content": "Hi"}], "Hello! How can I help you today?")
    -0.318...
"""

from __future__ import annotations

import difflib
import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

Message = Mapping[str, str]
ScoreFn = Callable[[list[Message], str], float]
# Rewrites a reply into one the gold likes better, or None when it has nothing useful to offer.
ImproveFn = Callable[[list[Message], str], "str | None"]

DEFAULT_TARGET_WORDS = 25  # SmolLM2-135M-Instruct writes ~100-200 words: far enough that the policy has to move
MAX_TARGET_WORDS = 10_000
# A keyword found at the very start scores 1 + EARLY_MENTION_BONUS, at the very end 1 (absent: 0); the
# bonus keeps pairs that both mention it distinguishable, so the signal does not vanish once learnt.
EARLY_MENTION_BONUS = 0.25
MAX_KEYWORD_CHARS = 200
# Asking a question somewhere other than the end is partway to what `format:shape=question` wants.
QUESTION_ELSEWHERE_SCORE = 0.25
FORMAT_SHAPES = ("bullets", "question")

# Score gaps of about this size are a clear but not certain preference for each built-in gold; the
# annotator's default Bradley-Terry temperature (sigmoid(gap / scale): a gap of one scale is 73%).
# concise: 120 vs 180 words is a log-ratio gap of 0.40, i.e. 83% for the shorter before flips.
CONCISE_SCALE = 0.25
KEYWORD_SCALE = 0.25  # mentioned vs not (gap >= 1) is 98%; only an earlier mention (gap <= 0.25) is 73%
SENTIMENT_SCALE = 0.2  # compound 0.9 vs 0.6 is 82%
FORMAT_SCALE = 0.25  # half the lines bulleted vs a fifth is 77%
USER_SCALE = 1.0  # a user function's scale is unknown: its author sets the annotator's tau when 1 is wrong
# Two scores this close are the same score: a gold that cannot tell two replies apart (the same word count
# under concise, neither reply mentioning the keyword) returns equal floats, give or take the rounding of
# a user function's arithmetic. The annotator ties such a pair, and a gold that scores every reply of a
# sample the same is refused (`check_tells_apart`).
SAME_SCORE_REL_TOL = 1e-9
SAME_SCORE_ABS_TOL = 1e-12

# The resolve-time probe: a realistic conversation and replies every gold must score to a finite number.
PROBE_CONTEXT: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "How do I keep basil alive on a windowsill?"},
)
PROBE_REPLIES: tuple[str, ...] = (
    "Give it at least six hours of sun, water when the top of the soil is dry, and pinch off the flower "
    "buds so it keeps making leaves. Would you like tips on pots?",
    "Here is what helps:\n- A south-facing window\n- Water at the base, not the leaves\n* Pinch the tops\n"
    "1. Repot when roots circle",
    "",  # the model can stop at once; a gold that fails on an empty reply would fail mid-run
)

WORD_RE = re.compile(r"\w+(?:['’.\-]\w+)*")  # "don't", "3.14" and "well-known" are one word each
BULLET_RE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")  # "**bold**", "-5°C" and "---" are not list items
SENTENCE_END_RE = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)|\n")
# Closing characters that may follow a final question mark ("...right?" or "**Ready?**").
TRAILING_CLOSERS = "\"'”’)]*_ \t\n"


class GoldError(ValueError):
    """A gold spec that cannot be used, or a gold that returned something other than a finite number;
    the message says which and what to do instead."""


@dataclass(frozen=True)
class Gold:
    """A resolved gold preference: `score(context, reply)` is the number the annotator compares."""

    name: str  # 'concise', 'keyword', ... or 'module:function'
    fn: ScoreFn
    params: Mapping[str, object] = field(default_factory=dict)
    scale: float = USER_SCALE  # a score gap that is a clear but not certain preference (annotator's tau)
    improve: ImproveFn | None = None  # optional: a better reply, for the annotator's occasional edits

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise GoldError(f"a gold needs a non-empty name, got {self.name!r}")
        if not callable(self.fn):
            raise GoldError(f"gold {self.name!r}: fn must be callable, got {self.fn!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise GoldError(f"gold {self.name!r}: scale must be a finite number > 0, got {self.scale!r}")
        # Read-only, so one Gold shared by several annotators cannot be changed under them.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def spec(self) -> str:
        """The canonical spec string: `resolve_gold(gold.spec)` builds the same gold (for provenance)."""
        if not self.params:
            return self.name
        values = ",".join(f"{k}={_format_value(v)}" for k, v in self.params.items())
        return f"{self.name}:{values}"

    def score(self, context: list[Message], reply: str) -> float:
        if not isinstance(reply, str):
            raise TypeError(f"gold {self.name!r}: reply must be a str, got {type(reply).__name__}")
        try:
            value = self.fn(context, reply)
        except Exception as exc:
            raise GoldError(f"gold {self.spec!r} raised {type(exc).__name__}: {exc} "
                            f"(on a reply of {len(reply)} characters); fix the function") from exc
        return _as_score(value, self.spec)


def _as_score(value: object, spec: str) -> float:
    # bool is a Real (a True/False gold is fine); numpy scalars register as Real too.
    if not isinstance(value, numbers.Real):
        raise GoldError(f"gold {spec!r} returned {value!r} ({type(value).__name__}), not a number; "
                        "a gold function must return an int or float")
    number = float(value)
    if not math.isfinite(number):
        raise GoldError(f"gold {spec!r} returned {number!r}; a gold score must be finite (no NaN or inf)")
    return number


def same_score(a: float, b: float) -> bool:
    """True when a gold gave two replies the same score (within SAME_SCORE_REL_TOL / SAME_SCORE_ABS_TOL)."""
    return math.isclose(a, b, rel_tol=SAME_SCORE_REL_TOL, abs_tol=SAME_SCORE_ABS_TOL)


def check_tells_apart(gold: Gold, scores: Sequence[float], what: str) -> None:
    """Raise GoldError when `gold` gave every one of `scores` (two or more, of `what`: e.g. "of v0's
    replies") the same score. Its annotator would tie every pair of such replies, so a loop would get no
    labels to learn from; an annotator that broke the ties at random would teach it noise. Called on a
    sample of the policy's own replies, not at resolve time: `keyword:word=zebra` scores every probe
    reply 0 and is a fine gold for a model that sometimes says zebra."""
    if len(scores) >= 2 and all(same_score(s, scores[0]) for s in scores):
        raise GoldError(f"gold {gold.spec!r} gives all {len(scores)} {what} the same score ({scores[0]:g}): its "
                        "annotator would tie every pair, so there are no labels to learn from. Pick a gold that "
                        "tells this model's replies apart (for keyword, a word the model sometimes uses)")


def _format_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# --- text helpers, shared by the golds and their edits -------------------------------------------------

def count_words(text: str) -> int:
    return len(WORD_RE.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences and lines of `text`, stripped, empty ones dropped."""
    pieces, start = [], 0
    for match in SENTENCE_END_RE.finditer(text):
        pieces.append(text[start:match.end()])
        start = match.end()
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def _keyword_pattern(word: str) -> re.Pattern:
    # Lookarounds instead of \b, so a keyword that starts or ends with punctuation ("C++") still works;
    # any run of whitespace matches the spaces of a phrase ("ice  cream" across a line break).
    body = r"\s+".join(re.escape(part) for part in word.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


# --- the built-in golds --------------------------------------------------------------------------------

def concise(target_words: int = DEFAULT_TARGET_WORDS) -> Gold:
    """-|log((words + 1) / (target_words + 1))|: 0 at the target, -log 2 = -0.69 at about double or half.

    A log ratio, not a difference, so 120 vs 180 words is as clear a preference as 20 vs 30: the signal
    stays the same size as the policy gets shorter. +1 keeps an empty reply finite (-log(target + 1)).
    """
    if isinstance(target_words, bool) or not isinstance(target_words, int) or not 1 <= target_words <= MAX_TARGET_WORDS:
        raise GoldError(f"concise: target_words must be an integer from 1 to {MAX_TARGET_WORDS}, got {target_words!r}")

    def score(context: list[Message], reply: str) -> float:
        return -abs(math.log((count_words(reply) + 1) / (target_words + 1)))

    def improve(context: list[Message], reply: str) -> str | None:
        return _truncate_to_words(reply, target_words)

    return Gold("concise", score, {"target_words": target_words}, CONCISE_SCALE, improve)


def _truncate_to_words(reply: str, target_words: int) -> str | None:
    """The reply cut to at most `target_words` words: at the last sentence end that keeps at least half
    of them, else mid-sentence with an ellipsis. None when it is already short enough."""
    words = list(WORD_RE.finditer(reply))
    if len(words) <= target_words:
        return None
    limit = words[target_words].start()  # cut anywhere before the first word over the target
    ends = [m.end() for m in SENTENCE_END_RE.finditer(reply, 0, limit)]
    for end in reversed(ends):
        if count_words(reply[:end]) >= target_words / 2:
            return reply[:end].rstrip()
    return reply[:words[target_words - 1].end()].rstrip(",;:—–- ") + "…"


def keyword(word: str = "banana") -> Gold:
    """1 + EARLY_MENTION_BONUS * (1 - first position / length) when `word` appears, else 0.

    Case-insensitive and whole-word: "banana" matches "Banana," but not "bananas" or "bananabread";
    a phrase matches across any whitespace. The bonus for an early mention is small next to the 1 for
    mentioning it at all, so presence dominates and a pair that both mention it still differs a little.
    """
    if not isinstance(word, str) or not word.strip() or len(word) > MAX_KEYWORD_CHARS:
        raise GoldError(f"keyword: word must be a non-empty word or phrase of at most {MAX_KEYWORD_CHARS} "
                        f"characters, e.g. keyword:word=banana; got {word!r}")
    word = " ".join(word.split())
    pattern = _keyword_pattern(word)

    def score(context: list[Message], reply: str) -> float:
        match = pattern.search(reply)
        if match is None:
            return 0.0
        return 1.0 + EARLY_MENTION_BONUS * (1.0 - match.start() / len(reply))

    def improve(context: list[Message], reply: str) -> str | None:
        # Up front, where the bonus is largest: the edit is worth more than the better reply as it stands.
        opener = word[0].upper() + word[1:]
        return f"{opener}! {reply.lstrip()}" if reply.strip() else f"{opener}!"

    return Gold("keyword", score, {"word": word}, KEYWORD_SCALE, improve)


def sentiment(per_sentence: bool = False) -> Gold:
    """VADER's compound score of the reply, in [-1, 1] (vaderSentiment 3.3.2, lexicon shipped in the wheel).

    The compound normalises a sum of word valences, so a long reply with a few positive words already
    scores ~0.95 and two long replies look alike; `per_sentence=true` scores the mean of the sentences'
    compounds instead, which keeps length out of it. An empty reply scores 0 (neutral).
    """
    if not isinstance(per_sentence, bool):
        raise GoldError(f"sentiment: per_sentence must be true or false, got {per_sentence!r}")
    # Imported and built here, not at import time: the lexicon is read once per gold, never per module.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def compound(text: str) -> float:
        return analyzer.polarity_scores(text)["compound"]

    def score(context: list[Message], reply: str) -> float:
        if not per_sentence:
            return compound(reply)
        sentences = split_sentences(reply)
        return sum(compound(s) for s in sentences) / len(sentences) if sentences else 0.0

    def improve(context: list[Message], reply: str) -> str | None:
        # The sycophantic opener a sentiment gold rewards: which is the point of showing it.
        return f"Great question! {reply.lstrip()}" if reply.strip() else None

    return Gold("sentiment", score, {"per_sentence": per_sentence}, SENTIMENT_SCALE, improve)


def reply_format(shape: str = "bullets") -> Gold:
    """'bullets': the fraction of non-empty lines that are list items (`-`, `*`, `•` or `1.`/`1)` then a
    space), so a one-line intro before a list of four scores 0.8. 'question': 1 when the reply ends with
    a question (closing quotes or markdown after the '?' allowed), QUESTION_ELSEWHERE_SCORE when it asks
    one elsewhere, else 0. Registered as `format`."""
    if shape not in FORMAT_SHAPES:
        raise GoldError(f"format: shape must be one of {', '.join(FORMAT_SHAPES)} "
                        f"(e.g. format:shape=bullets); got {shape!r}")

    def bullets(context: list[Message], reply: str) -> float:
        lines = [line for line in reply.splitlines() if line.strip()]
        return sum(1 for line in lines if BULLET_RE.match(line)) / len(lines) if lines else 0.0

    def question(context: list[Message], reply: str) -> float:
        if reply.rstrip(TRAILING_CLOSERS).endswith("?"):
            return 1.0
        return QUESTION_ELSEWHERE_SCORE if "?" in reply else 0.0

    def improve_bullets(context: list[Message], reply: str) -> str | None:
        items = [s for line in reply.splitlines() if line.strip()
                 for s in ([line.strip()] if BULLET_RE.match(line) else split_sentences(line))]
        if not items:
            return None
        return "\n".join(item if BULLET_RE.match(item) else f"- {item}" for item in items)

    def improve_question(context: list[Message], reply: str) -> str | None:
        if not reply.strip():
            return None
        return f"{reply.rstrip()}\n\nWould you like me to go into more detail on any of this?"

    if shape == "bullets":
        return Gold("format", bullets, {"shape": shape}, FORMAT_SCALE, improve_bullets)
    return Gold("format", question, {"shape": shape}, FORMAT_SCALE, improve_question)


# --- the registry and the spec parser ------------------------------------------------------------------

@dataclass(frozen=True)
class BuiltinGold:
    factory: Callable[..., Gold]
    params: Mapping[str, type]  # parameter name -> type its string value is parsed as
    example: str  # shown in error messages


BUILTIN_GOLDS: Mapping[str, BuiltinGold] = MappingProxyType({
    "concise": BuiltinGold(concise, {"target_words": int}, f"concise:target_words={DEFAULT_TARGET_WORDS}"),
    "keyword": BuiltinGold(keyword, {"word": str}, "keyword:word=banana"),
    "sentiment": BuiltinGold(sentiment, {"per_sentence": bool}, "sentiment:per_sentence=true"),
    "format": BuiltinGold(reply_format, {"shape": str}, "format:shape=bullets|question"),
})
GOLD_NAMES = tuple(BUILTIN_GOLDS)
TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")


def known_golds() -> str:
    """One line listing what `resolve_gold` accepts, for error messages and --help."""
    return ", ".join(b.example for b in BUILTIN_GOLDS.values()) + ", or your own 'package.module:function'"


def resolve_gold(spec: str) -> Gold:
    """A `Gold` from a spec string (see the module docstring), probed on sample replies.

    Raises GoldError, before anything has run, for an unknown name, a module:function that does not
    import or is not callable, bad parameter names or values, and a gold that raises or returns a
    non-number, NaN or inf on the probe.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise GoldError(f"gold spec must be a non-empty string such as 'concise'; got {spec!r}. "
                        f"Known: {known_golds()}")
    spec = spec.strip()
    head, sep, rest = spec.partition(":")
    head = head.strip()
    if head in BUILTIN_GOLDS:
        gold = _build_builtin(head, rest if sep else "", spec)
    elif sep:
        gold = _import_user_gold(head, rest.strip(), spec)
    else:
        close = difflib.get_close_matches(head, GOLD_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise GoldError(f"unknown gold {head!r}.{hint} Known: {known_golds()}")
    for reply in PROBE_REPLIES:
        gold.score([dict(m) for m in PROBE_CONTEXT], reply)
    return gold


def _build_builtin(name: str, params_text: str, spec: str) -> Gold:
    builtin = BUILTIN_GOLDS[name]
    params: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in params_text.split(","))):
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or not key:
            raise GoldError(f"gold {spec!r}: parameter {item!r} is not name=value; e.g. {builtin.example}")
        if key not in builtin.params:
            raise GoldError(f"gold {spec!r}: unknown parameter {key!r}; {name} takes "
                            f"{', '.join(builtin.params)} (e.g. {builtin.example})")
        if key in params:
            raise GoldError(f"gold {spec!r}: parameter {key!r} is given twice")
        params[key] = _parse_value(raw, builtin.params[key], f"gold {spec!r}: {key}")
    return builtin.factory(**params)  # the factory checks the values' ranges and raises GoldError


def _parse_value(raw: str, kind: type, where: str) -> object:
    if kind is bool:
        if raw.lower() in TRUE_WORDS:
            return True
        if raw.lower() in FALSE_WORDS:
            return False
        raise GoldError(f"{where} must be true or false, got {raw!r}")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise GoldError(f"{where} must be a whole number, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise GoldError(f"{where} must be a number, got {raw!r}") from None
    return raw


def _import_user_gold(module_name: str, attr_path: str, spec: str) -> Gold:
    if not module_name or not attr_path or ":" in attr_path or "=" in attr_path:
        raise GoldError(f"gold {spec!r} is not 'package.module:function' (parameters are for the built-in "
                        f"golds only; wrap yours in a function that takes (context, reply)). "
                        f"Known: {known_golds()}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or any error raised while the module runs
        raise GoldError(f"gold {spec!r}: could not import module {module_name!r} ({type(exc).__name__}: "
                        f"{exc}); check the name and that its folder is on PYTHONPATH") from exc
    fn: object = module
    for part in attr_path.split("."):
        if not hasattr(fn, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise GoldError(f"gold {spec!r}: module {module_name!r} has no {attr_path!r}; "
                            f"its functions: {', '.join(public) or 'none'}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise GoldError(f"gold {spec!r}: {module_name}.{attr_path} is a {type(fn).__name__}, not a function "
                        "taking (context, reply)")
    return Gold(f"{module_name}:{attr_path}", fn)
