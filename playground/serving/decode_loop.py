"""One decode loop for every session: continuous batching over the decode engine.

A step of a small model on a CPU is bound by reading the weights, so rows added to a step cost little:
four people each running their own loop would each re-read all the weights every step and share the
memory bandwidth four ways. Here one thread owns the decoding. A request (a pair of replies to one
prompt) waits in a queue, is prefilled between two steps, joins the running batch at the next step,
streams a snapshot of its replies after every step, and leaves when both replies are done or its
reader goes away. Each engine step covers the rows of every active request of that engine at their
own positions (`Engine.decode_many`), so a request's tokens are those it would get decoded alone.

Each row samples with its own `torch.Generator` seeded from the stored seed, as `sample_pair` does, and
with the same code (`generation.sample_rows`), so a stored seed reproduces its reply whichever way it
was decoded. Models the engine does not support are decoded by `sample_pair` on the caller's thread,
as before (their versions on the PEFT host: playground/serving/peft_host.py).

Limits: at most `max_batch_rows` rows decode at once (`--max-batch-rows`); past that requests wait and
their readers learn how many requests are ahead of them; past `max_waiting` waiting requests a new one
is refused with `DecodeLoopBusy` (nothing was started). An exception inside a step fails the requests
of that step with the error and the loop goes on with the others.

Fairness: a request may name its `owner` (a plain string: the chat passes the account, or the session
without accounts). The queue is ordered by start-time fair queueing, not arrival: each request is
tagged with the later of the loop's virtual time (the tag of the request admitted last) and the end of
its owner's previous request (tag + its rows), and waits in tag order (arrival breaks ties). So one
owner with a backlog of six gets one turn per round while someone who just came gets the next free
rows; requests of a single owner, and of no owner, keep their arrival order. The place a reader is
shown is its index in that order: a newcomer with an earlier tag can move ahead of a backlog. An owner
may have at most `max_per_owner` requests waiting or decoding; past that a new one is refused with
`OwnerBusy`, so no one person can fill the whole queue and turn everyone else away as "busy".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from playground.serving.generation import (
    SLOTS,
    SampledReply,
    SamplingSettings,
    engine_for,
    row_slots,
    sample_pair,
    sample_rows,
    stop_token_ids,
)

log = logging.getLogger(__name__)

# Rows decoded in one step at most: a pair is 2 rows, so 8 people's pairs at once. Past this the step
# stops being bound by the weights alone (bench/decode.py measures the curve), and waiting is better
# than slowing every stream down.
DEFAULT_MAX_BATCH_ROWS = 16
# Requests allowed to wait for rows; past this a new request is refused ("busy, try again").
DEFAULT_MAX_WAITING = 32
# Requests one owner may have waiting or decoding at once: a person has one pair in each open tab, so 8
# is several tabs' worth, and a quarter of the queue at most, so one script cannot fill it alone.
DEFAULT_MAX_REQUESTS_PER_OWNER = 8
# Tokens decoded again before the newest ones when streaming text, so a character split across tokens
# (emoji, accents) is shown whole once its last token arrives.
DETOKENIZE_WINDOW = 6
# A waiting reader hears from the loop at least this often (the same update again when nothing changed).
HEARTBEAT_S = 0.5
# Keys and values of finished requests' rows kept for the conversation's next turn (prefix caching, as
# vLLM's): the next prompt is the last one plus the chosen reply plus a new message, so its prefill
# computes only the new tokens. A budget in bytes, least recently used out first (`--prefix-cache-mb`);
# a bundled-model row costs 46 KB a token, so 256 MB keeps about nine 600-token rows.
DEFAULT_PREFIX_CACHE_MB = 256
# A shared prefix shorter than this is computed again: copying it saves less than the lookup costs.
MIN_PREFIX_TOKENS = 16


class DecodeLoopBusy(RuntimeError):
    """Too many requests are waiting already; nothing was started."""


class OwnerBusy(DecodeLoopBusy):
    """This request's owner has `max_per_owner` requests waiting or decoding already; nothing was started."""

    def __init__(self, in_flight: int, limit: int):
        super().__init__(f"{in_flight} of your requests are already waiting or being written (at most {limit} "
                         "at once); wait for one to finish")
        self.in_flight, self.limit = in_flight, limit


class DecodeFailed(RuntimeError):
    """The step decoding this request failed; the message says why."""


