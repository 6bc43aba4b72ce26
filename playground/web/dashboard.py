"""The Dashboard tab: `build_dashboard(get_data, get_compare=None) -> DashboardView`.

Called by the page builder inside an open `gr.Blocks()` (normally inside `gr.Tab("Dashboard")`). It lays
out the headline, the plots with their captions, the tables, a side-by-side comparison of two versions'
replies, and downloads (each table as CSV, the data as JSON; the whole dashboard as one HTML file, made
when asked for, since drawing it takes about a second). The
drawing is `playground.web.charts`; the callbacks here only fetch the dict and hand it over.

Refreshes come from the Refresh button and a timer. Inside a `gr.Tab` the timer runs only while that
tab is shown: it starts when the tab is selected and, when the tabs are an explicit `gr.Tabs()`, stops
when another tab is. Unchanged data (the same dict but for its time stamp) is not drawn again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gradio as gr
import pandas as pd
from gradio.context import Context

from playground.web import charts, report_html
from playground.web import tables as tables_mod

REFRESH_S = 10.0
DOWNLOADS = {"versions": "versions.csv", "leaderboard": "leaderboard.csv", "annotators": "annotators.csv",
             "data": "dashboard.json", "report": "dashboard-report.html"}
# Plots laid out two to a row, in the order a reader asks: moved? preferred? at what cost? learned? stale?
PLOT_ROWS = (("kl", "win_rate"), ("frontier", "leaderboard"), ("length", "diversity"), ("semantic", "map"),
             ("held_out", "staleness"), ("prompt_drift", "curves"))


@dataclass
class DashboardState:
    """What one browser tab holds of the dashboard (a gr.State: nothing is shared between sessions)."""

    key: str | None = None  # the data last drawn, less its time stamp
    data: dict | None = None  # and the data itself, for the HTML report made on request
    folder: str | None = None  # this tab's download files

    def download_dir(self) -> Path:
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="playground-dashboard-")
        return Path(self.folder)

    def remove_files(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@dataclass
class DashboardView:
    """The tab's components, for the page builder and the tests; `refresh` and `compare` are its callbacks."""

    state: gr.State
    headline: gr.Markdown
    updated: gr.Markdown
    refresh_button: gr.Button
    timer: gr.Timer
    plots: dict[str, gr.Plot]
    notes: dict[str, gr.Markdown]
    tables: dict[str, gr.Dataframe]
    compare_a: gr.Dropdown
    compare_b: gr.Dropdown
    compare_table: gr.Dataframe
    downloads: dict[str, gr.DownloadButton]
    make_report: gr.Button
    refresh: Callable = field(repr=False)  # (state, version_a, version_b) -> values for `outputs`
    compare: Callable = field(repr=False)  # (version_a, version_b) -> DataFrame
    report: Callable = field(repr=False)  # (state) -> the report download's update
    inputs: list = field(default_factory=list, repr=False)
    outputs: list = field(default_factory=list, repr=False)


