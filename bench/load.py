"""Several people chatting and voting at once through the real app: is every vote kept exactly once, and
how long does each wait?

    python bench/load.py                        # the bundled model, 8 users, 50 turns each, a vote on every turn
    python bench/load.py --users 2 --turns 3    # a short run

Starts `app.py` for real (a temporary database, the schedule off) and drives it with `gradio_client`,
one client per user, each sending a message and voting on its pair, turn after turn (a new conversation
every `--turns-per-conversation` turns), all users at once. A vote counts as acknowledged when the
app's answer names the pair voted on and the choice given; afterwards the database is read back and
every acknowledged vote must be there exactly once.

First one user alone does `--solo-turns` turns: the decode loop's single-stream rate in this run, so
the aggregate rate of all users has a peer measured on the same machine at the same moment
(`aggregate_vs_single_stream`; the one decode loop batches every session, so N users should cost
little more than one).

Prints one JSON object: `users`, `turns_per_user`, `votes_acknowledged`, `votes_stored`, `votes_lost`,
`votes_duplicated`, `votes_unacknowledged` (stored votes no client got an answer for), `failed_requests`
(counted, never retried), `latency_p50_s` and `latency_p95_s` (a /send until the pair is written and
stored), the same for /vote, `aggregate_tokens_per_s`, `single_stream_tokens_per_s` and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fixtures import run_together  # noqa: E402
from bench.vote_to_live import PROMPTS, wait_http  # noqa: E402

DEFAULT_USERS = 8
DEFAULT_TURNS = 50  # the number: 8 users x 50 turns, a vote on each
TURNS_PER_CONVERSATION = 5  # people start over now and then; 50 turns in one context would only test truncation
SOLO_TURNS = 5
VOTE_CHOICES = ("a", "b", "tie", "both_bad")


@dataclass
class UserRun:
    """What one simulated user saw: an acknowledgement per vote, each request's latency, reply tokens."""

    acks: list[tuple[int, int, str]] = field(default_factory=list)  # (turn_id, pair, choice) the app confirmed
    conversations: set[int] = field(default_factory=set)
    send_s: list[float] = field(default_factory=list)
    vote_s: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: list[str] = field(default_factory=list)


def chat_and_vote(url: str, user: int, turns: int, settings: dict, turns_per_conversation: int = TURNS_PER_CONVERSATION,
                  seed: int = 0) -> UserRun:
    """One user's session: `turns` messages, a vote on each pair. Failures are recorded, never retried."""
    from gradio_client import Client

    rng = random.Random(seed * 1000 + user)
    run = UserRun()
    client = Client(url, verbose=False)
    for t in range(turns):
        try:
            if t and t % turns_per_conversation == 0:
                client.predict(api_name="/new_conversation")
            started = time.perf_counter()
            pair = client.predict(f"{PROMPTS[(user + t) % len(PROMPTS)]} (user {user}, turn {t})", api_name="/send",
                                  **settings)
            run.send_s.append(time.perf_counter() - started)
            run.tokens += sum(r["n_tokens"] for r in pair["replies"].values())
            run.conversations.add(pair["conversation_id"])
            choice = rng.choice(VOTE_CHOICES)
            started = time.perf_counter()
            voted = client.predict(choice, api_name="/vote")
            run.vote_s.append(time.perf_counter() - started)
            if (voted["turn_id"], voted["pair"], voted["choice"]) != (pair["turn_id"], pair["pair"], choice):
                run.failures.append(f"user {user} turn {t}: the vote's answer names another pair or choice: {voted}")
                continue
            run.acks.append((voted["turn_id"], voted["pair"], choice))
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, never hidden
            run.failures.append(f"user {user} turn {t}: {exc}")
    return run


def drive(url: str, users: int, turns: int, settings: dict, turns_per_conversation: int = TURNS_PER_CONVERSATION,
          seed: int = 0) -> tuple[list[UserRun], float]:
    """`users` sessions at once; returns each user's run and the wall time from their common start."""
    runs: list[UserRun | None] = [None] * users

    def work(k: int) -> None:
        runs[k] = chat_and_vote(url, k, turns, settings, turns_per_conversation, seed)

    wall = run_together(work, users)
    return runs, wall