@dataclass
class Update:
    """What a reader sees after a step: its replies so far, or how many requests wait before it."""

    replies: list[SampledReply]
    ahead: int | None = None  # requests ahead of this one in the queue; None once it decodes


@dataclass
class _Request:
    model: object
    tokenizer: object
    prompt_ids: list[int]
    settings: SamplingSettings
    seeds: tuple[int, ...]
    stop_ids: set[int]
    engine: object
    # Per row: (the version's LoRA in the engine, None: the model itself; its weights and config).
    row_adapters: tuple = ()
    owner: str | None = None  # whose request it is, for fair admission (None: the app's own)
    seq: int = 0  # arrival order
    tag: float = 0.0  # its fair-queueing start tag: the queue is kept in (tag, seq) order
    replies: list[SampledReply] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)
    # One engine state per run of consecutive rows on the same adapter (one for an ordinary pair).
    states: list = field(default_factory=list)
    logits: torch.Tensor | None = None  # the distribution the next tokens are drawn from
    step: int = 0
    started: float = 0.0
    version: int = 0  # +1 per published snapshot
    snapshot: list[SampledReply] | None = None
    ahead: int | None = None
    error: BaseException | None = None
    done: bool = False
    cancelled: bool = False
    text_from: list[int] = field(default_factory=list)  # per row: tokens whose text is final in `stable`
    stable: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.seeds)


