"""The whole drift dashboard as one self-contained HTML file, to share or archive.

    python -m playground.report --db data/playground.db --out report.html [--model MODEL_ID]

Plots are inline SVG, tables are HTML tables, and the dashboard's data is embedded as JSON (the
`dashboard-data` element) for reuse; the file loads nothing from anywhere and needs no JavaScript.
`--model` may be left out when the store holds one model's versions; with several, it lists them.
The page is `render_report(data)`, the same the Dashboard tab's download writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from playground.web.report_html import render_report
from store import DEFAULT_DB, Store

__all__ = ["main", "parse_args", "pick_model", "render_report"]


class ReportError(RuntimeError):
    """A report that cannot be written, with what to do instead."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m playground.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default=DEFAULT_DB, help="the app's SQLite file (default: %(default)s)")
    p.add_argument("--out", default="report.html", help="the HTML file to write (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="the model id whose versions to report; none: the only one in the store")
    return p.parse_args(argv)


def pick_model(store: Store, model_id: str | None) -> str:
    """`model_id` if the store has versions of it; by default the only model the store has versions of."""
    models = sorted({v["model_id"] for v in store.policy_versions()})
    if model_id is not None:
        if model_id not in models:
            raise ReportError(f"no policy versions of model {model_id!r} in {store.path}; "
                              f"it has: {', '.join(models) or 'none'}")
        return model_id
    if not models:
        raise ReportError(f"no policy versions in {store.path}: the app records v0 when it first serves a model")
    if len(models) > 1:
        raise ReportError(f"{store.path} has versions of {len(models)} models; pick one with --model: "
                          + ", ".join(models))
    return models[0]


def write_report(db: str, out: str, model_id: str | None = None) -> Path:
    if not (str(db).startswith("file:") or os.path.exists(db)):
        raise ReportError(f"there is no database at {db}")  # Store() would create an empty one
    store = Store(db)
    try:
        model_id = pick_model(store, model_id)
        from playground.dashboard import dashboard_data  # here, not at import: render_report needs no store

        data = dashboard_data(store, model_id)
    finally:
        store.close()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(render_report(data), encoding="utf-8")
    partial.replace(path)  # a reader never sees half a report
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        path = write_report(args.db, args.out, args.model)
    except ReportError as exc:
        print(f"python -m playground.report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
