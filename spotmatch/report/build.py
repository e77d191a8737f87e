"""`build_report`: embed a labelled table with a checkpoint, analyse, draw, write one HTML page."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.data.splits import SplitConfig
from spotmatch.data.tables import Dataset, load_dataset
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.run import split_for
from spotmatch.global_embed.checkpoint import read_checkpoint
from spotmatch.fusion.calibration import FusionModel
from spotmatch.global_embed.embed import EmbedConfig, Embedder
from spotmatch.io import atomic_path, write_text_atomic
from spotmatch.report import figures
from spotmatch.report.analysis import (RetrievalAnalysis, analyse, neighbour_queries, pair_similarities,
                                       ranked_neighbours, report_protocol, sample_rows)
from spotmatch.report.interactive import pca_2d, scatter_div, tsne_2d, tsne_perplexity
from spotmatch.report.page import PageContent, render_page
from spotmatch.report.thumbnails import jpeg_data_uri, png_data_uri, thumbnail


@dataclass
class ReportConfig:
    data: Path
    checkpoint: Path
    out: Path  # the HTML file; PNGs go to `<out stem>_files/` beside it
    images: Path | None = None
    top_k: int = 5
    max_images: int = 600  # thumbnails and projection points (the page's weight)
    neighbour_queries: int = 12  # rows of the nearest-neighbour grid
    thumbnail_px: int = 96
    grid_px: int = 128  # neighbour-grid cells
    fusion: Path | None = None  # fusion.json; default: one beside the checkpoint, if any
    drop_ambiguous: bool = True
    split: SplitConfig | None = None  # used only when the checkpoint was trained on another table
    embed: EmbedConfig | None = None
    seed: int = 0


@dataclass
class ReportSummary:
    out: Path
    pngs: list[Path]
    n_images: int
    n_identities: int
    n_shown: int
    ib_map: float
    split_origin: str
    bytes_written: int


def check_config(conf: ReportConfig) -> None:
    if conf.top_k < 1:
        raise SpotmatchError(f"--top-k {conf.top_k}: must be at least 1")
    if conf.max_images < 2:
        raise SpotmatchError(f"--max-images {conf.max_images}: must be at least 2 (the projections need points)")
    if conf.out.suffix.lower() not in (".html", ".htm"):
        raise SpotmatchError(f"{conf.out}: the report is an HTML file; give --out a name ending in .html")
    folder = figures_folder(conf.out)
    if folder.exists() and not folder.is_dir():
        raise SpotmatchError(f"{folder}: a file stands where the report keeps its figures; move it, or give --out another name")


def figures_folder(out: Path) -> Path:
    """Where the page's figures are also saved as PNG files, beside it."""
    return out.parent / f"{out.stem}_files"


def reliability_png(conf: ReportConfig, embedder_id: str) -> Path | None:
    """The fusion stage's reliability diagram: beside the given fusion.json (refused when it calibrates
    another model), or beside the checkpoint when the fusion.json there calibrates this one."""
    if conf.fusion is not None:
        FusionModel.load(conf.fusion, embedder_id=embedder_id)  # one line: missing, not a calibration, another model's
        png = conf.fusion.parent / "reliability.png"
        if not png.is_file():
            raise SpotmatchError(f"{png}: no reliability diagram beside {conf.fusion}; re-run the calibration that writes it")
        return png
    beside = conf.checkpoint.parent
    if not (beside / "fusion.json").is_file() or not (beside / "reliability.png").is_file():
        return None
    try:  # a run trained again (train --overwrite) leaves the old model's calibration beside the new one
        FusionModel.load(beside / "fusion.json", embedder_id=embedder_id)
    except SpotmatchError:
        return None
    return beside / "reliability.png"


# What a reviewer finds a photo by beside its file name, shown in the neighbour table when the labels table has it.
PHOTO_FACT_COLUMNS = ("station", "camera", "date", "time", "side")


@dataclass
class NeighbourList:
    """One row of the neighbour grid: a validation query (table position) and its top gallery rows."""

    query_row: int
    gallery_rows: np.ndarray
    similarities: np.ndarray


def neighbour_lists(dataset: Dataset, analysis: RetrievalAnalysis, conf: ReportConfig) -> list[NeighbourList]:
    identities = dataset.table["identity"].to_numpy()
    lists = []
    for query_index in neighbour_queries(analysis, identities, conf.neighbour_queries):
        gallery_rows, similarities = ranked_neighbours(analysis, query_index, conf.top_k)
        lists.append(NeighbourList(int(analysis.protocol.query_rows[query_index]), gallery_rows, similarities))
    return lists


