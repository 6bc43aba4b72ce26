"""One person's conversation: what they sent, the pair being judged, and every action on it.

`ChatSession` is plain per-session data (it lives in a `gr.State`); `ChatService` holds the shared
pieces (policy, store, limits) and implements each action once, for the browser UI and the public API
alike. Actions raise `ChatError` with a message meant for the person; nothing is written when they do,
except the record of a message the moderation hook refused (`MessageRefused`).

Limits are per person: with accounts the account, without them the session (`limit_key`). Messages
(sends and regenerates) and judgments each have a per-minute limit (playground/ratelimit.py), and the
same key is the request's owner in the shared decode loop, which admits owners fairly and caps what one
owner may have queued. The moderation hook (playground/moderation.py) checks each message before
generation (and each better reply before it is saved) and each reply before it is shown.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from playground.best_of_n import BestOfN, BestOfNUnavailable
from playground.moderation import Moderator
from playground.ratelimit import RateLimiter, wait_text
from playground.serving.decode_loop import DecodeFailed, DecodeLoop, DecodeLoopBusy, OwnerBusy
from playground.serving.generation import SampledReply, SamplingSettings, sample_pair
from playground.serving.limits import DEFAULT_MAX_CONTEXT_TOKENS, MAX_STORED_MESSAGE_CHARS
from playground.serving.policy import PolicyHolder, PolicySnapshot, version_order
from playground.serving.prompting import build_prompt
from store import CHOICES, RATINGS, SLOTS, FeedbackError, Store, StoreError

log = logging.getLogger(__name__)

DEFAULT_USER = "anonymous"
MAX_USER_CHARS = 100
SEED_BITS = 31
UNSAVED_NOTE = "These replies are not saved yet"
BEST_OF_N_NOTE = "Best-of-n"
# The share of turns whose pair is a blind arena pair (the live version against an earlier one) unless
# `--arena-rate` says otherwise: enough votes to rate versions, few enough that most votes train.
DEFAULT_ARENA_RATE = 0.15
MESSAGES_LIMITED = ("You can send {limit} messages a minute (a regenerate counts as one); try again in {wait}. "
                    "Nothing was sent.")
JUDGMENTS_LIMITED = ("You can judge {limit} times a minute (votes, thumbs and better replies together); try "
                     "again in {wait}. Nothing was recorded.")
# A refusal quotes at most this much of the value it refuses: a 10 MB "choice" must not come back whole
# in the error and in the log.
MAX_QUOTED_CHARS = 40


class ChatError(Exception):
    """An action that cannot be done as asked; the message says why and what to do instead."""


class MessageRefused(ChatError):
    """The moderation hook refused the person's text (a message: nothing was generated; a better reply:
    not saved); the refusal is recorded on the turn."""


def limit_key(session: "ChatSession") -> str:
    """Who a session's limits and decode-queue share belong to. With accounts, the account: all of a
    person's tabs and scripts share one allowance. Without them every browser is "anonymous", and
    limiting that name would make one person's flood lock everyone out: the session is the most that can
    be told apart (a script can open new sessions, so without accounts the global queue limit is what
    holds it)."""
    return f"user:{session.user}" if session.user != DEFAULT_USER else f"session:{session.session_id}"


@dataclass
class Pair:
    """The two replies of the current turn, and what the person said about them."""

    replies: list[SampledReply]
    version: str  # the live version when the pair started
    settings: SamplingSettings
    # The version of each slot's reply: both `version`, except in a blind arena pair, where one slot is
    # the live version and the other an earlier one, sides drawn at random and hidden until the vote.
    versions: tuple[str, ...] = ()
    arena: bool = False
    generating: bool = True
    turn_id: int | None = None  # set once stored
    index: int = 0  # 0 for the first pair of the turn, +1 per regenerate
    reply_ids: list[int] = field(default_factory=list)
    choice: str | None = None
    ratings: dict[str, str] = field(default_factory=dict)
    edit: str | None = None
    ahead: int | None = None  # requests waiting before this pair's decoding starts (None: decoding)
    # Best-of-n: each slot's reply is the highest-scored of `best_of` samples by `reward_model` (1: plain).
    best_of: int = 1
    reward_model: str | None = None
    reward_scores: tuple[float, ...] = ()  # the kept replies' scores, per slot
    candidate_scores: tuple[float, ...] = ()  # every candidate's score, rows a, b, a, b, ... (not stored)
    # Moderation: `held` while the replies are written but not yet checked (their text is not shown);
    # `withheld`: slot -> the reason a reply was refused (stored, never shown; the pair cannot be judged).
    held: bool = False
    withheld: dict[str, str] = field(default_factory=dict)
    withheld_failed: dict[str, bool] = field(default_factory=dict)  # slot -> the hook itself failed

    def __post_init__(self):
        if not self.versions:
            self.versions = (self.version,) * len(SLOTS)

    @property
    def revealed(self) -> bool:
        """Whether the versions may be shown: always for an ordinary pair, after the vote for an arena pair."""
        return not self.arena or self.choice is not None

    def reply(self, slot: str) -> SampledReply:
        return self.replies[SLOTS.index(slot)]

    def continuation(self) -> str | None:
        """The assistant turn the conversation goes on from: the chosen reply, else the edit, else A; with a
        reply withheld, the other one; with both withheld, none."""
        if self.withheld:
            allowed = [s for s in SLOTS if s not in self.withheld]
            return self.reply(allowed[0]).text if allowed else None
        if self.choice in ("a", "b"):
            return self.reply(self.choice).text
        if self.edit:
            return self.edit
        return self.reply("a").text


@dataclass
class ChatSession:
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    user: str = DEFAULT_USER
    simulated: bool = False  # a simulated annotator (the autopilot), marked as such in the store
    # The admin's in-process autopilot: no per-minute limits (never set from the API or a browser).
    limits_exempt: bool = False
    owner: str | None = None  # with --auth, the account this session belongs to (set by the web layer)
    conversation_id: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)  # finished turns, chat-template roles
    user_message: str | None = None  # the current turn's message, exactly as typed
    context: list[dict[str, str]] = field(default_factory=list)  # what the model saw for it
    prompt_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pair: Pair | None = None
    system_prompt: str = ""
    # Turns of this conversation left out of what the model reads (a refused message, a pair with both
    # replies withheld): stored turns keep distinct positions.
    left_out: int = 0
    # Guards the idle -> generating transition: two clicks in one session run on two threads.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __deepcopy__(self, memo):
        # Gradio deep-copies a State's initial value for each new browser session: give each a fresh id.
        return ChatSession(user=self.user, simulated=self.simulated, system_prompt=self.system_prompt)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as shown: finished turns, then the current message and its continuation."""
        shown = list(self.history)
        if self.user_message is not None:
            shown.append({"role": "user", "content": self.user_message})
            if self.pair is not None and not self.pair.generating and self.pair.continuation() is not None:
                shown.append({"role": "assistant", "content": self.pair.continuation()})
        return shown


