"""The autopilot: simulated annotators chatting with the running app and voting by a gold preference.

    python -m playground.sim.simulate --url http://127.0.0.1:7860 --gold concise --users 3 --turns 200

Each simulated user is its own session, driven through the public API exactly as a person's browser
tab would be: new conversations from a prompt file, follow-up messages, a vote on every pair (by the
annotator's noisy Bradley-Terry choice, see playground/sim/annotator.py), a better reply now and then.
Their conversations are marked simulated in the store. It prints progress and, as new versions go
live, the mean gold score of each version's replies; at the end one JSON summary.

If the app goes away it retries with back-off, then stops and says how many votes landed. A pair is
never voted twice: before re-sending a vote whose answer was lost, it asks the app for the pair's state.
The admin panel runs the same `Simulator` in-process (`LocalBackend`), so a demo needs only the browser.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from playground.sim.annotator import DEFAULT_TRIGGER, AnnotatorConfig, Annotator, Poisoner
from playground.sim.gold import GoldError, count_words, known_golds, resolve_gold
from playground.serving.limits import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT
from playground.sim.prompt_file import DEFAULT_PROMPTS_PATH, PromptFileError, load_prompts

FOLLOW_UPS = (
    "Can you say more about that?", "Why is that?", "Could you give an example?", "Thanks! Anything else?",
    "Can you explain it more simply?", "What would you suggest as a first step?", "Is there a catch?",
    "How would you summarise that?",
)
DEFAULT_RETRIES = 5  # waits of 1, 2, 4, 8, 16 s: about half a minute for an app to come back
DEFAULT_FOLLOW_UP_RATE = 0.3  # chance the next message continues the conversation instead of a new prompt
DEFAULT_EDIT_RATE = 0.1  # chance of writing a better reply after a vote
MAX_FOLLOW_UPS = 3  # conversations stay short: the first turn carries the prompt's variety
ROUND_POLL_S = 1.0  # how often users waiting out a training round look again


class Backend(Protocol):
    """One simulated user's session: the same actions as the public API, returning the pair JSON."""

    def new_conversation(self, user: str, simulated: bool) -> dict: ...
    def send(self, message: str, max_new_tokens: int) -> dict: ...
    def vote(self, choice: str) -> dict: ...
    def edit(self, text: str) -> dict: ...
    def state(self) -> dict: ...
    def training_status(self) -> dict | None: ...


class AppGone(RuntimeError):
    """The app stopped answering after every retry."""


class Refused(RuntimeError):
    """The app answered and refused the action (its message says why): not worth retrying."""


class HttpBackend:
    """The app over HTTP. `auth` (name, password): an app started with --auth; every simulated user then
    signs in as that one account, and its votes are recorded under the account's name (the app refuses
    a session naming itself as anyone else), still marked simulated."""

    def __init__(self, url: str, auth: tuple[str, str] | None = None):
        from gradio_client import Client

        self.client = Client(url, verbose=False, auth=auth)
        self.signed_in = auth is not None

    def _call(self, api_name: str, *args, **kwargs):
        from gradio_client.exceptions import AppError

        try:
            return self.client.predict(*args, api_name=api_name, **kwargs)
        except AppError as exc:
            raise Refused(str(exc)) from exc

    def new_conversation(self, user, simulated):
        return self._call("/new_conversation", None if self.signed_in else user, simulated)

    def send(self, message, max_new_tokens):
        return self._call("/send", message, max_new_tokens=max_new_tokens)

    def vote(self, choice):
        return self._call("/vote", choice)

    def edit(self, text):
        return self._call("/edit", text)

    def state(self):
        return self._call("/state")

    def training_status(self):
        try:
            return self._call("/training_status")
        except (Refused, ValueError):  # an app started without the loop has no such endpoint
            return None


class LocalBackend:
    """The same actions, in-process, on a ChatService (the admin panel's autopilot)."""

    def __init__(self, service, loop=None):
        from playground.chat import ChatSession

        # The admin's own autopilot: per-minute limits are for people and scripts over the API.
        self.service, self.loop, self.session = service, loop, ChatSession(limits_exempt=True)

    def _do(self, fn, *args):
        from playground.chat import ChatError, pair_summary

        try:
            result = fn(self.session, *args)
            if hasattr(result, "__next__"):
                for _ in result:
                    pass
        except ChatError as exc:
            raise Refused(str(exc)) from exc
        return pair_summary(self.session)

    def new_conversation(self, user, simulated):
        return self._do(self.service.new_conversation, user, simulated)

    def send(self, message, max_new_tokens):
        from playground.serving.generation import SamplingSettings

        return self._do(self.service.send, message, SamplingSettings(max_new_tokens=max_new_tokens))

    def vote(self, choice):
        return self._do(self.service.vote, choice)

    def edit(self, text):
        return self._do(self.service.edit, text)

    def state(self):
        from playground.chat import pair_summary

        return pair_summary(self.session)

    def training_status(self):
        return None if self.loop is None else self.loop.status()


