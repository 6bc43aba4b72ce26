"""What the status poll and the store work of /send and /vote cost at 100 and at 100,000 judgments.

    python bench/status_cost.py                 # JSON on stdout; goal: every ratio (100k / 100) <= 1.5
    python bench/status_cost.py --small 100 --large 100000 --repeats 200

Two databases are generated through the store's own writes (one transaction per database): multi-turn
conversations with realistic context lengths (the chat template's messages, replies of 60-250 words),
a vote on every pair, now and then a tie, thumbs or a better reply, and a training round recorded after
every 64 judgments, as the app's schedule would. Both end with the same number of judgments waiting
for the next round (fewer than the threshold), as a live app does.

Timed, each the median of `--repeats` calls:
- `status`: the training loop's status computation (live version, round in progress, next check, new
  pairs), uncached: the work behind the 1-second cache every open tab polls;
- `send`: the store work of /send (a new turn with its context and a pair of replies);
- `vote`: the store work of /vote (the choice, and the pair index refreshed in the same transaction).

It also reports, for information, the status at the large size when no round ever consumed anything
(every judgment still new; an indexed count of the new pairs, so it grows with them).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROUND_EVERY = 64  # judgments between recorded rounds
PENDING = 12  # judgments waiting for the next round at the end (the app's threshold is 16)
WORDS = ("the model answers questions about history science cooking travel code and feelings with care "
         "because people asked for short clear replies that end on their own").split()


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def populate(store, n: int, seed: int, model_id: str, rounds: bool) -> None:
    """n judgments in conversations of 1-4 turns; a round recorded after every ROUND_EVERY."""
    rng = random.Random(seed)
    judged = 0
    with store.batch("the generated judgments"):
        while judged < n:
            conversation = store.start_conversation(f"s{judged}", "bench", model_id, "")
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            for idx in range(rng.randint(1, 4)):
                if judged >= n:
                    break
                messages.append({"role": "user", "content": text(rng, 8, 60)})
                replies = [{"slot": s, "text": text(rng, 60, 250), "policy_version": "v0", "model_id": model_id,
                            "seed": rng.getrandbits(31), "n_tokens": rng.randint(80, 256), "finish_reason": "stop"}
                           for s in ("a", "b")]
                turn, ids = store.record_turn(conversation, idx, list(messages), messages[-1]["content"], replies,
                                              prompt_tokens=40 * (idx + 1))
                kind = rng.random()
                if kind < 0.85:
                    store.record_choice(turn, 0, rng.choice("ab"), "bench", f"s{judged}")
                elif kind < 0.92:
                    store.record_choice(turn, 0, "tie", "bench", f"s{judged}")
                elif kind < 0.97:
                    store.record_rating(ids[0], "up", "bench", f"s{judged}")
                    store.record_rating(ids[1], "down", "bench", f"s{judged}")
                else:
                    store.record_edit(turn, 0, text(rng, 20, 80), "bench", f"s{judged}", n_tokens=60)
                judged += 1
                messages.append({"role": "assistant", "content": replies[0]["text"]})
                if rounds and judged <= n - PENDING and (judged % ROUND_EVERY == 0 or judged == n - PENDING):
                    run = store.create_run("dpo", {}, model_id, "v0", "schedule")
                    store.finish_run(run, "succeeded", version=None, n_pairs=ROUND_EVERY,
                                     max_feedback_id=store.newest_pair_feedback_id())


class Subject:
    """One generated database and the three operations timed on it."""

    def __init__(self, path: Path, n: int, loaded, rounds: bool = True):
        from playground.loop import LoopSettings, TrainingLoop
        from playground.serving.policy import PolicyHolder
        from store import Store

        path.parent.mkdir(parents=True)
        self.path, self.n = path, n
        self.store = Store(path)
        model_id = loaded.model_id
        self.store.ensure_base_version(model_id)
        built = time.perf_counter()
        populate(self.store, n, seed=n, model_id=model_id, rounds=rounds)
        self.build_s = time.perf_counter() - built
        self.loop = TrainingLoop(LoopSettings(db=str(path), adapters_dir=str(path.parent / "adapters"),
                                              model=model_id, model_cache=str(path.parent / "cache"), enabled=False),
                                 self.store, PolicyHolder(loaded))
        rng = random.Random(1)
        self.conversation = self.store.start_conversation("timed", "bench", model_id, "")
        self.context = [{"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": text(rng, 8, 60)}]
        self.replies = [{"slot": s, "text": text(rng, 60, 250), "policy_version": "v0", "model_id": model_id,
                         "seed": 1, "n_tokens": 200, "finish_reason": "stop"} for s in ("a", "b")]
        self.waiting = self.loop._compute_status()["new_pairs"]
        self.turns: list[int] = []
        self.voted = 0
        self.times: dict[str, list[float]] = {"status_s": [], "send_store_s": [], "vote_store_s": []}

    def status(self):
        self.loop._compute_status()  # uncached: what one poll a second costs

    def send(self):
        turn, _ = self.store.record_turn(self.conversation, len(self.turns), self.context,
                                         self.context[-1]["content"], self.replies, prompt_tokens=80)
        self.turns.append(turn)

    def vote(self):
        self.store.record_choice(self.turns[self.voted], 0, "a", "bench", "timed")
        self.voted += 1

    def timed(self, key: str, fn) -> None:
        started = time.perf_counter()
        fn()
        self.times[key].append(time.perf_counter() - started)

    def result(self) -> dict:
        return {"judgments": self.n, "new_pairs_waiting": self.waiting,
                **{k: statistics.median(v) for k, v in self.times.items()},
                "build_s": round(self.build_s, 1),
                "db_mb": round(sum(f.stat().st_size for f in self.path.parent.glob(self.path.name + "*")) / 1e6, 1)}


def measure(subjects: list[Subject], repeats: int) -> None:
    """Alternate the subjects call by call, so the disk's and the CPU's moods fall on each alike."""
    for key, name in (("status_s", "status"), ("send_store_s", "send"), ("vote_store_s", "vote")):
        for _ in range(repeats):
            for subject in subjects:
                subject.timed(key, getattr(subject, name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/status_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=100, help="judgments in the small database (default: %(default)s)")
    p.add_argument("--large", type=int, default=100_000, help="judgments in the large one (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per measure (default: %(default)s)")
    args = p.parse_args(argv)
    if not 0 < args.small < args.large:
        p.error("--small must be positive and below --large")

    from bench.fixtures import build_tiny_model
    from playground.serving.models import load_model

    with tempfile.TemporaryDirectory(prefix="status-cost-") as tmp:
        tmp = Path(tmp)
        # The status names the live version and the model: a tiny random model stands in (no weights read).
        loaded = load_model(str(build_tiny_model(tmp / "tiny")), "cpu")
        subjects = [Subject(tmp / "small" / "playground.db", args.small, loaded),
                    Subject(tmp / "large" / "playground.db", args.large, loaded),
                    Subject(tmp / "all-new" / "playground.db", args.large, loaded, rounds=False)]
        measure(subjects, args.repeats)
        small, large, all_new = (s.result() for s in subjects)
        for subject in subjects:
            subject.store.close()
    ratios = {f"{key}_ratio": round(large[key] / small[key], 3) for key in ("status_s", "send_store_s", "vote_store_s")}
    out = {
        "small": small, "large": large, **ratios,
        "goal": "every ratio <= 1.5",
        "met": all(v <= 1.5 for v in ratios.values()),
        "info_all_new": {"judgments": all_new["judgments"], "new_pairs_waiting": all_new["new_pairs_waiting"],
                         "status_s": all_new["status_s"],
                         "status_ratio_vs_small": round(all_new["status_s"] / small["status_s"], 3)},
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
