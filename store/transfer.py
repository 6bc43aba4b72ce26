"""`python -m store export` and `python -m store import`: the store's data out to other tools, and in.

    python -m store export --format trl --out pairs.jsonl      # TRL's conversational preference format
    python -m store export --format arena --out battles.json   # FastChat's battle file, for its leaderboard
    python -m store import --format trl pairs.jsonl            # seed pairs, marked imported

Each prints a one-line JSON summary. An export that matches nothing writes nothing and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from store.exports import SIMULATED_CHOICES, ExportFilter
from store.formats import FORMATS, WRITERS
from store import imports
from store.imports import IMPORT_USER, ImportFormatError, read_trl

IMPORT_FORMATS = ("trl",)
# What each format holds: pairs (the pair index), thumbs (one row per rating), or arena votes.
ROWS_OF = {"trl": "pairs", "kto": "ratings", "hf": "pairs", "csv": "pairs", "arena": "arena votes"}

EXPORT_HELP = """Formats: trl (JSON lines, TRL's conversational preference format), kto (JSON lines, TRL's unpaired
format: one row per thumb up or down), hf (a `datasets` folder, save_to_disk, with provenance columns),
csv (one row per pair with provenance), arena (FastChat's cleaned battle file: the votes on arena pairs).

The held-out 10% of conversations is left out unless --include-held-out: it is what the app measures
every version on, and a model trained elsewhere on those pairs could not be fairly compared on them.
Arena exports hold every vote (a leaderboard is no training set). Pairs follow the rules of
store/pairs.py, the same pairs a round trains on (arena pairs included, marked)."""


def add_commands(commands, common: list[argparse.ArgumentParser]) -> None:
    export = commands.add_parser("export", parents=common, help="write pairs, thumbs or arena votes for other tools",
                                 description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--format", required=True, choices=FORMATS, help="the output format (see above)")
    export.add_argument("--out", required=True, type=Path, help="the file (a folder for hf) to write")
    export.add_argument("--since", help="only judgments at or after this ISO 8601 time (UTC unless it says)")
    export.add_argument("--until", help="only judgments before this ISO 8601 time")
    export.add_argument("--user", action="append", default=[], metavar="NAME",
                        help="only this person's judgments (repeat for several)")
    export.add_argument("--version", action="append", default=[], metavar="vN",
                        help="only pairs this version sampled (repeat for several; an arena pair matches either side)")
    export.add_argument("--simulated", choices=SIMULATED_CHOICES, default="all",
                        help="the autopilot's simulated annotators: only theirs (yes), only people's (no), or all "
                             "(default all)")
    export.add_argument("--include-held-out", action="store_true",
                        help="include the held-out 10%% of conversations (left out by default, see above)")
    export.add_argument("--force", action="store_true", help="replace --out if it exists (refused otherwise)")
    export.set_defaults(run=run_export)

    imp = commands.add_parser("import", parents=common, help="a TRL preference file becomes seed pairs",
                              description=imports.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("path", type=Path, help="JSON lines (or a JSON array), or a `datasets` folder")
    imp.add_argument("--format", choices=IMPORT_FORMATS, default="trl", help="the input format (default trl)")
    imp.add_argument("--user", default=IMPORT_USER,
                     help=f"whose pairs they are recorded as (default {IMPORT_USER!r})")
    imp.set_defaults(run=run_import)


def run_export(store, args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not args.force:
        print(f"error: {out} exists; give another --out, or --force to replace it", file=sys.stderr)
        return 1
    if out.exists() and out.is_dir() != (args.format == "hf"):
        kind, wanted = ("a folder", "a file") if out.is_dir() else ("a file", "a folder")
        print(f"error: {out} is {kind}; the {args.format} format writes {wanted}", file=sys.stderr)
        return 1
    try:
        filters = ExportFilter(since=args.since, until=args.until, users=tuple(args.user),
                               versions=tuple(args.version), simulated=args.simulated,
                               include_held_out=args.include_held_out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    what = ROWS_OF[args.format]
    if what == "pairs":
        rows = store.export_pairs(filters)
    elif what == "ratings":
        rows = store.export_ratings(filters)
    else:
        rows = store.export_arena_votes(filters)
    if not rows:
        totals = store.export_totals()
        print(f"nothing to export: no {what} match the filters ({json.dumps(filters.describe())}); the store holds "
              f"{json.dumps(totals)}. Nothing was written.", file=sys.stderr)
        return 1
    try:
        n = WRITERS[args.format](rows, out)
    except OSError as exc:  # the temporary file is gone with the failure: nothing half-written is left
        print(f"error: could not write {out}: {exc.strerror or exc}; nothing was written", file=sys.stderr)
        return 1
    print(json.dumps({"format": args.format, "rows": n, "of": what, "path": str(out), "filters": filters.describe()},
                     ensure_ascii=False))
    return 0


def run_import(store, args: argparse.Namespace) -> int:
    try:
        rows = read_trl(args.path)
        result = store.import_pairs(rows, args.path.name, user=args.user)
    except ImportFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary() | {"db": str(store.path)}, ensure_ascii=False))
    return 0
