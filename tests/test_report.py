"""The shareable HTML report, its CLI, and the Dashboard tab's callbacks (called directly, no server)."""

from __future__ import annotations

import json
import re

import gradio as gr
import pandas as pd
import pytest
from matplotlib.figure import Figure

from playground import report
from playground.web import charts, report_html
from playground.web import tables as tables_mod
from playground.web.dashboard import DOWNLOADS, DashboardState, build_dashboard, data_key
from tests.test_charts import DEGENERATE, realistic_data, with_v1_evaluation

EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def page():
    return report_html.render_report(realistic_data())


def test_report_has_the_headline_every_caption_and_one_svg_per_plot_with_data(page):
    for caption in charts.CAPTIONS.values():
        assert charts.html.escape(caption) in page
    assert page.count("<svg") == len(charts.CHARTS)  # the realistic dict has data for every plot
    assert "v3 is live. It has moved 4.2 nats from v0" in page
    assert page.count("<table") == 3 and "sim-concise-1" in page


def test_report_is_self_contained(page):
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script>" not in page and "<script " not in page.replace('<script type="application/json"', "")
    assert "<link" not in page and "@import" not in page


def test_report_embeds_the_data_as_json(page):
    assert report_html.report_data(page) == realistic_data()


@pytest.mark.parametrize("state", list(DEGENERATE))
def test_report_of_degenerate_data_says_why_each_plot_is_empty(state):
    data = DEGENERATE[state]()
    page = report_html.render_report(data)
    drawn = charts.figures(data)
    assert page.count("<svg") == sum(fig is not None for fig in drawn.values())
    for key, fig in drawn.items():
        if fig is None:
            assert charts.html.escape(charts.empty_sentence(data, key)) in page
    assert report_html.report_data(page) == data


def test_text_from_people_is_escaped_everywhere():
    data = realistic_data()
    data["annotators"][0]["user"] = EVIL
    data["versions"][3]["name"] = data["evaluations"][3]["version"] = data["live"] = "v3<b>"
    data["evaluations"][2]["error"] = EVIL
    data["notes"]["kl"] = f"note {EVIL}"
    page = report_html.render_report(data)
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the annotators table and the note
    assert "v3<b>" not in page and "v3&lt;b&gt;" in page
    assert report_html.report_data(page) == data  # and it still round-trips through the embedded JSON


# -- the CLI ----------------------------------------------------------------------------------------

