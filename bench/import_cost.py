"""How long `python -m store import` holds the database's write lock: the app's votes wait for it.

    python bench/import_cost.py        # JSON on stdout; goal: slowest_chunk_s well under 5 (the busy timeout)
    python bench/import_cost.py --rows 50000 --text-chars 2000

A TRL preference file of `--rows` generated rows is read and checked (`read_trl`), then imported by
`Store.import_pairs`, which writes IMPORT_CHUNK_ROWS rows to a transaction: each chunk is timed, since a
chunk is what a vote arriving during the import waits for (at most BUSY_TIMEOUT_MS).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from store import Store  # noqa: E402
from store.db import BUSY_TIMEOUT_MS  # noqa: E402
from store.imports import IMPORT_CHUNK_ROWS, read_trl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000, help="rows in the generated file (default 10000)")
    p.add_argument("--text-chars", type=int, default=400, help="characters of each reply (default 400)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(args.rows):
                fh.write(json.dumps({
                    "prompt": [{"role": "user", "content": f"question {i} " + "q" * (args.text_chars // 2)}],
                    "chosen": [{"role": "assistant", "content": f"good {i} " + "g" * args.text_chars}],
                    "rejected": [{"role": "assistant", "content": f"bad {i} " + "b" * args.text_chars}]}) + "\n")
        store = Store(Path(tmp) / "bench.db")
        start = time.perf_counter()
        rows = read_trl(path)
        checked = time.perf_counter()
        chunks = []
        for first in range(0, len(rows), IMPORT_CHUNK_ROWS):  # as import_pairs splits them, timed one by one
            t = time.perf_counter()
            store.import_pairs(rows[first:first + IMPORT_CHUNK_ROWS], path.name)
            chunks.append(time.perf_counter() - t)
        pairs = store.stats()["training_pairs"]
        size_mib = path.stat().st_size / 2**20
        store.close()
    print(json.dumps({"rows": len(rows), "file_mib": round(size_mib, 1),
                      "read_check_s": round(checked - start, 2), "import_s": round(sum(chunks), 2),
                      "chunk_rows": IMPORT_CHUNK_ROWS, "slowest_chunk_s": round(max(chunks), 2),
                      "busy_timeout_s": BUSY_TIMEOUT_MS / 1000, "pairs_indexed": pairs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
