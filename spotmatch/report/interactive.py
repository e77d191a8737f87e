"""2-D projections of the embeddings as Plotly scatter plots, one trace per identity.

Plotly's hover labels cannot show images, so each point carries the index of its thumbnail and a
small script on the page (see page.py) shows that thumbnail beside the cursor.
"""
from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

SPLIT_SYMBOLS = {"train": "circle", "val": "diamond"}


def pca_2d(embeddings: np.ndarray, seed: int) -> np.ndarray:
    if len(embeddings) < 2:
        return np.zeros((len(embeddings), 2))
    return PCA(n_components=2, random_state=seed).fit_transform(embeddings)


def tsne_perplexity(n_points: int) -> float:
    """sklearn's default 30 needs perplexity < n; small sets get about a third of their size."""
    return float(min(30.0, max(1.0, (n_points - 1) / 3)))


def tsne_2d(embeddings: np.ndarray, seed: int) -> np.ndarray | None:
    """None when there are too few points for a meaningful neighbourhood (t-SNE needs n > perplexity)."""
    if len(embeddings) < 4:
        return None
    return TSNE(n_components=2, perplexity=tsne_perplexity(len(embeddings)), init="pca",
                metric="cosine", random_state=seed).fit_transform(embeddings)


def scatter_div(points: np.ndarray, identities: np.ndarray, splits: np.ndarray, labels: list[str],
                div_id: str, title: str) -> str:
    """An HTML <div> (no plotly.js: the page inlines it once) with one trace per identity;
    `customdata` is the point's index into the page's thumbnail list."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    palette = qualitative.Dark24 + qualitative.Light24  # 48 distinguishable colours, then they repeat
    figure = go.Figure()
    for number, identity in enumerate(sorted(set(identities))):
        mine = np.flatnonzero(identities == identity)
        figure.add_trace(go.Scatter(  # SVG, not WebGL: renders in headless browsers without a GPU
            x=points[mine, 0], y=points[mine, 1], mode="markers", name=str(identity),
            marker={"color": palette[number % len(palette)], "size": 9, "line": {"width": 0.5, "color": "white"},
                    "symbol": [SPLIT_SYMBOLS.get(s, "circle") for s in splits[mine]]},
            customdata=mine, text=[labels[i] for i in mine],
            hovertemplate="%{text}<extra></extra>",
        ))
    figure.update_layout(title=title, height=560, margin={"l": 40, "r": 10, "t": 50, "b": 40},
                         legend={"title": {"text": "identity (click to hide)"}, "font": {"size": 10}},
                         template="plotly_white", hovermode="closest")
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                          config={"displaylogo": False, "responsive": True})