class ChatService:
    def __init__(self, policy: PolicyHolder, store: Store, max_context_tokens: int = DEFAULT_MAX_CONTEXT_TOKENS,
                 on_feedback: Callable[[], None] | None = None, decode_loop: DecodeLoop | None = None,
                 arena_rate: float = 0.0, rng: random.Random | None = None, best_of_n: BestOfN | None = None,
                 message_limiter: RateLimiter | None = None, judgment_limiter: RateLimiter | None = None,
                 moderation: Moderator | None = None):
        if not 0.0 <= arena_rate <= 1.0:
            raise ValueError(f"arena_rate {arena_rate} must be between 0 and 1")
        self.policy = policy
        # The share of pairs that put the live version against an earlier one, blind (needs the decode loop).
        self.arena_rate = arena_rate
        self._rng = rng or random.SystemRandom()
        # Every session's pairs decode in this one loop (continuous batching); None: each on its own thread.
        self.decode_loop = decode_loop
        self.store = store
        # Best-of-n by a reward model (None or n = 1: each reply is one sample).
        self.best_of_n = best_of_n
        self.max_context_tokens = max_context_tokens
        # Called after each saved judgment (the loop's nudge: the vote that reaches the threshold starts
        # the round now, not at the next scheduled check). It must be quick and must not raise.
        self.on_feedback = on_feedback
        # Per-person limits per minute (None: off): sends and regenerates; votes, thumbs and better replies.
        self.message_limiter, self.judgment_limiter = message_limiter, judgment_limiter
        # The moderation hook (None or the no-op: nothing checked, replies stream as they are written).
        self.moderation = moderation if moderation is not None and moderation.active else None

    def concurrent_generations(self) -> int:
        """Pairs that may be generating at once: what the shared decode loop takes (rows plus its queue),
        else one."""
        if self.decode_loop is None:
            return 1
        # A best-of-n pair takes 2n rows: fewer of them fit a batch.
        rows = len(SLOTS) * (self.best_of_n.n if self.best_of_n is not None else 1)
        return max(1, self.decode_loop.max_batch_rows // rows) + self.decode_loop.max_waiting

    # -- sending and sampling ---------------------------------------------------------------------

    def send(self, session: ChatSession, message: str, settings: SamplingSettings) -> Iterator[Pair]:
        """Start a turn and stream its pair; the last yield is stored (or says why it was not)."""
        if message is None or not message.strip():
            raise ChatError("Type a message first: an empty message has nothing to reply to.")
        if len(message) > MAX_STORED_MESSAGE_CHARS:
            raise ChatError(
                f"That message has {len(message):,} characters; the limit is {MAX_STORED_MESSAGE_CHARS:,}. "
                "Nothing was sent."
            )
        _check_unicode(message, "The message", "Nothing was sent.")
        _check_unicode(session.system_prompt, "The system prompt", "Nothing was sent.")
        snapshot = self.policy.snapshot()
        with session.lock:
            self._check_idle(session)
            self._admit(self.message_limiter, session, MESSAGES_LIMITED)
            history = session.messages()  # the previous turn's continuation becomes history now
            left_out = session.left_out
            if history and history[-1]["role"] == "user":  # both replies were withheld: the turn leaves
                history, left_out = history[:-1], left_out + 1
            budget = min(self.max_context_tokens, snapshot.context_window - settings.max_new_tokens)
            prompt = build_prompt(snapshot.tokenizer, session.system_prompt, history, message, budget)
            self._moderate_message(session, history, left_out, message, prompt)
            session.history, session.left_out = history, left_out
            session.user_message = message
            session.context = prompt.messages
            session.prompt_ids = prompt.ids
            session.notes = prompt.notes
            previous, session.pair = None, self._new_pair(snapshot, settings)
        yield from self._stream(session, snapshot, previous)

    def regenerate(self, session: ChatSession, settings: SamplingSettings) -> Iterator[Pair]:
        snapshot = self.policy.snapshot()
        with session.lock:
            if session.pair is None:
                raise ChatError("There is no pair to regenerate yet: send a message first.")
            self._check_idle(session)
            self._admit(self.message_limiter, session, MESSAGES_LIMITED)
            previous = session.pair
            session.pair = self._new_pair(snapshot, settings, turn_id=previous.turn_id, index=previous.index + 1)
        yield from self._stream(session, snapshot, previous)

    # -- limits and moderation ------------------------------------------------------------------

    def _admit(self, limiter: RateLimiter | None, session: ChatSession, refusal: str) -> None:
        if limiter is None or session.limits_exempt:
            return
        key = limit_key(session)
        wait = limiter.acquire(key)
        if wait:
            log.info("rate limit of %d a minute reached by %s; refused for %.1f s", limiter.limit, key, wait)
            raise ChatError(refusal.format(limit=limiter.limit, wait=wait_text(wait)))

    def _moderate_message(self, session: ChatSession, history: list[dict[str, str]], left_out: int, message: str,
                          prompt) -> None:
        """Ask the hook about a message before anything is generated; a refusal is recorded on a turn of
        its own (no replies) and raised as MessageRefused. The session is left as it was."""
        if self.moderation is None:
            return
        reason, failed = self.moderation.check(message, "user")
        if reason is None:
            return
        refusal = {"reason": reason, "hook": self.moderation.name, "failed": failed}
        unrecorded = ""
        try:
            with self.store.batch("the refused message"):
                conversation_id = session.conversation_id or self.store.start_conversation(
                    session.session_id, session.user, self.policy.model_id, session.system_prompt,
                    simulated=session.simulated)
                idx = sum(1 for m in history if m["role"] == "user") + left_out
                self.store.record_refused_message(conversation_id, idx, prompt.messages, message, refusal,
                                                  prompt_tokens=len(prompt.ids))
            session.conversation_id, session.left_out = conversation_id, session.left_out + 1
        except StoreError as exc:
            log.error("a refused message could not be recorded: %s", exc)
            unrecorded = f" (The refusal itself could not be recorded: {exc}.)"
        log.info("the moderation hook refused a message of %s: %s", limit_key(session), reason)
        said = reason if failed else f"the moderation check refused it: {reason}"
        raise MessageRefused(f"Your message was not sent: {said}. Nothing was generated; change it and send "
                             f"again.{unrecorded}")

    def _moderate_edit(self, session: ChatSession, pair: Pair, text: str) -> None:
        """A better reply is the person's own text and becomes the chosen side of training pairs: the hook
        is asked about it as about a message (role "user"); a refusal is recorded on the turn and raised."""
        if self.moderation is None:
            return
        reason, failed = self.moderation.check(text, "user")
        if reason is None:
            return
        unrecorded = ""
        try:
            self.store.add_moderation(pair.turn_id, [{"role": "user", "pair": pair.index, "edit": True,
                                                      "reason": reason, "hook": self.moderation.name,
                                                      "failed": failed}])
        except StoreError as exc:
            log.error("a refused better reply could not be recorded: %s", exc)
            unrecorded = f" (The refusal itself could not be recorded: {exc}.)"
        said = reason if failed else f"the moderation check refused it: {reason}"
        raise MessageRefused(f"Your better reply was not saved: {said}. Change it and save again.{unrecorded}")

    def _moderate_replies(self, pair: Pair) -> None:
        """Check each finished reply before it is shown; a refused one is withheld (the pair is then not
        judgeable)."""
        pair.held = False
        if self.moderation is None:
            return
        for reply in pair.replies:
            reason, failed = self.moderation.check(reply.text, "assistant")
            if reason is not None:
                pair.withheld[reply.slot], pair.withheld_failed[reply.slot] = reason, failed
                log.info("the moderation hook withheld reply %s: %s", reply.slot, reason)

    def _withheld_records(self, pair: Pair, index: int) -> list[dict]:
        return [{"pair": index, "slot": slot, "reason": reason, "hook": self.moderation.name if self.moderation
                 else None, "failed": pair.withheld_failed.get(slot, False)}
                for slot, reason in sorted(pair.withheld.items())]

    # -- the blind arena --------------------------------------------------------------------------

    def _new_pair(self, snapshot: PolicySnapshot, settings: SamplingSettings, **where) -> Pair:
        """An ordinary pair of the live version, or (at the arena rate) the live version against an earlier
        one, in random slots."""
        opponent = self._arena_opponent(snapshot) if self.arena_rate and self._rng.random() < self.arena_rate else None
        if opponent is None:
            return Pair(replies=[], version=snapshot.version, settings=settings, **where)
        versions = (snapshot.version, opponent)
        if self._rng.random() < 0.5:
            versions = versions[::-1]
        return Pair(replies=[], version=snapshot.version, settings=settings, versions=versions, arena=True, **where)

    def _arena_opponent(self, live: PolicySnapshot) -> str | None:
        """The earlier version to put against the live one: of those resident on the base engine (so both
        rows decode in one step), the one with the fewest arena votes against it, which narrows the widest
        interval first (v0 on a tie, the reference every win rate is read against)."""
        if self.decode_loop is None or live.version == self.policy.base.version:
            return None
        if live.adapter is None or live.model is not self.policy.base.model:
            return None  # a version served as a merged copy decodes on its own engine, apart from v0's
        candidates = [v for v in self.policy.resident() if version_order(v) < version_order(live.version)]
        if not candidates:
            return None
        counts = self.store.arena_vote_counts(self.policy.model_id, live.version)
        return min(candidates, key=lambda v: (counts.get(v, 0), v != self.policy.base.version, v))

    def _stream(self, session: ChatSession, snapshot: PolicySnapshot, previous: Pair | None) -> Iterator[Pair]:
        pair = session.pair
        # With a moderation hook a reply is shown only once it is finished and allowed: the panels get
        # the replies without their text while they are written.
        pair.held = self.moderation is not None

        def shown(replies):
            return [replace(r, text="") for r in replies] if pair.held else replies

        owner = limit_key(session)
        try:
            scorer = self._best_of_n_scorer(session, pair)
            # Best-of-n: n candidates per slot, rows a, b, a, b, ...; the first of each streams meanwhile.
            seeds = tuple(secrets.randbits(SEED_BITS) for _ in range(len(SLOTS) * pair.best_of))
            if self.decode_loop is None:
                if snapshot.adapter is not None:
                    raise RuntimeError("a version served as an adapter needs the shared decode loop")
                for replies in sample_pair(snapshot.model, snapshot.tokenizer, session.prompt_ids, pair.settings,
                                           seeds):
                    candidates = replies
                    pair.replies = shown(replies[: len(SLOTS)])
                    yield pair
            else:
                rows = None
                if pair.arena:
                    resident = self.policy.resident()
                    rows = [(resident[v].adapter, resident[v].lora) for v in pair.versions]
                for update in self.decode_loop.stream(snapshot.model, snapshot.tokenizer, session.prompt_ids,
                                                      pair.settings, seeds, adapter=snapshot.adapter,
                                                      lora=snapshot.lora, row_adapters=rows, owner=owner):
                    candidates = update.replies
                    pair.replies, pair.ahead = shown(update.replies[: len(SLOTS)]), update.ahead
                    yield pair
            pair.replies = list(candidates[: len(SLOTS)])
            if scorer is not None:
                self._keep_best(session, pair, scorer, snapshot, candidates)
            self._moderate_replies(pair)
        except BaseException as exc:
            # A failed or abandoned generation leaves no pair behind: a regenerate falls back to the
            # pair it replaced, a new turn to the conversation before it.
            session.pair = previous
            if previous is None:
                session.user_message = None
            if isinstance(exc, OwnerBusy):
                raise ChatError(f"Not sent: {exc}. Nothing was saved.") from exc
            if isinstance(exc, DecodeLoopBusy):
                raise ChatError(f"The model is busy ({exc}). Nothing was sent; try again in a moment.") from exc
            if isinstance(exc, DecodeFailed):
                raise ChatError(f"The replies could not be written ({exc}). Nothing was saved; try again.") from exc
            raise
        pair.generating = False
        self._save_pair(session, pair)
        yield pair

    def _keep_best(self, session: ChatSession, pair: Pair, scorer, snapshot: PolicySnapshot, candidates) -> None:
        """Keep each slot's highest-scored candidate; if ranking fails, the first candidates, said so."""
        try:
            kept, scores = self.best_of_n.rank(scorer, snapshot.tokenizer, session.context, candidates)
        except Exception as exc:  # the replies are written: a failed ranking must not lose them
            log.exception("best-of-n ranking failed")
            session.notes.append(f"{BEST_OF_N_NOTE} could not rank the candidates ({exc}): these are plain samples.")
            pair.best_of, pair.reward_model = 1, None
            pair.replies = list(candidates[: len(SLOTS)])
            return
        pair.replies = [candidates[i] for i in kept]
        pair.reward_scores = tuple(scores[i] for i in kept)
        pair.candidate_scores = tuple(scores)

    def _best_of_n_scorer(self, session: ChatSession, pair: Pair):
        """The reward model this pair's candidates are ranked by, with `pair.best_of` set; None for a plain
        pair (best-of-n off, an arena pair, or no usable reward model: then a note says so)."""
        session.notes = [n for n in session.notes if not n.startswith(BEST_OF_N_NOTE)]
        if self.best_of_n is None or not self.best_of_n.active or pair.arena:
            return None
        try:
            scorer = self.best_of_n.scorer()
        except BestOfNUnavailable as exc:
            session.notes.append(f"{BEST_OF_N_NOTE} is on, but {exc}: these are plain samples.")
            return None
        n = self.best_of_n.n
        if self.decode_loop is not None:  # all 2n rows must fit in one batch
            n = max(1, min(n, self.decode_loop.max_batch_rows // len(SLOTS)))
        if n == 1:
            return None
        pair.best_of, pair.reward_model = n, scorer.name
        return scorer

    def _save_pair(self, session: ChatSession, pair: Pair) -> None:
        """Store a finished pair; on a database error keep it on screen, unsaved, with a note."""
        rows = [_reply_row(r, pair, self.policy.model_id) for r in pair.replies]
        try:
            # One transaction: a withheld reply is never stored without the record that withholds it.
            with self.store.batch("the pair"):
                conversation_id = session.conversation_id or self.store.start_conversation(
                    session.session_id, session.user, self.policy.model_id, session.system_prompt,
                    simulated=session.simulated,
                )
                if pair.turn_id is not None:  # a regenerated pair of a stored turn
                    turn_id = pair.turn_id
                    index, reply_ids = self.store.record_regenerated_pair(pair.turn_id, rows)
                else:
                    idx = sum(1 for m in session.history if m["role"] == "user") + session.left_out
                    index = pair.index
                    turn_id, reply_ids = self.store.record_turn(
                        conversation_id, idx, session.context, session.user_message, rows,
                        note=" ".join(n for n in session.notes if not n.startswith(BEST_OF_N_NOTE)) or None,
                        prompt_tokens=len(session.prompt_ids),
                    )
                if pair.withheld:
                    self.store.add_moderation(turn_id, self._withheld_records(pair, index))
            session.conversation_id = conversation_id
            pair.turn_id, pair.index, pair.reply_ids = turn_id, index, reply_ids
            session.notes = [n for n in session.notes if not n.startswith(UNSAVED_NOTE)]
        except StoreError as exc:
            # The pair stays on screen; the next judgment tries to save it again before recording itself.
            session.notes = [n for n in session.notes if not n.startswith(UNSAVED_NOTE)]
            session.notes.append(f"{UNSAVED_NOTE} ({exc}).")

    def _ensure_saved(self, session: ChatSession) -> Pair:
        pair = session.pair
        if not pair.reply_ids:
            self._save_pair(session, pair)
            if not pair.reply_ids:
                raise ChatError(f"{session.notes[-1]} Nothing was recorded; try again in a moment.")
        return pair

    # -- feedback ---------------------------------------------------------------------------------

    def vote(self, session: ChatSession, choice: str) -> Pair:
        choice = (choice or "").strip().lower()
        if choice not in CHOICES:
            raise ChatError(f"Unknown choice {_quoted(choice)}: use one of {', '.join(CHOICES)}.")
        pair = self._judgeable(session)
        self._admit(self.judgment_limiter, session, JUDGMENTS_LIMITED)
        self._record(lambda: self.store.record_choice(pair.turn_id, pair.index, choice, session.user, session.session_id))
        pair.choice = choice
        return pair

    def rate(self, session: ChatSession, slot: str, rating: str) -> Pair:
        slot, rating = (slot or "").strip().lower(), (rating or "").strip().lower()
        if slot not in SLOTS:
            raise ChatError(f"Unknown reply {_quoted(slot)}: use 'a' or 'b'.")
        if rating not in RATINGS:
            raise ChatError(f"Unknown rating {_quoted(rating)}: use 'up' or 'down'.")
        pair = self._judgeable(session)
        self._admit(self.judgment_limiter, session, JUDGMENTS_LIMITED)
        reply_id = pair.reply_ids[SLOTS.index(slot)]
        self._record(lambda: self.store.record_rating(reply_id, rating, session.user, session.session_id))
        pair.ratings[slot] = rating
        return pair

    def edit(self, session: ChatSession, text: str) -> Pair:
        if text is None or not text.strip():
            raise ChatError("The better reply is empty: write the reply you would have wanted.")
        if len(text) > MAX_STORED_MESSAGE_CHARS:
            raise ChatError(f"The better reply is over {MAX_STORED_MESSAGE_CHARS:,} characters; nothing saved.")
        _check_unicode(text, "The better reply", "Nothing was saved.")
        pair = self._judgeable(session)
        self._admit(self.judgment_limiter, session, JUDGMENTS_LIMITED)
        self._moderate_edit(session, pair, text)
        # Its length in tokens (end of turn included), as a sampled reply's: its pairs' length limit reads it.
        n_tokens = len(self.policy.base.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        self._record(lambda: self.store.record_edit(pair.turn_id, pair.index, text, session.user, session.session_id,
                                                    n_tokens=n_tokens))
        pair.edit = text
        return pair

    def new_conversation(self, session: ChatSession, user: str | None = None, simulated: bool | None = None) -> None:
        """Start over; optionally say who is talking (the autopilot marks its annotators as simulated)."""
        if user is not None:
            user = user.strip()
            if not user or len(user) > MAX_USER_CHARS or not user.isprintable():
                raise ChatError(f"A user name must be 1 to {MAX_USER_CHARS} printable characters.")
        with session.lock:
            self._check_idle(session)
            self._reset(session)
            if user is not None:
                session.user = user
            if simulated is not None:
                session.simulated = bool(simulated)

    @staticmethod
    def _reset(session: ChatSession) -> None:
        session.conversation_id = None
        session.history = []
        session.user_message = None
        session.context = []
        session.prompt_ids = []
        session.notes = []
        session.pair = None
        session.left_out = 0

    def _judgeable(self, session: ChatSession) -> Pair:
        if session.pair is None:
            raise ChatError("There is nothing to judge yet: send a message first.")
        if session.pair.generating:
            raise ChatError("The replies are still being written: wait until both have finished.")
        if session.pair.withheld:
            which = " and ".join(s.upper() for s in sorted(session.pair.withheld))
            raise ChatError(f"This pair cannot be judged: reply {which} was withheld by the moderation check. "
                            "Regenerate for a new pair, or send your next message.")
        return self._ensure_saved(session)

    def _check_idle(self, session: ChatSession) -> None:
        if session.pair is not None and session.pair.generating:
            raise ChatError("Replies are still being written: wait until both have finished.")

    def _record(self, write) -> None:
        try:
            write()
        except FeedbackError as exc:
            raise ChatError(f"Not recorded: {exc}.") from exc
        except StoreError as exc:
            raise ChatError(f"Your judgment was NOT saved: {exc}. Please try again.") from exc
        if self.on_feedback is not None:
            try:
                self.on_feedback()
            except Exception:  # the judgment is saved; a failed nudge only means waiting for the schedule
                log.exception("on_feedback failed")


def _quoted(value: str) -> str:
    return repr(value if len(value) <= MAX_QUOTED_CHARS else value[:MAX_QUOTED_CHARS] + "…")


def _check_unicode(text: str, what: str, outcome: str) -> None:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer reads and SQLite cannot store as UTF-8:
    refuse it in words instead of failing inside the tokenizer with no message."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ChatError(f"{what} holds a character that is not valid Unicode (a lone surrogate at position "
                        f"{exc.start}). {outcome}") from exc


def _reply_row(reply: SampledReply, pair: Pair, model_id: str) -> dict:
    return {
        "slot": reply.slot,
        "text": reply.text,
        "policy_version": pair.versions[SLOTS.index(reply.slot)],
        "model_id": model_id,
        "seed": reply.seed,
        "temperature": pair.settings.temperature,
        "top_p": pair.settings.top_p,
        "max_new_tokens": pair.settings.max_new_tokens,
        "finish_reason": reply.finish_reason,
        "n_tokens": reply.n_tokens,
        "logprob_sum": reply.logprob_sum,
        "latency_s": reply.latency_s,
        "ttft_s": reply.ttft_s,
        "token_ids_json": json.dumps(reply.token_ids),
        "best_of": pair.best_of,
        "reward_model": pair.reward_model,
        "reward_score": pair.reward_scores[SLOTS.index(reply.slot)] if pair.reward_scores else None,
    }


def pair_summary(session: ChatSession) -> dict:
    """The current pair as plain JSON, for API clients."""
    pair = session.pair
    who = {"user": session.user, "simulated": session.simulated}
    if pair is None:
        return {"conversation_id": session.conversation_id, "pair": None, "notes": session.notes, **who}
    return {
        **who,
        "conversation_id": session.conversation_id,
        "turn_id": pair.turn_id,
        "pair": pair.index,
        "generating": pair.generating,
        "ahead": pair.ahead if pair.generating else None,  # requests waiting before this one starts
        "saved": bool(pair.reply_ids),
        "choice": pair.choice,
        "ratings": dict(pair.ratings),
        "edit": pair.edit,
        "notes": list(session.notes),
        # Moderation: a withheld reply's text is never sent (null), its reason is; `held`: the replies
        # are being written and are shown once checked.
        "withheld": dict(pair.withheld),
        "held": pair.held,
        # An arena pair names no version (nor that it is one) until it is voted on: a client cannot know
        # which side is which before judging.
        "arena": pair.arena if pair.revealed else None,
        "replies": {
            r.slot: {
                "id": pair.reply_ids[i] if pair.reply_ids else None,
                "text": None if r.slot in pair.withheld else r.text,
                "policy_version": pair.versions[i] if pair.revealed else None,
                "n_tokens": r.n_tokens,
                "finish_reason": r.finish_reason,
                "seed": r.seed,
                "best_of": pair.best_of,
                "reward_model": pair.reward_model,
                "reward_score": pair.reward_scores[i] if pair.reward_scores else None,
            }
            for i, r in enumerate(pair.replies)
        },
    }
