"""`python -m store stats --db PATH`: table counts as JSON. `migrate` upgrades a database in place."""

import argparse
import json
import sys

from store.db import DEFAULT_DB, Store, StoreError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m store", description=__doc__)
    parser.add_argument("command", choices=["stats", "migrate"])
    parser.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    args = parser.parse_args(argv)
    try:
        store = Store(args.db)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "stats":
        print(json.dumps(store.stats(), indent=2))
    else:
        print(json.dumps({"applied": store.stats()["schema"]}))
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