def tally(store, runs: list[UserRun]) -> dict:
    """Every acknowledged vote against the choice rows the store holds for the same conversations."""
    acked: dict[tuple[int, int], str] = {}
    for run in runs:
        for turn_id, pair, choice in run.acks:
            acked[turn_id, pair] = choice
    stored: dict[tuple[int, int], list[str]] = {}
    for conversation_id in set().union(*(r.conversations for r in runs)):
        for turn in store.turns_for_conversation(conversation_id):
            for row in store.feedback_for_turn(turn["id"]):
                if row["kind"] == "choice":
                    stored.setdefault((row["turn_id"], row["pair"]), []).append(row["value"])
    lost = sum(1 for key, choice in acked.items() if choice not in stored.get(key, []))
    duplicated = sum(max(0, len(stored.get(key, [])) - 1) for key in acked)
    return {
        "votes_acknowledged": sum(len(r.acks) for r in runs),
        "votes_stored": sum(len(v) for v in stored.values()),
        "votes_lost": lost,
        "votes_duplicated": duplicated,
        "votes_unacknowledged": sum(len(v) for key, v in stored.items() if key not in acked),
    }


def percentile(values: list[float], q: int) -> float | None:
    """The q-th percentile (inclusive method), None without two values."""
    if len(values) < 2:
        return round(values[0], 3) if values else None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)


def summary(runs: list[UserRun], wall: float) -> dict:
    send = [s for r in runs for s in r.send_s]
    vote = [s for r in runs for s in r.vote_s]
    tokens = sum(r.tokens for r in runs)
    return {
        "latency_p50_s": percentile(send, 50),
        "latency_p95_s": percentile(send, 95),
        "vote_latency_p50_s": percentile(vote, 50),
        "vote_latency_p95_s": percentile(vote, 95),
        "aggregate_tokens_per_s": round(tokens / wall, 1) if wall else None,
        "reply_tokens": tokens,
        "wall_s": round(wall, 2),
        "failed_requests": sum(len(r.failures) for r in runs),
        "failures": [f for r in runs for f in r.failures][:5],
    }


def measure(url: str, users: int, turns: int, settings: dict, solo_turns: int = SOLO_TURNS,
            seed: int = 0) -> tuple[dict, list[UserRun]]:
    """The single-stream peer (one user alone), then every user at once: the rates and latencies, and the
    concurrent users' runs (whose votes `tally` checks)."""
    from gradio_client import Client

    Client(url, verbose=False).predict("warm-up", api_name="/send", **settings)  # not timed: first-request setup
    solo_runs, solo_wall = drive(url, 1, solo_turns, settings, seed=seed + 1)
    solo = summary(solo_runs, solo_wall)
    runs, wall = drive(url, users, turns, settings, seed=seed)
    result = {"users": users, "turns_per_user": turns, **summary(runs, wall),
              "single_stream_tokens_per_s": solo["aggregate_tokens_per_s"]}
    if solo["aggregate_tokens_per_s"] and result["aggregate_tokens_per_s"]:
        result["aggregate_vs_single_stream"] = round(result["aggregate_tokens_per_s"] / solo["aggregate_tokens_per_s"],
                                                     2)
    return result, runs


def main() -> None:
    from bench.fixtures import free_port
    from store import Store

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--users", type=int, default=DEFAULT_USERS)
    p.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="turns each user sends, a vote on each")
    p.add_argument("--solo-turns", type=int, default=SOLO_TURNS, help="turns of the single-stream peer run")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="load-"))
    db = tmp / "bench.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "app.py", "--model", args.model, "--db", str(db), "--adapters-dir",
               str(tmp / "adapters"), "--port", str(port), "--no-train", "--arena-rate", "0", "--no-eval"]
    app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "app.log", "w"))
    try:
        wait_http(url, 180)
        # Temperature 1 and top-p 1: every reply is a plain sample of the policy, as people's are.
        settings = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0}
        result, runs = measure(url, args.users, args.turns, settings, args.solo_turns, args.seed)
    finally:
        app.terminate()
        app.wait(timeout=30)
    store = Store(db)
    try:
        result.update(tally(store, runs))
    finally:
        store.close()
    result.update(model=args.model, max_new_tokens=args.max_new_tokens, solo_turns=args.solo_turns)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
