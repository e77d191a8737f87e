"""matplotlib without a display, and figures written whole: for every static chart the package makes."""
from __future__ import annotations

from pathlib import Path

from spotmatch.io import atomic_path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on servers and CI), imported only when a chart is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, out_png: str | Path, dpi: int = 100) -> Path:
    """The figure as one PNG, written to a temporary file and renamed; the figure is closed."""
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(figure)
    return out_png
