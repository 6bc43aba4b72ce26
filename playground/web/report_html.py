"""The whole dashboard as one self-contained HTML page (`render_report`), for
`python -m playground.report` and the Dashboard tab's "Make the HTML report" button."""

from __future__ import annotations

import html
import io
import json
import re

from matplotlib.figure import Figure

from playground.web.charts import CAPTIONS, PLOTS, TITLES, empty_sentence, figures
from playground.web.tables import TABLE_TITLES, headline_sentences, tables


# -- the shareable HTML report --------------------------------------------------------------------

def figure_svg(fig: Figure) -> str:
    """A figure as an inline <svg> element (glyphs as paths, so it looks the same in every browser)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    # matplotlib writes each text as a comment next to its glyphs; the text is data (version names).
    return re.sub(r"<!--.*?-->\n?", "", svg, flags=re.S)


REPORT_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.headline { font-size: 1.05rem; background: #f6f6f6; padding: 0.8rem 1rem; border-radius: 6px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1.2rem; }
figure { margin: 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 0.9rem; color: #444; } .note, .empty { font-size: 0.9rem; color: #7a4b00; }
.empty { border: 1px dashed #ccc; padding: 1rem; border-radius: 6px; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } .meta { color: #666; font-size: 0.85rem; }
"""


def embedded_json(data: dict) -> str:
    """The dict as JSON that cannot end the <script> element it sits in (every '<', '>', '&' escaped)."""
    text = json.dumps(data, ensure_ascii=False, sort_keys=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_report(data: dict, figures_by_key: dict[str, Figure | None] | None = None) -> str:
    """The whole dashboard as one self-contained HTML page: no external URL, no script needed to read it.

    `figures_by_key` reuses figures already drawn (the Dashboard tab's); by default they are drawn here.
    Every text from the dict is escaped: version names, user names and prompts come from people.
    """
    esc = html.escape
    drawn = figures_by_key if figures_by_key is not None else figures(data)
    title = f"RLHF Playground drift report: {data.get('model_id') or 'unknown model'}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{esc(title)}</title>",
        f"<style>{REPORT_CSS}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>",
        f'<p class="meta">Generated {esc(str(data.get("generated_at") or ""))}; live version '
        f'{esc(str(data.get("live") or "none"))}. Every interval is a 95% interval.</p>',
        f'<p class="headline">{esc(" ".join(headline_sentences(data)))}</p>',
        "<h2>Plots</h2>", '<div class="plots">',
    ]
    notes = data.get("notes") or {}
    for key in PLOTS:
        fig = drawn.get(key)
        parts.append(f'<figure id="plot-{key}"><h3>{esc(TITLES[key])}</h3>')
        if fig is None:
            parts.append(f'<p class="empty">{esc(empty_sentence(data, key))}</p>')
        else:
            parts.append(figure_svg(fig))
            if notes.get(key):
                parts.append(f'<p class="note">{esc(notes[key])}</p>')
        parts.append(f"<figcaption>{esc(CAPTIONS[key])}</figcaption></figure>")
    parts.append("</div>")
    for name, frame in tables(data).items():
        parts.append(f"<h2>{esc(TABLE_TITLES[name])}</h2>")
        if frame.empty:
            parts.append('<p class="empty">Nothing yet.</p>')
        else:
            parts.append(frame.to_html(index=False, escape=True, na_rep="", border=0))
    parts += [
        "<h2>Data</h2>",
        '<p class="meta">The dashboard\'s data as JSON, for reuse: the <code>dashboard-data</code> element of '
        "this file.</p>",
        f'<script type="application/json" id="dashboard-data">{embedded_json(data)}</script>',
        "</body>", "</html>",
    ]
    return "\n".join(parts) + "\n"


def report_data(html_text: str) -> dict:
    """The dict embedded in a report written by `render_report`."""
    match = re.search(r'<script type="application/json" id="dashboard-data">(.*?)</script>', html_text, re.S)
    if match is None:
        raise ValueError("no dashboard-data element in this HTML")
    return json.loads(match.group(1))
