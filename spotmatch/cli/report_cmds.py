"""`spotmatch report`: an HTML page for looking at what a trained embedder does."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from spotmatch.cli.app import app
from spotmatch.config import DEFAULT_CACHE
from spotmatch.cli.global_cmds import IMAGES_HELP, cache_root

DATA_HELP = "Labels CSV: `filename, identity` (Kaggle's `ground_truth` accepted), optional extra columns."


@app.command()
def report(
    data: Path = typer.Option(..., "--data", help=DATA_HELP),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Embedder checkpoint written by `spotmatch train` (best.pt)."),
    out: Path = typer.Option(..., "--out", help="HTML file to write; its PNGs go to OUT_STEM_files/ beside it."),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    top_k: int = typer.Option(5, help="Neighbours per query in the nearest-neighbour grids."),
    max_images: int = typer.Option(600, help="Most images with thumbnails in the projections and heatmap (validation first)."),
    fusion: Optional[Path] = typer.Option(None, help="fusion.json whose reliability.png to include (default: one beside the checkpoint)."),
    split_by: str = typer.Option("identity", help="When the checkpoint was not trained on this table: identity or a group column."),
    keep_ambiguous: bool = typer.Option(False, help="Keep rows whose `unambiguous` column is false."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    num_workers: int = typer.Option(2, min=0, help="Image decoding processes."),
    cache_dir: Optional[Path] = typer.Option(Path(DEFAULT_CACHE), help="Embedding cache folder ('' disables)."),
    seed: int = typer.Option(0, help="Seed of the image sample, PCA/t-SNE and a fresh split."),
) -> None:
    """One self-contained HTML report: curves, similarity histograms, PCA/t-SNE, heatmap, neighbours, AP per identity."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.global_embed.embed import EmbedConfig
    from spotmatch.report import ReportConfig, build_report

    from spotmatch.io import check_output

    check_output(out, [data, checkpoint, *([fusion] if fusion else [])])
    started = time.perf_counter()
    conf = ReportConfig(
        data=data, checkpoint=checkpoint, out=out, images=images, top_k=top_k, max_images=max_images, fusion=fusion,
        drop_ambiguous=not keep_ambiguous, split=SplitConfig(by=split_by, seed=seed), seed=seed,
        embed=EmbedConfig(batch_size=batch_size, num_workers=num_workers, device=device,
                          cache_dir=cache_root(cache_dir)),
    )
    summary = build_report(conf)
    typer.echo(f"report: {summary.n_images} images, {summary.n_identities} identities ({summary.n_shown} shown), "
               f"IB-mAP {summary.ib_map:.3f} on {summary.split_origin}; wrote {summary.out} "
               f"({summary.bytes_written / 1e6:.1f} MB) and {len(summary.pngs)} PNGs in {time.perf_counter() - started:.0f}s")