def neighbour_rows(dataset: Dataset, lists: list[NeighbourList], conf: ReportConfig) -> list[dict]:
    identities = dataset.table["identity"].to_numpy()
    return [{
        "query": thumbnail(dataset.paths[entry.query_row], conf.grid_px),
        "query_label": f"{number}: {identities[entry.query_row]}",
        "neighbours": [(thumbnail(dataset.paths[g], conf.grid_px), str(identities[g]), float(s),
                        identities[g] == identities[entry.query_row]) for g, s in zip(entry.gallery_rows, entry.similarities)],
    } for number, entry in enumerate(lists, start=1)]


def neighbour_table(dataset: Dataset, lists: list[NeighbourList]) -> pd.DataFrame:
    """The grid's photos as text, numbered as its rows: file name, identity, similarity and the photo's facts
    (station, date, ...), so a reviewer can find each photo; rank 0 is the query."""
    table = dataset.table
    facts = [column for column in PHOTO_FACT_COLUMNS if column in table.columns]
    rows = []
    for number, entry in enumerate(lists, start=1):
        query_identity = table["identity"].iat[entry.query_row]
        ranked = [(0, entry.query_row, None)] + [(rank, int(g), float(s)) for rank, (g, s)
                                                 in enumerate(zip(entry.gallery_rows, entry.similarities), start=1)]
        for rank, row, similarity in ranked:
            rows.append({"grid_row": number, "rank": rank, "filename": table["filename"].iat[row],
                         "identity": table["identity"].iat[row], "similarity": similarity,
                         "same_individual": None if rank == 0 else bool(table["identity"].iat[row] == query_identity),
                         **{column: table[column].iat[row] for column in facts}})
    return pd.DataFrame(rows, columns=["grid_row", "rank", "filename", "identity", "similarity", "same_individual", *facts])


def draw_pngs(dataset: Dataset, analysis: RetrievalAnalysis, neighbours: list[NeighbourList], history: list[dict],
              shown: np.ndarray, conf: ReportConfig, folder: Path, fusion_png: Path | None) -> dict[str, Path]:
    identities = dataset.table["identity"].to_numpy()
    same, different = pair_similarities(analysis, identities)
    pngs = {
        "training": figures.training_curves(history, folder / "training.png") if history else None,
        "histogram": figures.similarity_histograms(same, different, folder / "similarity_histogram.png"),
        "heatmap": figures.similarity_heatmap(analysis.embeddings[shown], identities[shown], folder / "similarity_heatmap.png"),
        "neighbours": figures.neighbour_grid(neighbour_rows(dataset, neighbours, conf), conf.top_k, folder / "neighbours.png"),
    }
    if fusion_png is not None:
        copied = folder / "reliability.png"
        with atomic_path(copied) as tmp:
            shutil.copyfile(fusion_png, tmp)
        pngs["reliability"] = copied
    return {key: path for key, path in pngs.items() if path is not None}


def scatter_divs(dataset: Dataset, analysis: RetrievalAnalysis, shown: np.ndarray, seed: int) -> tuple[dict[str, str], str | None]:
    """PCA and t-SNE plot divs over the shown rows; customdata indexes the shown list (= thumbnails)."""
    identities = dataset.table["identity"].to_numpy()[shown]
    splits = analysis.split.to_numpy()[shown]
    labels = [f"{identity} ({split})<br>{name}" for identity, split, name
              in zip(identities, splits, dataset.table["filename"].to_numpy()[shown])]
    embeddings = analysis.embeddings[shown]
    divs = {"pca": scatter_div(pca_2d(embeddings, seed), identities, splits, labels, "pca-plot", "PCA of the embeddings")}
    tsne_points = tsne_2d(embeddings, seed)
    if tsne_points is None:
        return divs, f"t-SNE skipped: {len(shown)} images are too few."
    title = f"t-SNE of the embeddings (cosine, perplexity {tsne_perplexity(len(shown)):.0f})"
    divs["tsne"] = scatter_div(tsne_points, identities, splits, labels, "tsne-plot", title)
    return divs, None


