"""Vote to live: from the vote that crosses the training threshold to the first reply of the new version.

    python bench/vote_to_live.py                 # the bundled model, a 32-pair round
    python bench/vote_to_live.py --pairs 16 --max-new-tokens 32

Starts `app.py` for real (a temporary database and adapters folder, the app's default 5-minute
schedule), votes through the public API until the crossing vote starts the round (votes nudge the
schedule's check), and meanwhile keeps a second client sending messages, counting
any request that fails. That client pauses `--think-s` seconds between messages, as a person reading
two replies and voting would (default 8 s); `--think-s 0` is the stress case where the chat keeps both
cores busy and the niced round gets what is left. Once the new version is live the client's pause is
cut short, so the measured first reply is not delayed by it.

Prints one JSON object: `vote_to_live_s`, `swap_pause_s` (the switch of the live version), `load_s`
(verifying and merging the adapter before the switch, while the old version serves), `round_s` (the
trainer subprocess, start to end), `failed_requests`, `requests_during`, and the app process's memory
(`app_rss_mb`, `app_peak_rss_mb`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainers.defaults import DEFAULT_TRAIN_EVERY_MIN  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Give me a tip for sleeping better.", "How do I boil an egg?",
    "Write a haiku about autumn.", "What is photosynthesis?", "Suggest a name for a cat.",
    "How can I learn to code?", "Explain gravity to a child.", "What should I cook tonight?",
    "Why is the sky blue?", "How do I stay focused?", "Tell me a fun fact about octopuses.",
]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the app did not answer at {url} within {timeout:.0f} s")


def app_memory_mb(pid: int) -> dict:
    """The app process's resident memory now and at its peak (Linux /proc), in MB."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        pass
    return values


def main() -> None:
    from gradio_client import Client

    from bench.fixtures import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--pairs", type=int, default=32, help="the round's threshold (--min-new-pairs)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    # The app's own schedule: since votes nudge the check, the round starts on the crossing vote and the
    # interval no longer adds to vote-to-live. A short interval here would only hide a broken nudge.
    p.add_argument("--train-every", type=float, default=DEFAULT_TRAIN_EVERY_MIN,
                   help="minutes between scheduled checks (default: the app's, %(default)s)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--think-s", type=float, default=8.0, help="the chatting client's pause between messages")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="vote-to-live-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    app = subprocess.Popen(
        [sys.executable, "app.py", "--model", args.model, "--db", str(tmp / "bench.db"), "--adapters-dir",
         str(tmp / "adapters"), "--port", str(port), "--train-every", str(args.train_every),
         "--min-new-pairs", str(args.pairs)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "app.log", "w"))
    try:
        wait_http(url, 180)
        voter, watcher = Client(url, verbose=False), Client(url, verbose=False)
        settings = {"max_new_tokens": args.max_new_tokens, "temperature": 0.8, "top_p": 0.95}
        votes, crossed_at = 0, None
        while crossed_at is None:
            voter.predict(api_name="/new_conversation")
            pair = voter.predict(PROMPTS[votes % len(PROMPTS)] + f" ({votes})", api_name="/send", **settings)
            a, b = pair["replies"]["a"], pair["replies"]["b"]
            voter.predict("a" if a["n_tokens"] <= b["n_tokens"] else "b", api_name="/vote")
            votes += 1
            status = voter.predict(api_name="/training_status")
            if status["new_pairs"] >= args.pairs:
                crossed_at = time.monotonic()

        # A second person keeps chatting through the round and the swap; every failure is counted.
        requests, failures, first_new = [0], [0], [None]
        stop, live = threading.Event(), threading.Event()

        def chat():
            while not stop.is_set():
                try:
                    out = watcher.predict("Say something nice.", api_name="/send", **settings)
                    requests[0] += 1
                    if first_new[0] is None and out["replies"]["a"]["policy_version"] != "v0":
                        first_new[0] = time.monotonic()
                        stop.set()
                except Exception:  # noqa: BLE001 - any failed request is what we count
                    failures[0] += 1
                    requests[0] += 1
                live.wait(args.think_s)  # a person's pause; cut short once the new version is live

        thread = threading.Thread(target=chat, daemon=True)
        thread.start()
        deadline = time.monotonic() + args.timeout
        while thread.is_alive() and time.monotonic() < deadline:
            if not live.is_set() and voter.predict(api_name="/training_status")["live"] != "v0":
                live.set()  # the next message goes out now: its reply is the new version's first
            thread.join(timeout=0.5)
        stop.set()
        if first_new[0] is None:
            raise SystemExit(f"no reply from a new version within {args.timeout:.0f} s; see {tmp / 'app.log'}")
        status = voter.predict(api_name="/training_status")
        from store import Store

        run = [r for r in Store(tmp / "bench.db").runs() if r["status"] == "succeeded"][0]
        from datetime import datetime

        round_s = (datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"]))
        memory = app_memory_mb(app.pid)
        print(json.dumps({
            "vote_to_live_s": round(first_new[0] - crossed_at, 2),
            "app_rss_mb": memory.get("VmRSS"),
            "app_peak_rss_mb": memory.get("VmHWM"),
            "swap_pause_s": status["last_swap_s"],
            "load_s": status["last_load_s"],
            "round_s": round(round_s.total_seconds(), 2),
            "round_pairs": run["n_pairs"],
            "votes_sent": votes,
            "failed_requests": failures[0],
            "requests_during": requests[0],
            "live": status["live"],
            "model": args.model,
            "max_new_tokens": args.max_new_tokens,
            "think_s": args.think_s,
        }))
    finally:
        app.terminate()
        app.wait(timeout=30)


if __name__ == "__main__":
    main()