def data_key(data: dict) -> str:
    """A digest of the dict without `generated_at`: equal keys draw the same dashboard."""
    body = {k: v for k, v in data.items() if k != "generated_at"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def plot_note(data: dict, key: str, empty: bool) -> str:
    """Under a plot: its caption, and why it is empty (or the dict's note on it)."""
    caption = tables_mod.markdown_text(charts.CAPTIONS[key])
    if empty:
        return f"**Nothing to plot yet.** {tables_mod.markdown_text(charts.empty_sentence(data, key))}\n\n{caption}"
    note = (data.get("notes") or {}).get(key)
    return f"{caption}\n\n*{tables_mod.markdown_text(note)}*" if note else caption


def write_downloads(folder: Path, data: dict, frames: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Every table as CSV and the dict as JSON, written into `folder`; their paths by name."""
    paths = {name: folder / DOWNLOADS[name] for name in (*frames, "data")}
    for name, frame in frames.items():
        frame.to_csv(paths[name], index=False)
    paths["data"].write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    return {name: str(path) for name, path in paths.items()}


def write_report(folder: Path, data: dict) -> str:
    """The HTML report, on request: drawing every plot as SVG takes about a second, too much for each refresh."""
    path = folder / DOWNLOADS["report"]
    path.write_text(report_html.render_report(data), encoding="utf-8")
    return str(path)


def build_dashboard(get_data: Callable[[], dict],
                    get_compare: Callable[[str, str], list[dict]] | None = None) -> DashboardView:
    tab = Context.block if isinstance(Context.block, gr.Tab) else None
    state = gr.State(lambda: DashboardState(), delete_callback=lambda s: s.remove_files())
    headline = gr.Markdown("Loading the dashboard…", elem_id="dashboard-headline")
    with gr.Row():
        updated = gr.Markdown(elem_id="dashboard-updated")
        refresh_button = gr.Button("Refresh", size="sm", scale=0, elem_id="dashboard-refresh")
    # Inside a tab the timer waits for the tab to be shown; a dashboard on its own page runs it at once.
    timer = gr.Timer(REFRESH_S, active=tab is None)

    plots, notes = {}, {}
    for row in PLOT_ROWS:
        with gr.Row(equal_height=False):
            for key in row:
                with gr.Column():
                    plots[key] = gr.Plot(label=charts.TITLES[key], format="png", elem_id=f"dashboard-{key}")
                    notes[key] = gr.Markdown(tables_mod.markdown_text(charts.CAPTIONS[key]),
                                             elem_id=f"dashboard-{key}-note")
    tables = {}
    for name, title in tables_mod.TABLE_TITLES.items():
        tables[name] = gr.Dataframe(label=title, interactive=False, wrap=True, elem_id=f"dashboard-table-{name}")

    with gr.Accordion("Compare two versions' replies", open=False):
        with gr.Row():
            compare_a = gr.Dropdown(label="Version A", choices=[], elem_id="dashboard-compare-a")
            compare_b = gr.Dropdown(label="Version B", choices=[], elem_id="dashboard-compare-b")
        compare_table = gr.Dataframe(
            headers=["prompt", "A", "B"], datatype=["str", "str", "str"], interactive=False, wrap=True,
            label="Replies to the same probe prompts" if get_compare else "Comparing replies is not available here",
            elem_id="dashboard-compare")
    with gr.Row():
        downloads = {name: gr.DownloadButton(f"Download {filename}", size="sm", interactive=False,
                                             elem_id=f"dashboard-download-{name}")
                     for name, filename in DOWNLOADS.items()}
        make_report = gr.Button("Make the HTML report", size="sm", elem_id="dashboard-make-report")

    def refresh(view: DashboardState, version_a: str | None, version_b: str | None) -> list:
        try:
            data = get_data()
        except Exception as exc:  # no toast on every tick: the line under the headline says why, the view stays
            return [view, gr.skip(), tables_mod.markdown_text(f"Could not refresh the dashboard: {exc}")] + \
                [gr.skip()] * (len(outputs) - 3)
        stamp = tables_mod.markdown_text(f"Data from {data.get('generated_at') or 'now'}; "
                                     f"refreshes every {REFRESH_S:.0f} s while shown.")
        key = data_key(data)
        if key == view.key:
            return [view, gr.skip(), stamp] + [gr.skip()] * (len(outputs) - 3)
        view.key, view.data = key, data
        drawn = charts.figures(data)
        frames = tables_mod.tables(data)
        files = write_downloads(view.download_dir(), data, frames)
        names = charts.version_names(data)
        base, live = charts.base_version(data), data.get("live") or (names[-1] if names else None)
        values = [view, tables_mod.headline_markdown(data), stamp]
        for key_ in plots:
            fig = drawn[key_]
            values += [gr.update(value=fig, visible=fig is not None), plot_note(data, key_, fig is None)]
        values += [frames[name] for name in tables]
        values += [gr.update(choices=names, value=version_a if version_a in names else (base if names else None)),
                   gr.update(choices=names, value=version_b if version_b in names else live)]
        # the report of the data before is stale: it is made again on request
        values += [gr.update(value=files[name], interactive=True) if name in files
                   else gr.update(value=None, interactive=False) for name in downloads]
        return values

    def report(view: DashboardState):
        if view.data is None:
            raise gr.Error("The dashboard has not loaded yet: press Refresh first.")
        return gr.update(value=write_report(view.download_dir(), view.data), interactive=True)

    def compare(version_a: str | None, version_b: str | None) -> pd.DataFrame:
        if get_compare is None or not version_a or not version_b:
            return tables_mod.compare_table([], version_a or "A", version_b or "B")
        try:
            rows = get_compare(version_a, version_b)
        except (LookupError, ValueError) as exc:
            raise gr.Error(f"Could not compare {version_a} and {version_b}: {exc}") from exc
        return tables_mod.compare_table(rows, version_a, version_b)

    inputs = [state, compare_a, compare_b]
    outputs = [state, headline, updated]
    for key in plots:
        outputs += [plots[key], notes[key]]
    outputs += [*tables.values(), compare_a, compare_b, *downloads.values()]

    quiet = dict(api_visibility="private", show_progress="hidden")
    # Private events still take an API name (the function's by default): these are named apart, so the
    # page's public endpoints (/dashboard, /compare) keep theirs.
    refresh_button.click(refresh, inputs, outputs, api_visibility="private", api_name="dashboard_view_refresh")
    make_report.click(report, [state], downloads["report"], api_visibility="private",
                      api_name="dashboard_view_report")
    timer.tick(refresh, inputs, outputs, api_name="dashboard_view_tick", **quiet)
    for dropdown in (compare_a, compare_b):
        dropdown.change(compare, [compare_a, compare_b], compare_table, api_name="dashboard_view_compare", **quiet)
    if tab is None:
        Context.root_block.load(refresh, inputs, outputs, **quiet)
    else:
        def shown(view, version_a, version_b):
            return [gr.Timer(active=True)] + refresh(view, version_a, version_b)

        tab.select(shown, inputs, [timer, *outputs], **quiet)
        if isinstance(tab.parent, gr.Tabs):
            def tab_changed(evt: gr.SelectData):
                return gr.Timer(active=evt.value == tab.label)

            tab.parent.select(tab_changed, None, timer, **quiet)

    return DashboardView(state=state, headline=headline, updated=updated, refresh_button=refresh_button,
                         timer=timer, plots=plots, notes=notes, tables=tables, compare_a=compare_a,
                         compare_b=compare_b, compare_table=compare_table, downloads=downloads,
                         make_report=make_report, refresh=refresh, compare=compare, report=report, inputs=inputs,
                         outputs=outputs)