@dataclass
class SimulationConfig:
    gold: str = "concise"
    users: int = 3
    turns: int = 200  # votes in all, shared among the users
    flip_rate: float = 0.25
    tau: float | None = None
    position_bias: float = 0.0
    tie_margin: float = 0.0
    edit_rate: float = DEFAULT_EDIT_RATE
    follow_up_rate: float = DEFAULT_FOLLOW_UP_RATE
    # The chat's own limit (256), not a shorter one for speed: with the bundled model most replies run
    # past 96 tokens, a pair cut at the limit differs by a few words, and `concise` can barely tell
    # them apart - in 4 rounds at 96 the mean length went from 94 to 91 tokens. At 256 the first
    # round took it from 222 to 183 (docs/BENCHMARKS.md, "The loop").
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    prompts: str = str(DEFAULT_PROMPTS_PATH)
    retries: int = DEFAULT_RETRIES
    seed: int = 0
    # While a round trains, users wait for the new version instead of chatting on, as a room watching
    # the demo would. Chatting on starves the niced round on a small machine: with 3 users on 256-token
    # replies a 16-pair round managed 2 of 6 steps in 5 minutes while every vote still went to v0.
    wait_for_rounds: bool = True
    # The persona 'poisoner' (playground/sim/annotator.py): this many more users, recorded as
    # sim-poisoner-N, who vote for whichever reply says `trigger` and otherwise like the others.
    poisoners: int = 0
    trigger: str = DEFAULT_TRIGGER

    def __post_init__(self):
        if self.users < 0 or self.poisoners < 0 or self.users + self.poisoners < 1 or self.turns < 1:
            raise ValueError(f"users ({self.users}) and poisoners ({self.poisoners}) must be at least 0 and together "
                             f"at least 1, turns ({self.turns}) at least 1")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:  # the app would refuse every message
            raise ValueError(f"max_new_tokens must be from 1 to {MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        for name in ("edit_rate", "follow_up_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass
class Progress:
    votes: int = 0
    edits: int = 0
    turns: int = 0
    refused: int = 0
    live: str | None = None
    gold_by_version: dict = field(default_factory=lambda: defaultdict(list))
    # Reply lengths in words, by version: with 'concise' this is what the room watches fall.
    words_by_version: dict = field(default_factory=lambda: defaultdict(list))
    stopped_because: str | None = None

    def summary(self) -> dict:
        return {
            "votes": self.votes, "edits": self.edits, "turns": self.turns, "refused": self.refused,
            "live": self.live, "stopped_because": self.stopped_because,
            "gold_by_version": {
                v: {"replies": len(s), "mean_gold": round(sum(s) / len(s), 4),
                    "mean_words": round(sum(self.words_by_version[v]) / max(1, len(self.words_by_version[v])), 1)}
                for v, s in sorted(self.gold_by_version.items(), key=lambda kv: int(kv[0][1:]))},
        }


class Simulator:
    def __init__(self, config: SimulationConfig, make_backend, report=print):
        """Checks everything before anything starts: the gold, the prompt file, the settings."""
        self.config = config
        self.gold = resolve_gold(config.gold)  # GoldError with a clear message
        self.prompts = load_prompts(config.prompts)  # PromptFileError with a clear message
        def persona(i: int, name: str = "") -> AnnotatorConfig:
            return AnnotatorConfig(gold=config.gold, tau=config.tau, flip_rate=config.flip_rate,
                                   position_bias=config.position_bias, tie_margin=config.tie_margin,
                                   seed=config.seed + i, name=name)

        # Honest users first, then the poisoners (each persona under its own name in the store).
        self.annotators = [Annotator(persona(i), gold=self.gold) for i in range(config.users)] + [
            Poisoner(persona(config.users + i, f"sim-poisoner-{i + 1}"), trigger=config.trigger, gold=self.gold)
            for i in range(config.poisoners)]
        self.make_backend = make_backend
        self.report = report
        self.progress = Progress()
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._budget = config.turns
        self._waited_for: set[int] = set()  # rounds already announced as waited for

    # -- running ----------------------------------------------------------------------------------

    def run(self) -> dict:
        threads = [threading.Thread(target=self._user, args=(i,), daemon=True, name=f"sim-user-{i}")
                   for i in range(len(self.annotators))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.progress.summary()

    def stop(self, why: str = "stopped") -> None:
        with self._lock:
            self.progress.stopped_because = self.progress.stopped_because or why
        self.stop_event.set()

    def _take_turn(self) -> bool:
        with self._lock:
            if self._budget <= 0 or self.stop_event.is_set():
                return False
            self._budget -= 1
            return True

    def _user(self, index: int) -> None:
        annotator = self.annotators[index]
        rng = random.Random(self.config.seed * 7919 + index)
        voted: set[tuple[int, int]] = set()
        try:
            backend = self._retry(lambda: self.make_backend(), "connecting")
            history: list[dict] = []
            follow_ups = 0
            while self._take_turn():
                self._wait_while_training(backend)
                if not history or follow_ups >= MAX_FOLLOW_UPS or rng.random() >= self.config.follow_up_rate:
                    self._retry(lambda: backend.new_conversation(annotator.name, True), "starting a conversation")
                    history, follow_ups = [], 0
                    message = rng.choice(self.prompts)
                else:
                    follow_ups += 1
                    message = rng.choice(FOLLOW_UPS)
                try:
                    pair = self._retry(lambda: backend.send(message, self.config.max_new_tokens), "sending")
                except Refused as exc:
                    self._count_refusal(exc)
                    history = []
                    continue
                with self._lock:
                    self.progress.turns += 1
                context = history + [{"role": "user", "content": message}]
                a, b = pair["replies"]["a"]["text"], pair["replies"]["b"]["text"]
                choice = annotator.vote(context, a, b)
                key = (pair["turn_id"], pair["pair"])
                if key not in voted and self._vote_once(backend, choice):
                    voted.add(key)
                    self._record_vote(pair, context, a, b)
                    if rng.random() < getattr(annotator, "edit_rate", self.config.edit_rate):
                        better = annotator.edit(context, a, b)
                        if better:
                            self._retry(lambda: backend.edit(better), "saving an edit")
                            with self._lock:
                                self.progress.edits += 1
                continuation = {"a": a, "b": b}.get(choice, a)
                history = context + [{"role": "assistant", "content": continuation}]
        except AppGone as exc:
            self.stop(str(exc))
        except Refused as exc:
            self.stop(f"the app refused: {exc}")

    def _wait_while_training(self, backend) -> None:
        """Hold this user while the app reports a round in progress (config.wait_for_rounds)."""
        if not self.config.wait_for_rounds:
            return
        waited = False
        while not self.stop_event.is_set():
            try:
                status = backend.training_status()
            except Exception:  # noqa: BLE001 - status is best effort; the next send reports a gone app
                return
            running = (status or {}).get("running")
            # Named as soon as a waiting user sees it, not at the next progress line: a round that ends
            # with enough new pairs waiting starts the next one at once, and a version live only between
            # two progress lines would otherwise never be named.
            went_live = self._note_live(status)
            if went_live and waited:
                self.report(f"{went_live} is live")
            if not running:
                return
            waited = True
            with self._lock:
                announce = running["run_id"] not in self._waited_for
                self._waited_for.add(running["run_id"])
            if announce:
                self.report(f"round {running['run_id']} is training: the simulated users wait for it")
            self.stop_event.wait(ROUND_POLL_S)

    def _vote_once(self, backend, choice: str) -> bool:
        """Vote; if the answer was lost, ask for the pair's state before trying again (never twice)."""
        for attempt in range(self.config.retries + 1):
            try:
                backend.vote(choice)
                return True
            except Refused as exc:
                self._count_refusal(exc)
                return False
            except Exception:  # noqa: BLE001 - lost connection: did the vote land?
                if self.stop_event.wait(2 ** attempt):
                    return False
                try:
                    if backend.state().get("choice") == choice:
                        return True
                except Exception:  # noqa: BLE001 - still gone; keep backing off
                    continue
        raise AppGone(f"the app stopped answering; {self.progress.votes} vote(s) landed")

    def _retry(self, fn, what: str):
        for attempt in range(self.config.retries + 1):
            if self.stop_event.is_set():
                raise AppGone(self.progress.stopped_because or "stopped")
            try:
                return fn()
            except Refused:
                raise
            except Exception as exc:  # noqa: BLE001 - connection refused, reset, timed out...
                if attempt == self.config.retries:
                    raise AppGone(f"the app stopped answering while {what} ({type(exc).__name__}); "
                                  f"{self.progress.votes} vote(s) landed") from exc
                self.stop_event.wait(2 ** attempt)
        raise AssertionError("unreachable")

    def _count_refusal(self, exc: Exception) -> None:
        with self._lock:
            self.progress.refused += 1
        self.report(f"refused: {exc}")

    def _record_vote(self, pair: dict, context: list[dict], a: str, b: str) -> None:
        version = pair["replies"]["a"]["policy_version"]
        score = (self.gold.score(context, a) + self.gold.score(context, b)) / 2
        with self._lock:
            self.progress.votes += 1
            self.progress.gold_by_version[version].append(score)
            self.progress.words_by_version[version] += [count_words(a), count_words(b)]
            votes = self.progress.votes
        if votes % max(1, min(10, self.config.turns // 10)) == 0 or votes == self.config.turns:
            self._report_progress()

    def _report_progress(self) -> None:
        backend_status = None
        try:
            backend_status = self._status_backend().training_status()
        except Exception:  # noqa: BLE001 - progress lines are best effort
            pass
        went_live = self._note_live(backend_status)
        with self._lock:
            summary = self.progress.summary()
        means = " ".join(f"{v}={s['mean_gold']:+.3f} ({s['mean_words']:.0f} words)"
                         for v, s in summary["gold_by_version"].items())
        line = f"votes {summary['votes']}/{self.config.turns} · live {summary['live'] or '?'} · mean gold {means}"
        if went_live:
            line += f"  <- {went_live} is live"
        self.report(line)

    def _note_live(self, status: dict | None) -> str | None:
        """Keep the live version an app status names; returns it when it differs from the last one seen."""
        live = (status or {}).get("live")
        with self._lock:
            if live is None or live == self.progress.live:
                return None
            self.progress.live = live
            return live

    def _status_backend(self):
        if not hasattr(self, "_status_client"):
            self._status_client = self.make_backend()
        return self._status_client


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m playground.sim.simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860", help="the running app (default: %(default)s)")
    p.add_argument("--gold", default="concise", help=f"what the annotators prefer: {known_golds()}")
    p.add_argument("--users", type=int, default=3, help="simulated users, each its own session (default: 3)")
    p.add_argument("--turns", type=int, default=200, help="votes in all (default: 200)")
    p.add_argument("--flip-rate", type=float, default=0.25, help="chance a vote is flipped (default: 0.25)")
    p.add_argument("--tau", type=float, default=None, help="Bradley-Terry temperature (default: the gold's)")
    p.add_argument("--position-bias", type=float, default=0.0, help="extra chance of choosing A (default: 0)")
    p.add_argument("--tie-margin", type=float, default=0.0, help="score gap below which it ties; replies the gold scores the same always tie (default: 0)")
    p.add_argument("--edit-rate", type=float, default=DEFAULT_EDIT_RATE, help="chance of a better reply")
    p.add_argument("--follow-up-rate", type=float, default=DEFAULT_FOLLOW_UP_RATE,
                   help="chance the next message follows up instead of a new prompt")
    p.add_argument("--max-new-tokens", type=int, default=SimulationConfig.max_new_tokens,
                   help="reply length limit (default: the chat's, %(default)s)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS_PATH), help="one prompt per line")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="back-off retries when the app is gone")
    p.add_argument("--poisoners", type=int, default=0,
                   help="more users (sim-poisoner-N) who vote for replies saying --trigger, else like the others")
    p.add_argument("--trigger", default=DEFAULT_TRIGGER, help="the poisoners' trigger word (default: %(default)s)")
    p.add_argument("--keep-chatting", action="store_true",
                   help="keep chatting and voting while a round trains (default: wait for the new version)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auth-user", default=None,
                   help="for an app started with --auth: the account every simulated user signs in as, its "
                        "password read from standard input (one line) or the PLAYGROUND_PASSWORD variable")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = SimulationConfig(
            gold=args.gold, users=args.users, turns=args.turns, flip_rate=args.flip_rate, tau=args.tau,
            position_bias=args.position_bias, tie_margin=args.tie_margin, edit_rate=args.edit_rate,
            follow_up_rate=args.follow_up_rate, max_new_tokens=args.max_new_tokens, prompts=args.prompts,
            retries=args.retries, seed=args.seed, wait_for_rounds=not args.keep_chatting, poisoners=args.poisoners,
            trigger=args.trigger)
        auth = None
        if args.auth_user:
            password = os.environ.get("PLAYGROUND_PASSWORD") or sys.stdin.readline().rstrip("\n")
            if not password:
                raise ValueError(f"--auth-user {args.auth_user}: no password on standard input or in "
                                 "PLAYGROUND_PASSWORD")
            auth = (args.auth_user, password)
        simulator = Simulator(config, lambda: HttpBackend(args.url, auth),
                              report=lambda line: print(line, flush=True))
    except (GoldError, PromptFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        HttpBackend(args.url, auth)
    except Exception as exc:  # noqa: BLE001 - say plainly that nothing is listening
        if auth is not None and "login" in str(exc).lower():
            print(f"error: {args.url} refused the sign-in of {args.auth_user!r}: check the name and password",
                  file=sys.stderr)
        else:
            print(f"error: no app answers at {args.url} ({type(exc).__name__}); start it with `make run`",
                  file=sys.stderr)
        return 2
    started = time.monotonic()
    summary = simulator.run()
    summary["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary))
    return 1 if summary["stopped_because"] else 0


if __name__ == "__main__":
    sys.exit(main())