def build_report(conf: ReportConfig) -> ReportSummary:
    check_config(conf)
    payload = read_checkpoint(conf.checkpoint)  # fails first, in one line, before any work
    dataset = load_dataset(conf.data, conf.images, drop_ambiguous=conf.drop_ambiguous)
    split, split_by, origin = split_for(dataset, conf.split or SplitConfig(by="identity"), conf.checkpoint)
    protocol = report_protocol(dataset, split, split_by)
    embedder = Embedder.from_checkpoint(conf.checkpoint, conf.embed)
    fusion_png = reliability_png(conf, embedder.model_id)  # a wrong --fusion is refused before the embedding
    analysis = analyse(dataset, embedder.embed(dataset.paths), protocol, split, origin)
    shown = sample_rows(split, conf.max_images, conf.seed)

    folder = figures_folder(conf.out)
    # Drawn into a staging folder that replaces the figures folder only with the page: an interrupted run
    # leaves neither figures without a page nor a page beside another run's figures.
    staging = folder.with_name(f"{folder.name}.part")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        neighbours = neighbour_lists(dataset, analysis, conf)
        pngs = draw_pngs(dataset, analysis, neighbours, payload.get("history", []), shown, conf, staging, fusion_png)
        page, summary = _render(conf, payload, dataset, analysis, neighbour_table(dataset, neighbours), shown, folder,
                                pngs, fusion_png)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
        write_text_atomic(page, conf.out, follow=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _render(conf: ReportConfig, payload: dict, dataset: Dataset, analysis: RetrievalAnalysis, neighbours: pd.DataFrame,
            shown: np.ndarray, folder: Path, pngs: dict[str, Path], fusion_png: Path | None) -> tuple[str, ReportSummary]:
    """The page's HTML, and what it holds; `pngs` are drawn, and will be in `folder`."""
    split, origin = analysis.split, analysis.split_origin
    divs, tsne_note = scatter_divs(dataset, analysis, shown, conf.seed)
    n_val = int((split == "val").sum())
    overall = analysis.metrics_by_view["all"]
    content = PageContent(
        title=f"spotmatch report: {conf.checkpoint.name} on {conf.data.name}",
        facts=[("checkpoint", f"{conf.checkpoint} ({payload['embedder_config']['backbone']}, "
                              f"{payload['embedder_config']['image_size']} px, epoch {payload.get('epoch', '?')})"),
               ("data", f"{conf.data} ({len(dataset)} images, {dataset.table['identity'].nunique()} identities)"),
               ("split", f"{origin}: {n_val} validation images, {len(dataset) - n_val} training images"),
               ("protocol", analysis.protocol.kind),
               ("IB-mAP (all)", f"{overall['ib_map']:.3f} over {overall['n_queries']} queries, {overall['n_identities']} identities")],
        metrics_by_view=analysis.metrics_by_view,
        per_identity=analysis.per_identity,
        neighbours=neighbours,
        figures={key: png_data_uri(path) for key, path in pngs.items()},
        figure_files={key: f"{folder.name}/{path.name}" for key, path in pngs.items()},
        scatter_divs=divs,
        thumbnails=[jpeg_data_uri(thumbnail(dataset.paths[row], conf.thumbnail_px)) for row in shown],
        sample_note=(f"Showing {len(shown)} of {len(dataset)} images (all validation images first, then a random "
                     f"sample of training images, seed {conf.seed}; at most {conf.max_images} to keep the page light)."
                     if len(shown) < len(dataset) else f"Showing all {len(dataset)} images."),
        top_k=conf.top_k,
        notes={key: note for key, note in {
            "tsne": tsne_note,
            "heatmap": f"The {len(shown)} images of the projections, all pairs.",
            "neighbours": "One validation query per identity, worst identities first (at most "
                          f"{conf.neighbour_queries}); similarity under each neighbour. The table below names every photo.",
            # Not drawn from this page's images: a reader would take it for their calibration.
            "reliability": None if fusion_png is None else
                           f"Copied from {fusion_png}: the calibration's own held-out pairs (spotmatch calibrate), not the"
                           f" images of this page.",
            "training": None if any(not np.isnan(row.get("val_ib_map", np.nan)) for row in payload.get("history", []))
                        else "No validation IB-mAP was measured during training.",
        }.items() if note},
    )
    page = render_page(content)
    return page, ReportSummary(out=conf.out, pngs=[folder / path.name for path in pngs.values()], n_images=len(dataset),
                               n_identities=int(dataset.table["identity"].nunique()), n_shown=len(shown),
                               ib_map=overall["ib_map"], split_origin=origin, bytes_written=len(page.encode("utf-8")))