def test_cli_refuses_a_missing_database(tmp_path, capsys):
    assert report.main(["--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "r.html")]) == 2
    assert "there is no database at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_cli_lists_the_models_when_several(tmp_path, capsys):
    from store import Store

    store = Store(tmp_path / "two.db")
    store.ensure_base_version("model-a")
    store.ensure_base_version("model-b")
    store.close()
    assert report.main(["--db", str(tmp_path / "two.db"), "--out", str(tmp_path / "r.html")]) == 2
    assert "pick one with --model: model-a, model-b" in capsys.readouterr().err
    assert report.main(["--db", str(tmp_path / "two.db"), "--model", "model-c"]) == 2
    assert "it has: model-a, model-b" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_cli_end_to_end_on_a_sqlite_file(tmp_path, capsys):
    from playground import dashboard

    if not hasattr(dashboard, "dashboard_data"):
        pytest.skip("playground.dashboard.dashboard_data is not written yet")
    from store import Store

    def reply(slot, text):
        return {"slot": slot, "text": text, "policy_version": "v0", "model_id": "tiny", "seed": 1, "temperature": 1.0,
                "top_p": 1.0, "max_new_tokens": 16, "finish_reason": "stop", "n_tokens": 2, "logprob_sum": -3.0}

    store = Store(tmp_path / "p.db")
    store.ensure_base_version("tiny")
    conv = store.start_conversation("sess", EVIL, "tiny", "")
    turn_id, _ = store.record_turn(conv, 0, [{"role": "user", "content": EVIL}], EVIL,
                                   [reply("a", "hi"), reply("b", "hey")])
    store.record_choice(turn_id, 0, "a", EVIL, "sess")
    store.close()
    out = tmp_path / "out" / "report.html"
    assert report.main(["--db", str(tmp_path / "p.db"), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()
    data = report_html.report_data(page)
    assert data["model_id"] == "tiny" and [v["name"] for v in data["versions"]] == ["v0"]
    assert "<script>alert" not in page
    for caption in charts.CAPTIONS.values():
        assert charts.html.escape(caption) in page


# -- the Dashboard tab ------------------------------------------------------------------------------

def compare_rows(a: str, b: str) -> list[dict]:
    if a == "v9":
        raise KeyError("no version v9")
    return [{"prompt": "Name a colour.", "a": f"{a}: blue", "b": f"{b}: a deep, calm blue"},
            {"prompt": EVIL, "a": "no", "b": "no"}]


def build(get_data, tab: bool = True, get_compare=compare_rows):
    with gr.Blocks() as demo:
        if tab:
            with gr.Tabs():
                with gr.Tab("Chat"):
                    gr.Markdown("chat")
                with gr.Tab("Dashboard"):
                    view = build_dashboard(get_data, get_compare)
        else:
            view = build_dashboard(get_data, get_compare)
    return demo, view


def by_component(view, values) -> dict:
    assert len(values) == len(view.outputs)
    return {id(c): v for c, v in zip(view.outputs, values)}


def test_refresh_fills_every_plot_table_and_download(tmp_path):
    data = realistic_data()
    _, view = build(lambda: data)
    state = DashboardState()
    try:
        out = by_component(view, view.refresh(state, None, None))
        assert out[id(view.headline)].startswith("v3 is live.")
        assert "2025-05-04T12:30:00" in out[id(view.updated)]
        for key, plot in view.plots.items():
            assert isinstance(out[id(plot)]["value"], Figure) and out[id(plot)]["visible"], key
            assert out[id(view.notes[key])].startswith(tables_mod.markdown_text(charts.CAPTIONS[key])[:30])
        for name, table in view.tables.items():
            assert isinstance(out[id(table)], pd.DataFrame) and not out[id(table)].empty, name
        assert out[id(view.compare_a)]["value"] == "v0" and out[id(view.compare_b)]["value"] == "v3"
        assert out[id(view.compare_a)]["choices"] == ["v0", "v1", "v2", "v3"]
        paths = {name: out[id(button)]["value"] for name, button in view.downloads.items()}
        assert set(paths) == set(DOWNLOADS)
        assert list(pd.read_csv(paths["versions"])["version"]) == ["v0", "v1", "v2", "v3"]
        assert list(pd.read_csv(paths["annotators"])["user"]) == ["alice", "sim-concise-1"]
        assert json.loads(open(paths["data"]).read()) == data
        assert paths["report"] is None and not out[id(view.downloads["report"])]["interactive"]
        made = view.report(state)  # the HTML report is made when asked for
        assert made["interactive"] and open(made["value"]).read().count("<svg") == len(charts.CHARTS)
        # the same data again (a new time stamp only): nothing is drawn again, the time stamp moves
        data = {**data, "generated_at": "2025-05-04T12:31:00+00:00"}
        again = by_component(view, view.refresh(state, "v1", "v2"))
        assert again[id(view.plots["kl"])] == gr.skip() and again[id(view.headline)] == gr.skip()
        assert "12:31:00" in again[id(view.updated)]
        # new data: redrawn, and the versions picked for the comparison are kept
        data = with_v1_evaluation("running")
        third = by_component(view, view.refresh(state, "v1", "v3"))
        assert third[id(view.compare_a)]["value"] == "v1" and third[id(view.compare_b)]["value"] == "v1"
    finally:
        folder = state.folder
        state.remove_files()
    assert folder and not (tmp_path / folder).exists()


@pytest.mark.parametrize("state_name", list(DEGENERATE))
def test_refresh_of_degenerate_data_hides_the_plots_and_says_why(state_name):
    data = DEGENERATE[state_name]()
    _, view = build(lambda: data)
    state = DashboardState()
    try:
        out = by_component(view, view.refresh(state, None, None))
    finally:
        state.remove_files()
    drawn = charts.figures(data)
    for key, plot in view.plots.items():
        if drawn[key] is None:
            assert out[id(plot)] == {"__type__": "update", "value": None, "visible": False}
            assert out[id(view.notes[key])].startswith("**Nothing to plot yet.**")
    for table in view.tables.values():
        assert isinstance(out[id(table)], pd.DataFrame)
    assert out[id(view.headline)]


def test_the_report_button_before_any_data_says_so():
    _, view = build(realistic_data)
    with pytest.raises(gr.Error, match="press Refresh"):
        view.report(DashboardState())


def test_a_failing_get_data_keeps_the_view_and_says_why():
    def broken():
        raise RuntimeError("database is locked")

    _, view = build(broken)
    out = by_component(view, view.refresh(DashboardState(), None, None))
    assert "Could not refresh the dashboard: database is locked" in out[id(view.updated)]
    assert out[id(view.plots["kl"])] == gr.skip()


def test_compare_renders_what_get_compare_returns():
    _, view = build(realistic_data)
    frame = view.compare("v0", "v3")
    assert list(frame.columns) == ["prompt", "v0", "v3"]
    assert frame.iloc[0].tolist() == ["Name a colour.", "v0: blue", "v3: a deep, calm blue"]
    assert frame.iloc[1]["prompt"] == EVIL  # a Dataframe of str shows it as text
    with pytest.raises(gr.Error, match="no version v9"):
        view.compare("v9", "v3")
    assert view.compare(None, "v3").empty
    _, without = build(realistic_data, get_compare=None)
    assert without.compare("v0", "v3").empty


def test_the_timer_runs_only_while_the_tab_is_shown():
    demo, view = build(realistic_data)
    assert view.timer.active is False
    (tab,) = [b for b in demo.blocks.values() if isinstance(b, gr.Tab) and b.label == "Dashboard"]
    (tabs,) = [b for b in demo.blocks.values() if isinstance(b, gr.Tabs)]

    def outputs_of(block, event):
        return [[o._id for o in dep.outputs] for dep in demo.fns.values() if (block._id, event) in dep.targets]

    (shown,) = outputs_of(tab, "select")  # selecting the tab starts the timer and refreshes
    assert shown[0] == view.timer._id and len(shown) == 1 + len(view.outputs)
    assert outputs_of(tabs, "select") == [[view.timer._id]]  # selecting another tab stops it
    _, alone = build(realistic_data, tab=False)
    assert alone.timer.active is True


def test_data_key_ignores_the_time_stamp():
    data = realistic_data()
    assert data_key(data) == data_key({**data, "generated_at": "later"})
    changed = realistic_data()
    changed["annotators"][0]["votes"] += 1
    assert data_key(data) != data_key(changed)
