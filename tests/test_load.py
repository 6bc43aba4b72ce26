"""Issue 15, proof under load: eight people chatting and voting at once through the real app, every vote
they were told was saved is in SQLite exactly once. `bench/load.py` runs the same against the bundled
model (50 turns each, the issue's number)."""

from __future__ import annotations

from bench.load import drive, summary, tally
from tests.servers import running_app

USERS = 8
# 50 turns each is the bench's (bench/load.py); here 12 keep `make test` quick on two cores while still
# giving every user two conversations and 96 concurrent votes to lose or duplicate.
TURNS = 12
SETTINGS = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}


def test_eight_users_every_acknowledged_vote_is_stored_exactly_once(tiny_loaded, tmp_path):
    with running_app(tiny_loaded, tmp_path / "load.db") as (url, service):
        runs, wall = drive(url, USERS, TURNS, SETTINGS)
        counts = tally(service.store, runs)
        figures = summary(runs, wall)
        stats = service.store.stats()
    print(f"\n{USERS} users x {TURNS} turns: /send p50 {figures['latency_p50_s']} s, p95 {figures['latency_p95_s']} s;"
          f" /vote p50 {figures['vote_latency_p50_s']} s, p95 {figures['vote_latency_p95_s']} s;"
          f" {figures['aggregate_tokens_per_s']} reply tokens/s in all, {figures['wall_s']} s")
    assert figures["failures"] == [] and figures["failed_requests"] == 0
    assert counts == {"votes_acknowledged": USERS * TURNS, "votes_stored": USERS * TURNS, "votes_lost": 0,
                      "votes_duplicated": 0, "votes_unacknowledged": 0}
    # Each user's conversations are its own, and nothing else was written: one turn per send.
    conversations = [r.conversations for r in runs]
    assert sum(len(c) for c in conversations) == len(set().union(*conversations)) == stats["conversations"]
    assert stats["turns"] == USERS * TURNS and stats["feedback"] == USERS * TURNS
    assert sum(stats["current_feedback"]["choice"].values()) == USERS * TURNS
