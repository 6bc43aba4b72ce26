"""Several people chatting at once through the real app: aggregate reply tokens/s against one person.

    python bench/people.py                  # the bundled model, 1 person then 4 people, 6 messages each
    python bench/people.py --people 8 --messages 4

Starts `app.py` for real (a temporary database, the schedule off) and drives it with `gradio_client`,
one client per person, each sending its messages back to back (no reading pause: the stress case).
Every session's pairs share the app's one decode loop, so N people should cost little more than one:
the aggregate rate (reply tokens of every finished pair / wall time) with N people against one person's
rate is the measure (issue: at least 2.5x for four people). Each person's first message is sent before
the clock starts, so the model's warm-up is not counted.

Prints one JSON object: `one_person_tokens_per_s`, `people_tokens_per_s`, `e2e_people_vs_one` (the
ratio; with the default 4 people it is also printed as `e2e_4_people_vs_1`), `people`, `messages`,
`max_new_tokens`, `failed_requests` (any failed request is counted, never retried), and each run's
tokens and wall time.

Then, with the app stopped, the ceiling the app's ratio is read against: the decode engine alone stepping
2 x people rows against 2 rows, on the same prompt and steps (`engine_rows_ceiling`: the most sharing one
decode loop can give on this machine, with no prefill, sampling, web server, or requests starting and
ending at different times), and `e2e_vs_ceiling`, the app's ratio against it. `--no-ceiling` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fixtures import run_together  # noqa: E402
from bench.vote_to_live import PROMPTS, wait_http  # noqa: E402

PEOPLE_GOAL = 2.5


def chat_rate(url: str, people: int, messages: int, settings: dict) -> dict:
    """Aggregate reply tokens/s of `people` clients each sending `messages` messages back to back."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(people)]
    for i, c in enumerate(clients):  # warm-up, not timed: the first request of a session pays its setup
        c.predict(f"hello {i}", api_name="/send", **settings)
    tokens, failures = [0] * people, [0] * people

    def person(k: int) -> None:
        for m in range(messages):
            try:
                out = clients[k].predict(f"{PROMPTS[(k * messages + m) % len(PROMPTS)]} ({k}.{m})", api_name="/send",
                                         **settings)
                tokens[k] += sum(r["n_tokens"] for r in out["replies"].values())
            except Exception:  # noqa: BLE001 - a failed request is counted, never hidden
                failures[k] += 1

    wall = run_together(person, people)
    return {"tokens": sum(tokens), "wall_s": round(wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
            "failed": sum(failures)}


def main() -> None:
    from bench.fixtures import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--people", type=int, default=4)
    p.add_argument("--messages", type=int, default=6, help="messages each person sends (timed)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-batch-rows", type=int, default=None, help="the app's --max-batch-rows (default: its own)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the engine-alone ceiling")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="the app's --prefix-cache-mb (default: its own; 0: every turn prefills its whole history)")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="people-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "app.py", "--model", args.model, "--db", str(tmp / "bench.db"), "--adapters-dir",
               str(tmp / "adapters"), "--port", str(port), "--no-train", "--arena-rate", "0", "--no-eval"]
    if args.max_batch_rows:
        command += ["--max-batch-rows", str(args.max_batch_rows)]
    if args.prefix_cache_mb is not None:
        command += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
    app = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "app.log", "w"))
    try:
        wait_http(url, 180)
        # Every reply runs to the length limit's neighbourhood at temperature 1 and top-p 1: the same work
        # per request in both runs, so the ratio measures the sharing, not the replies' lengths.
        settings = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0}
        one = chat_rate(url, 1, args.messages, settings)
        many = chat_rate(url, args.people, args.messages, settings)
        ratio = round(many["tokens_per_s"] / one["tokens_per_s"], 2) if one["tokens_per_s"] else None
        result = {
            "one_person_tokens_per_s": one["tokens_per_s"],
            "people_tokens_per_s": many["tokens_per_s"],
            "e2e_people_vs_one": ratio,
            "goal": PEOPLE_GOAL if args.people == 4 else None,
            "people": args.people,
            "messages": args.messages,
            "max_new_tokens": args.max_new_tokens,
            "one_person": one,
            "many_people": many,
            "failed_requests": one["failed"] + many["failed"],
            "model": args.model,
        }
        if args.people == 4:
            result["e2e_4_people_vs_1"] = ratio
    finally:
        app.terminate()
        app.wait(timeout=30)
    if not args.no_ceiling:
        ceiling = engine_ceiling(args.model, args.people, args.max_new_tokens)
        result.update(ceiling)
        if ratio and ceiling.get("engine_rows_ceiling"):
            result["e2e_vs_ceiling"] = round(ratio / ceiling["engine_rows_ceiling"], 3)
    print(json.dumps(result))


def engine_ceiling(model_spec: str, people: int, steps: int, repeats: int = 3) -> dict:
    """The decode engine alone: tokens/s of 2 x people rows in one batch against 2 rows (best of `repeats`
    each, alternated), on the bundled prompt; {} where the engine does not run the model."""
    from bench.decode import time_engine_decode
    from playground.serving.generation import engine_for
    from playground.serving.models import load_model
    from playground.serving.prompting import render

    loaded = load_model(model_spec, "cpu")
    engine = engine_for(loaded.model)
    if engine is None:
        return {}
    prompt_ids = render(loaded.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    one, many = [], []
    for _ in range(repeats):
        one.append(time_engine_decode(engine, prompt_ids, 2, steps))
        many.append(time_engine_decode(engine, prompt_ids, 2 * people, steps))
    return {"engine_pair_tokens_per_s": round(max(one), 1), "engine_people_rows_tokens_per_s": round(max(many), 1),
            "engine_rows_ceiling": round(max(many) / max(one), 3)}


if __name__ == "__main__":
    main()