class PrefixCache:
    """Kept prefixes (engine.KVPrefix) of finished rows, least recently used first, within a byte budget.

    Only the decode loop's thread uses it. A prefix is reused only for a prompt that continues past the
    prompt it was kept from (the next turn: the old prompt, then the reply), never for that prompt
    itself: a pair regenerated from the same prompt takes the same path as its first try (from the same
    earlier turn's row, or a whole prefill), so a seed gives the same reply both times."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: dict[int, tuple[object, int]] = {}  # insertion order = use order: (prefix, prompt length)
        self._next = 0
        self.bytes = 0
        self.hits = 0
        self.tokens_reused = 0

    def find(self, engine, adapter: str | None, prompt_ids: list[int]):
        best, best_key, best_shared = None, None, MIN_PREFIX_TOKENS - 1
        for key, (prefix, prompt_len) in list(self._entries.items()):
            if prefix.owner is None:  # its engine was replaced and freed
                self._drop(key)
                continue
            if prefix.owner is not engine or prefix.adapter != adapter:
                continue
            shared = prefix.shared(prompt_ids)
            if shared > prompt_len and shared > best_shared:
                best, best_key, best_shared = prefix, key, shared
        if best is not None:  # used: it goes to the back of the eviction order
            self._entries[best_key] = self._entries.pop(best_key)
        return best

    def add(self, prefix, prompt_len: int) -> None:
        if prefix.nbytes > self.max_bytes:
            return
        self._entries[self._next] = (prefix, prompt_len)
        self._next += 1
        self.bytes += prefix.nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        prefix, _ = self._entries.pop(key)
        self.bytes -= prefix.nbytes

    def __len__(self) -> int:
        return len(self._entries)


class DecodeLoop:
    def __init__(self, max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, max_waiting: int = DEFAULT_MAX_WAITING,
                 max_per_owner: int = DEFAULT_MAX_REQUESTS_PER_OWNER,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB):
        if max_batch_rows < len(SLOTS):
            raise ValueError(f"max_batch_rows {max_batch_rows} cannot hold one pair ({len(SLOTS)} rows)")
        if max_waiting < 0:
            raise ValueError(f"max_waiting {max_waiting} must be >= 0")
        if max_per_owner < 1:
            raise ValueError(f"max_per_owner {max_per_owner} must be >= 1")
        self.max_batch_rows = max_batch_rows
        self.max_waiting = max_waiting
        self.max_per_owner = max_per_owner
        self._cv = threading.Condition()
        self._waiting: list[_Request] = []  # in fair order: (tag, seq)
        self._seq = 0
        self._virtual = 0.0  # the tag of the request admitted last
        self._owner_end: dict[str | None, float] = {}  # per owner: where its next request's tag starts
        self._active: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # engine steps run, for tests and benchmarks
        self.max_rows_seen = 0
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb {prefix_cache_mb} must be >= 0 (0: off)")
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20))

    # -- what callers use ---------------------------------------------------------------------------

    def stream(self, model, tokenizer, prompt_ids: list[int], settings: SamplingSettings,
               seeds: tuple[int, ...], stop_ids: set[int] | None = None, adapter: str | None = None,
               lora: tuple | None = None, row_adapters: list[tuple[str | None, tuple | None]] | None = None,
               owner: str | None = None) -> Iterator[Update]:
        """Yield an `Update` after every step the request is in (and while it waits); the last one has
        every reply finished. Closing the iterator cancels the request. `adapter`: a LoRA resident in
        `model`'s engine, applied to this request's rows; `lora` (its weights and config) registers it
        again should the engine have been rebuilt. `row_adapters`: instead, one (adapter, lora) per row,
        so the rows of one pair decode different versions (a blind arena turn: v0 against the live
        version); each row's tokens are those it would get on its own version alone. `owner`: whose request
        it is (fair admission and the per-owner cap; see the module docstring). Raises DecodeLoopBusy at
        once when too many requests wait (OwnerBusy when the owner has too many), DecodeFailed when its
        step failed."""
        stop_ids = stop_token_ids(tokenizer, model) if stop_ids is None else stop_ids
        if row_adapters is None:
            row_adapters = [(adapter, lora)] * len(seeds)
        if len(row_adapters) != len(seeds):
            raise ValueError(f"{len(row_adapters)} row adapters for {len(seeds)} rows")
        engine = engine_for(model)
        too_long = engine is not None and len(prompt_ids) + int(settings.max_new_tokens) > engine.max_positions
        adapters = tuple(a for a, _ in row_adapters)
        if len(set(adapters)) > 1 and (engine is None or too_long):
            raise DecodeFailed("rows on different versions can only be decoded together by the engine, and this "
                               "request does not fit it")
        adapter, lora = row_adapters[0]
        if adapter is not None and (engine is None or too_long):
            # The HF forward below would decode the base model, not this version: refuse instead.
            raise DecodeFailed(f"{adapter} can only be decoded by the engine, and this request does not fit it")
        if engine is None or too_long:
            # No engine for this model (or past its window): the HF forward on this thread, as before.
            for replies in sample_pair(model, tokenizer, prompt_ids, settings, seeds, stop_ids=stop_ids,
                                       use_engine=False):
                yield Update(replies)
            return
        request = _Request(model, tokenizer, list(prompt_ids), settings, tuple(int(s) for s in seeds),
                           stop_ids, engine, row_adapters=tuple(row_adapters), owner=owner)
        self._submit(request)
        try:
            seen = -1
            while True:
                with self._cv:
                    # Wake up now and then even with nothing new: a reader blocked here could not be
                    # cancelled (a web server stops a stream between two yields), so a tab closed while its
                    # request waits would keep its place in the queue.
                    if request.version == seen and request.error is None:
                        self._cv.wait(HEARTBEAT_S)
                    if request.error is not None:
                        raise DecodeFailed(str(request.error)) from request.error
                    seen, snapshot, ahead, done = request.version, request.snapshot, request.ahead, request.done
                yield Update(snapshot if snapshot is not None else _fresh_replies(request.seeds), ahead)
                if done:
                    return
        finally:
            with self._cv:
                if not request.done:
                    request.cancelled = True  # the loop drops it before its next step
                    if request in self._waiting:  # a waiting one leaves the queue now
                        self._waiting.remove(request)
                        self._publish_positions()
                    self._cv.notify_all()

    def sample_pair(self, model, tokenizer, prompt_ids, settings, seeds, stop_ids=None,
                    owner: str | None = None) -> Iterator[list[SampledReply]]:
        """`generation.sample_pair`'s interface over the shared loop (replies only, no queue notes)."""
        for update in self.stream(model, tokenizer, prompt_ids, settings, seeds, stop_ids, owner=owner):
            yield update.replies

    def load(self) -> dict:
        with self._cv:
            return {"active_requests": len(self._active), "active_rows": sum(r.rows for r in self._active),
                    "waiting": len(self._waiting), "max_batch_rows": self.max_batch_rows}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for request in list(self._waiting) + self._active:
                request.error = request.error or RuntimeError("the app is shutting down")
            self._cv.notify_all()

    # -- the loop -----------------------------------------------------------------------------------

    def _submit(self, request: _Request) -> None:
        with self._cv:
            if self._closed:
                raise DecodeLoopBusy("the app is shutting down")
            if request.rows > self.max_batch_rows:  # it would wait for room that never comes
                raise DecodeLoopBusy(f"{request.rows} rows do not fit in a batch of at most {self.max_batch_rows}")
            queued_rows = sum(r.rows for r in self._waiting) + request.rows
            if len(self._waiting) >= self.max_waiting and not self._has_room(queued_rows):
                raise DecodeLoopBusy(f"{len(self._waiting)} requests are waiting already; try again in a moment")
            if request.owner is not None:
                # A cancelled one (a closed tab) leaves at the next step: it does not count against a new tab.
                in_flight = sum(1 for r in self._waiting + self._active if r.owner == request.owner and not r.cancelled)
                if in_flight >= self.max_per_owner:
                    raise OwnerBusy(in_flight, self.max_per_owner)
            self._seq += 1
            request.seq = self._seq
            request.tag = max(self._virtual, self._owner_end.get(request.owner, 0.0))
            self._owner_end[request.owner] = request.tag + request.rows
            self._waiting.append(request)
            self._waiting.sort(key=lambda r: (r.tag, r.seq))
            self._publish_positions()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="decode-loop")
                self._thread.start()
            self._cv.notify_all()

    def _has_room(self, rows: int) -> bool:
        """Whether `rows` more rows fit beside the active ones now."""
        return sum(r.rows for r in self._active) + rows <= self.max_batch_rows

    def _admitted(self, request: _Request) -> None:
        """Virtual time moves to the admitted request's tag; owners whose last request ends before it
        start from it again (their entries are dropped, so the map holds only owners with a backlog)."""
        self._virtual = max(self._virtual, request.tag)
        for owner in [o for o, end in self._owner_end.items() if end <= self._virtual]:
            del self._owner_end[owner]

    def _publish_positions(self) -> None:
        for i, request in enumerate(self._waiting):
            if request.ahead != i:
                request.ahead = i
                request.version += 1

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            with self._cv:
                self._drop_cancelled()
                while not self._active and not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                admitted = []
                while self._waiting and self._has_room(self._waiting[0].rows):
                    request = self._waiting.pop(0)
                    self._admitted(request)
                    request.ahead = None
                    self._active.append(request)
                    admitted.append(request)
                self._publish_positions()
                active = list(self._active)
            for request in admitted:
                self._guard([request], self._prefill)
            by_engine: dict[int, list[_Request]] = {}
            for request in active:
                if request.error is None and not request.done and not request.cancelled:
                    by_engine.setdefault(id(request.engine), []).append(request)
            for group in by_engine.values():
                self._guard(group, self._step)

    def _guard(self, group: list[_Request], fn) -> None:
        try:
            fn(group)
        except Exception as exc:  # fail these requests with the reason; the loop serves the others
            log.exception("decode step failed for %d request(s)", len(group))
            with self._cv:
                for request in group:
                    request.error = exc
                    self._remove(request)
                self._cv.notify_all()

    def _prefill(self, group: list[_Request]) -> None:
        (request,) = group
        request.started = time.perf_counter()
        device = next(request.model.parameters()).device
        request.replies = _fresh_replies(request.seeds)
        request.generators = [torch.Generator(device=device).manual_seed(s) for s in request.seeds]
        request.text_from = [0] * request.rows
        request.stable = [""] * request.rows
        max_total = len(request.prompt_ids) + int(request.settings.max_new_tokens)
        for adapter, lora in dict(request.row_adapters).items():
            if adapter is not None and adapter not in request.engine.adapters:
                if lora is None:
                    raise RuntimeError(f"the adapter {adapter} is not loaded")
                # The engine was rebuilt since the promotion (its model's weights changed): load it again.
                request.engine.add_adapter(adapter, *lora)
        # The last sampled token is never fed back: prompt + max_new positions are enough. Rows on one
        # adapter share one prefill; a pair on two versions runs the prompt once per version.
        request.states, logits = [], []
        for adapter, rows in _runs([a for a, _ in request.row_adapters]):
            prefix = None
            if self.prefixes.max_bytes:
                prefix = self.prefixes.find(request.engine, adapter, request.prompt_ids)
            state, first = request.engine.prefill(request.prompt_ids, rows, max_total, adapter=adapter, prefix=prefix)
            if state.reused:
                self.prefixes.hits += 1
                self.prefixes.tokens_reused += state.reused
            request.states.append(state)
            logits.append(first)
        request.logits = logits[0] if len(logits) == 1 else torch.cat(logits)

    def _step(self, group: list[_Request]) -> None:
        # Draw each request's next tokens from its pending logits, then one engine step for all rows.
        feed: list[_Request] = []
        tokens: list[torch.Tensor] = []
        for request in group:
            next_tokens = self._sample(request)
            if not request.done:
                feed.append(request)
                tokens.append(next_tokens)
        if not feed:
            return
        rows = sum(r.rows for r in feed)
        self.max_rows_seen = max(self.max_rows_seen, rows)
        # Rows of every version share the step: each state carries its own adapter (None: the base).
        logits = feed[0].engine.decode_many([s for r in feed for s in r.states], torch.cat(tokens),
                                            adapters=[s.adapter for r in feed for s in r.states])
        self.steps += 1
        start = 0
        for request in feed:
            request.logits = logits[start:start + request.rows]
            start += request.rows

    def _sample(self, request: _Request) -> torch.Tensor:
        next_tokens, picked = sample_rows(request.logits, request.settings, request.generators)
        elapsed = time.perf_counter() - request.started
        max_new = int(request.settings.max_new_tokens)
        for i, reply in enumerate(request.replies):
            if reply.done:
                continue
            reply.add(int(next_tokens[i]), picked[i], elapsed, request.stop_ids, last=request.step + 1 == max_new)
            reply.text = self._text(request, i, reply)
        request.step += 1
        finished = all(r.done for r in request.replies)
        if finished and not request.cancelled and self.prefixes.max_bytes:
            self._keep_prefixes(request)
        with self._cv:
            request.done = finished
            request.snapshot = [replace(r, token_ids=list(r.token_ids)) for r in request.replies]
            request.version += 1
            if request.done:
                self._remove(request)
            self._cv.notify_all()
        return next_tokens

    def _keep_prefixes(self, request: _Request) -> None:
        """Keep each row's keys and values (its prompt, then its reply's tokens as fed) for the next turn."""
        prompt_len = len(request.prompt_ids)
        row = 0
        for state in request.states:
            fed = state.length - prompt_len  # tokens fed after the prompt (a row that stopped early got more)
            for r in range(state.rows):
                reply = request.replies[row + r]
                tokens = request.prompt_ids + list(reply.token_ids[:fed])
                if len(tokens) > prompt_len:
                    self.prefixes.add(request.engine.keep_prefix(state, r, tokens), prompt_len)
            row += state.rows

    @staticmethod
    def _text(request: _Request, i: int, reply: SampledReply) -> str:
        """The reply's text so far, decoding only the newest tokens (plus a short window before them).

        Decoding all tokens every step grows with the reply; the finished text is decoded whole, so what
        is stored is exactly `tokenizer.decode` of the reply."""
        content = reply.text_ids
        if reply.done:
            return request.tokenizer.decode(content, skip_special_tokens=True)
        decode = request.tokenizer.decode
        start = request.text_from[i]
        tail = decode(content[start:], skip_special_tokens=True)
        if len(content) - start > 2 * DETOKENIZE_WINDOW:
            # Fix the text of all but the newest window of tokens, where decoding the two parts apart
            # gives the same text as together (not so inside a character split across tokens, or where
            # a tokenizer drops the space that starts a piece): later steps decode only the window.
            fixed = len(content) - DETOKENIZE_WINDOW
            head = decode(content[start:fixed], skip_special_tokens=True)
            rest = decode(content[fixed:], skip_special_tokens=True)
            if head + rest == tail:
                request.stable[i] += head
                request.text_from[i] = fixed
                tail = rest
        return request.stable[i] + tail

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._active if r.cancelled]:
            self._remove(request)
        kept = [r for r in self._waiting if not r.cancelled]
        if len(kept) != len(self._waiting):
            self._waiting = kept
            self._publish_positions()

    def _remove(self, request: _Request) -> None:
        if request in self._active:
            self._active.remove(request)
        request.states = []  # its KV cache goes now, not when the reader lets go of the request
        request.logits = None


def _runs(items: list) -> list[tuple[object, int]]:
    """Consecutive equal items as (item, count): [a, a, b] -> [(a, 2), (b, 1)]."""
    runs: list[list] = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    return [(item, count) for item, count in runs]


def _fresh_replies(seeds) -> list[SampledReply]:
    return [SampledReply(slot=s, seed=int(seed)) for s, seed in zip(row_slots(len(seeds)), seeds)]
