"""`python -m store COMMAND`: the database from the command line.

    python -m store stats                  # table counts as JSON
    python -m store migrate                # upgrade a database in place
    python -m store export --format trl --out pairs.jsonl   # data out (trl, kto, hf, csv, arena)
    python -m store import --format trl pairs.jsonl         # data in: seed pairs, marked imported
    python -m store users add NAME --role admin   # accounts for `python app.py --auth` (list, disable, enable)
"""

import argparse
import json
import sys

from store import transfer
from store.db import DEFAULT_DB, Store, StoreError
from store.users_command import add_users_command


def _stats(store: Store, args: argparse.Namespace) -> int:
    print(json.dumps(store.stats(), indent=2))
    return 0


def _migrate(store: Store, args: argparse.Namespace) -> int:
    print(json.dumps({"applied": store.stats()["schema"]}))
    return 0


def common_options() -> argparse.ArgumentParser:
    """The options every command takes (after its name: `python -m store stats --db PATH`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m store", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [common_options()]
    commands.add_parser("stats", parents=common, help="table counts as JSON").set_defaults(run=_stats)
    commands.add_parser("migrate", parents=common, help="upgrade the database's schema in place").set_defaults(
        run=_migrate)
    transfer.add_commands(commands, common)
    add_users_command(commands, common)
    # Each further command adds its own subparser (parents=common), with `run(store, args) -> exit code`
    # as its default.
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        store = Store(args.db)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return args.run(store, args)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
