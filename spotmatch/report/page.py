"""The HTML page: plain sections around the figures; plotly.js and every image are inlined."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field

import pandas as pd

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px auto; max-width: 1250px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; font-size: 14px; line-height: 1.5; }
table { border-collapse: collapse; font-size: 13px; } th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f5f5f5; }
#neighbour-table td { text-align: left; } tr.neighbour.query { background: #eef3fb; }
img.figure { max-width: 100%; border: 1px solid #eee; }
.note { color: #666; font-size: 13px; }
#hover-thumb { position: fixed; pointer-events: none; display: none; z-index: 10; border: 2px solid #333; background: white; }
"""

# Plotly hover labels cannot hold images: show the hovered point's thumbnail beside the cursor.
HOVER_SCRIPT = """
window.addEventListener('load', function () {
  var box = document.getElementById('hover-thumb');
  document.querySelectorAll('.js-plotly-plot').forEach(function (plot) {
    plot.on('plotly_hover', function (event) {
      var point = event.points[0], src = THUMBNAILS[point.customdata];
      if (!src) { return; }
      box.src = src; box.style.display = 'block';
      var e = event.event; box.style.left = (e.clientX + 18) + 'px'; box.style.top = Math.max(0, e.clientY - 50) + 'px';
    });
    plot.on('plotly_unhover', function () { box.style.display = 'none'; });
  });
});
"""


@dataclass
class PageContent:
    title: str
    facts: list[tuple[str, str]]  # (label, value) lines under the title
    metrics_by_view: dict[str, dict]
    per_identity: pd.DataFrame
    neighbours: pd.DataFrame  # the neighbour grid's photos as text, one row per photo (rank 0: the query)
    figures: dict[str, str]  # section key -> PNG data URI
    figure_files: dict[str, str]  # section key -> PNG path relative to the page
    scatter_divs: dict[str, str]  # "pca" / "tsne" -> plotly div HTML (tsne may be missing)
    thumbnails: list[str]  # data URIs, indexed by the scatter points' customdata
    sample_note: str
    top_k: int
    notes: dict[str, str] = field(default_factory=dict)  # section key -> extra sentence


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metrics_table(metrics_by_view: dict[str, dict]) -> str:
    header = "<tr><th>view</th><th>queries</th><th>identities</th><th>IB-mAP</th><th>mAP</th><th>top-1</th><th>top-5</th><th>pair ROC-AUC</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(view)}</td><td>{m['n_queries']}</td><td>{m['n_identities']}</td><td>{_number(m['ib_map'])}</td>"
        f"<td>{_number(m['map'])}</td><td>{_number(m['top1'])}</td><td>{_number(m['top5'])}</td><td>{_number(m['roc_auc'])}</td></tr>"
        for view, m in metrics_by_view.items())
    return f'<table id="metrics-table">{header}{rows}</table>'


def per_identity_table(per_identity: pd.DataFrame) -> str:
    header = ("<tr><th>identity</th><th>AP</th><th>top-1</th><th>queries</th><th>queries without a match</th>"
              "<th>gallery images</th></tr>")
    rows = "".join(
        f'<tr class="identity-row" data-identity="{html.escape(str(r.identity))}"><td>{html.escape(str(r.identity))}</td>'
        f'<td class="ap">{_number(r.ap, 4)}</td><td>{_number(r.top1)}</td><td>{r.queries}</td><td>{r.queries_without_match}</td>'
        f"<td>{r.gallery_images}</td></tr>"
        for r in per_identity.itertuples())
    return f'<table id="per-identity-ap">{header}{rows}</table>'


def _neighbour_cell(column: str, value) -> str:
    if column == "rank":
        return "query" if value == 0 else str(value)
    if column == "similarity":
        return _number(value)
    if column == "same_individual":
        return "" if value is None else ("yes" if value else "no")
    return str(value)


def neighbour_table(neighbours: pd.DataFrame) -> str:
    """One row per photo of the neighbour grid, grouped by grid row; the query's row starts each group."""
    header = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in neighbours.columns)
    rows = "".join(
        f'<tr class="neighbour{" query" if r["rank"] == 0 else ""}">'
        + "".join(f"<td>{html.escape(_neighbour_cell(c, v))}</td>" for c, v in r.items()) + "</tr>"
        for r in neighbours.to_dict("records"))
    return f'<table id="neighbour-table"><tr>{header}</tr>{rows}</table>'


def _figure(content: PageContent, key: str, alt: str) -> str:
    if key not in content.figures:
        return ""
    link = html.escape(content.figure_files[key])
    note = f'<p class="note">{html.escape(content.notes[key])}</p>' if key in content.notes else ""
    return (f'{note}<a href="{link}"><img class="figure" id="fig-{key}" alt="{html.escape(alt)}" '
            f'src="{content.figures[key]}"></a><p class="note">PNG: <a href="{link}">{link}</a></p>')


def render_page(content: PageContent) -> str:
    import plotly.offline

    facts = "".join(f"<div><b>{html.escape(label)}:</b> {html.escape(value)}</div>" for label, value in content.facts)
    tsne = content.scatter_divs.get("tsne") or f'<p class="note">{html.escape(content.notes.get("tsne", "t-SNE skipped."))}</p>'
    reliability = ""
    if "reliability" in content.figures:
        reliability = "<h2>Fusion reliability</h2>" + _figure(content, "reliability", "reliability diagram")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(content.title)}</title>
<style>{STYLE}</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>
</head><body>
<h1>{html.escape(content.title)}</h1>
<div class="meta">{facts}</div>
<h2>Retrieval on the held-out split</h2>
{metrics_table(content.metrics_by_view)}
<h2>Training</h2>
{_figure(content, "training", "training loss and validation IB-mAP per epoch")}
<h2>Similarity: same vs different individual</h2>
{_figure(content, "histogram", "similarity histograms")}
<h2>Embedding projections</h2>
<p class="note">{html.escape(content.sample_note)} Circles: training images; diamonds: validation images.
Hover a point for its thumbnail; click a legend entry to hide an identity.</p>
{content.scatter_divs["pca"]}
{tsne}
<h2>Similarity heatmap</h2>
{_figure(content, "heatmap", "similarity heatmap ordered by identity")}
<h2>Nearest neighbours (top-{content.top_k})</h2>
{_figure(content, "neighbours", "nearest-neighbour grids")}
{neighbour_table(content.neighbours)}
<h2>AP per identity</h2>
<p class="note">AP: mean average precision of the identity's validation queries (view "all"); IB-mAP is the mean of this column. Worst first.</p>
{per_identity_table(content.per_identity)}
{reliability}
<img id="hover-thumb" alt="">
<script type="text/javascript">var THUMBNAILS = {json.dumps(content.thumbnails)};{HOVER_SCRIPT}</script>
</body></html>
"""
