"""`spotmatch report`: one self-contained HTML page (plus PNGs) for looking at a trained embedder.

Training curves, same- vs different-individual similarity histograms, PCA and t-SNE of the
embeddings (Plotly, thumbnail on hover), a similarity heatmap ordered by identity, nearest-neighbour
grids, a per-identity AP table and, once fusion has been calibrated, its reliability diagram.
"""
from spotmatch.report.build import ReportConfig, ReportSummary, build_report

__all__ = ["ReportConfig", "ReportSummary", "build_report"]
