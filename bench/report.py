"""`make bench`: run the quick benchmarks (under 10 minutes here) and print their results as a table.

Each benchmark runs as its own process (so one's memory and threads do not colour another's) and
prints JSON; this collects the last JSON line of each and prints a Markdown table, then the raw JSON.
The long ones (`python -m bench.loop`, `bench/dpo_vs_trl.py` with TRL, `bench/eval_cost.py`) are run by hand: see
docs/BENCHMARKS.md for their commands and latest results.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = [
    ("decode", [sys.executable, "bench/decode.py"],
     ["pair_tokens_per_s", "limit_tokens_per_s", "ratio", "ttft_s", "hf_generate_pair_tokens_per_s"]),
    ("vote_to_live", [sys.executable, "bench/vote_to_live.py", "--pairs", "16", "--max-new-tokens", "32"],
     ["vote_to_live_s", "round_s", "load_s", "swap_pause_s", "failed_requests", "requests_during"]),
    ("people", [sys.executable, "bench/people.py"],
     ["one_person_tokens_per_s", "people_tokens_per_s", "e2e_4_people_vs_1", "failed_requests"]),
]


def run(name: str, command: list[str]) -> dict:
    started = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]}
    result = json.loads(lines[-1])
    result["bench_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def main() -> int:
    results = {}
    print("| benchmark | metric | value |\n|---|---|---|")
    for name, command, keys in QUICK:
        results[name] = result = run(name, command)
        if "error" in result:
            print(f"| {name} | error | {result['error'][0]} |")
            continue
        for key in keys + ["bench_wall_s"]:
            print(f"| {name} | {key} | {result.get(key)} |")
    print()
    print(json.dumps(results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
