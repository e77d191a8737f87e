"""Segmentation verbs: train-seg, masks, seg-eval, seg-sheet, seg-diagnostic. Each builds a config and calls one function."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

import typer

from spotmatch.cli.app import app
from spotmatch.cli.global_cmds import IMAGES_HELP
from spotmatch.config import DEFAULT_CACHE

if TYPE_CHECKING:
    from spotmatch.data.tables import Dataset

SUBSETS = ("val", "train", "all")


def _logging() -> None:
    """Progress lines of spotmatch's own modules; the root logger stays quiet, so libraries (faiss's CPU-feature
    probing, ...) do not print theirs."""
    logger = logging.getLogger("spotmatch")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)

CSV_HELP = "Labels CSV (filename, identity, ...); its images are masked."
SPLIT_HELP = "Column the held-out split groups by (encounter keeps bursts together), or identity."
CACHE_HELP = "Cache root: masks go to <cache>/masks/<source-and-config>/; '' turns caching off."


def _checked_run(cache: Path, device: str) -> tuple[str | None, str]:
    """(cache root or None: off, device as torch names it); a --cache that is no writable folder and an unknown
    --device are refused before any work."""
    from spotmatch.cli.global_cmds import cache_root
    from spotmatch.device import resolve_device

    return cache_root(cache), str(resolve_device(device))


def _checkpoints(sources: Iterable[str]) -> list[Path]:
    """The U-Net files behind `unet:<path>` mask sources: inputs an --out must not replace."""
    from spotmatch.segmentation.provider import MaskConfig

    return [MaskConfig(source=s).checkpoint for s in sources if s.startswith("unet:")]


def _load(csv: Path, images: Optional[Path], out: Optional[Path], read: Iterable[Path] = ()) -> "Dataset":
    """The labelled table, once --out is known not to replace the CSV, one of its photos or a file in `read`."""
    from spotmatch.data.tables import load_dataset
    from spotmatch.io import check_output

    dataset = load_dataset(csv, images)
    if out is not None:
        check_output(out, inputs=[csv, *dataset.paths, *read])
    return dataset


def _select(dataset: "Dataset", split_by: str, subset: str, checkpoint: Path | None = None) -> "Dataset":
    """The --subset rows; an unknown name or an empty selection is refused here, not as a KeyError later.
    With an embedder's `checkpoint`, its own split (as `evaluate` uses it): a fresh one would call some of
    its training photos held out."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.errors import SpotmatchError
    from spotmatch.evaluation.run import split_for

    if subset not in SUBSETS:
        raise SpotmatchError(f"--subset {subset}: unknown; use one of {', '.join(SUBSETS)}")
    if subset != "all":
        split, split_by, _ = split_for(dataset, SplitConfig(by=split_by), checkpoint)
        dataset = dataset.subset(split == subset)
    if not len(dataset):
        raise SpotmatchError(f"{dataset.csv_path}: no images in the {subset} subset (split by {split_by});"
                             " use --subset all or a CSV with more encounters")
    return dataset


@app.command("train-seg")
def train_seg_command(
    csv: Path = typer.Option(..., help="labels CSV (filename, identity[, encounter, unambiguous])"),
    out: Path = typer.Option(Path("runs/seg-lite0"), help="folder for unet.pt, metrics.json, val_iou.csv"),
    images: Optional[Path] = typer.Option(None, help="image folder; default: images/ beside the CSV"),
    cache: Path = typer.Option(Path(DEFAULT_CACHE), "--cache-dir", "--cache", help="cache root (teacher masks go to <cache>/masks/...); '' turns caching off"),
    encoder: str = typer.Option("efficientnet_lite0", help="timm encoder: efficientnet_lite0|1|2"),
    size: int = typer.Option(320, min=32, help="square training size in pixels"),  # the encoder downsamples 32x
    epochs: int = typer.Option(6, min=1, help="Training epochs."),
    batch_size: int = typer.Option(8, min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (a finite number > 0)."),
    split_by: str = typer.Option("encounter", help="held-out split: encounter (closed set) or identity"),
    max_steps: int = typer.Option(0, min=0, help="> 0: stop after this many steps (smoke runs)"),
    max_images: int = typer.Option(0, min=0, help="> 0: train on the first N images only (smoke runs)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    seed: int = typer.Option(0, help="Seed for the split and the frames picked."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the U-Net already in --out."),
) -> None:
    """Train the U-Net on alpha masks / teacher pseudo-masks; report IoU on held-out images."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.errors import SpotmatchError
    from spotmatch.io import check_output, check_output_dir
    from spotmatch.segmentation.train import CHECKPOINT_NAME, TrainSegConfig, train_seg
    from spotmatch.segmentation.unet import UNetConfig

    _logging()
    check_output_dir(out, option="--out")
    if (out / CHECKPOINT_NAME).exists() and not overwrite:  # masks cached under its digest and embedders trained on it name it
        raise SpotmatchError(f"{out / CHECKPOINT_NAME}: a U-Net is already there; pass --overwrite to replace it, or another --out")
    for name in (CHECKPOINT_NAME, "metrics.json", "val_iou.csv"):
        check_output(out / name, inputs=[csv], option="--out")
    cache, device = _checked_run(cache, device)
    conf = TrainSegConfig(
        unet=UNetConfig(encoder=encoder, image_size=size),
        split=SplitConfig(by=split_by, seed=seed),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=lr,
        max_steps=max_steps,
        max_images=max_images,
        seed=seed,
    )
    checkpoint = train_seg(conf, csv, images, out, cache, device)
    typer.echo(str(checkpoint))


@app.command("masks")
def masks_command(
    paths: list[Path] = typer.Argument(..., help="image files"),
    source: str = typer.Option("teacher", help="alpha | teacher | unet:<checkpoint> | none"),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="Foreground probability above which a pixel is animal."),
    cache: Path = typer.Option(Path(DEFAULT_CACHE), "--cache-dir", "--cache", help=CACHE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
) -> None:
    """Compute (or read from the cache) one mask per image; print path, mask PNG and area fraction."""
    from spotmatch.data.images import load_image
    from spotmatch.segmentation.provider import MaskConfig, MaskProvider

    provider = MaskProvider.from_config(MaskConfig(source=source, threshold=threshold), *_checked_run(cache, device))
    for path in paths:
        record = load_image(path)
        mask = provider.mask_for(record)
        stored = provider.cache.path(record.sha256) if provider.cache and record.mask is None else "-"
        # "area 0.0000" would read as an empty mask; None means the stage uses the whole frame
        area = f"no mask (source {source})" if mask is None else f"{mask.mean():.4f}"
        typer.echo(f"{path}\t{stored}\t{area}")


@app.command("seg-eval")
def seg_eval_command(
    csv: Path = typer.Option(..., help=CSV_HELP),
    predicted: str = typer.Option(..., help="mask source to score, e.g. unet:runs/seg-lite0/unet.pt"),
    reference: str = typer.Option("teacher", help="mask source taken as truth"),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    subset: str = typer.Option("val", help="val | train | all"),
    split_by: str = typer.Option("encounter", help=SPLIT_HELP),
    cache: Path = typer.Option(Path(DEFAULT_CACHE), "--cache-dir", "--cache", help=CACHE_HELP),
    out: Optional[Path] = typer.Option(None, help="per-image CSV"),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
) -> None:
    """Mask IoU of one source against another on held-out images (day and infrared separately)."""
    from spotmatch.io import write_csv_atomic
    from spotmatch.segmentation.evaluate import compare_masks, summarise_iou
    from spotmatch.segmentation.provider import MaskConfig, MaskProvider

    cache, device = _checked_run(cache, device)
    paths = _select(_load(csv, images, out, _checkpoints([predicted, reference])), split_by, subset).paths
    per_image = compare_masks(
        paths,
        MaskProvider.from_config(MaskConfig(source=predicted), cache, device),
        MaskProvider.from_config(MaskConfig(source=reference), cache, device),
    )
    if out:
        write_csv_atomic(per_image, out, follow=True)
    summary = {
        "all_images": summarise_iou(per_image),
        "reference_nonempty": summarise_iou(per_image[per_image["area_reference"] > 0]),
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command("seg-sheet")
def seg_sheet_command(
    csv: Path = typer.Option(..., help=CSV_HELP),
    out: Path = typer.Option(Path("segmentation_contact_sheet.jpg"), help="Image file to write."),
    source: list[str] = typer.Option(["teacher"], help="mask sources, one tile each (repeat the option)"),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    subset: str = typer.Option("val", help="val | train | all"),
    split_by: str = typer.Option("encounter", help=SPLIT_HELP),
    day: int = typer.Option(8, min=0, help="number of daytime frames"),
    infrared: int = typer.Option(8, min=0, help="number of night infrared frames"),
    tile_width: int = typer.Option(240, min=32, help="Width of each tile in pixels."),
    cache: Path = typer.Option(Path(DEFAULT_CACHE), "--cache-dir", "--cache", help=CACHE_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
    seed: int = typer.Option(0, help="Seed for the split and the frames picked."),
) -> None:
    """Contact sheet of mask overlays on daytime and infrared frames, to judge masks by eye."""
    from spotmatch.segmentation.evaluate import check_sheet_path, contact_sheet, pick_sheet_images
    from spotmatch.segmentation.provider import MaskConfig, MaskProvider

    check_sheet_path(out)
    cache, device = _checked_run(cache, device)
    dataset = _select(_load(csv, images, out, _checkpoints(source)), split_by, subset)
    paths = pick_sheet_images(dataset.paths, day, infrared, seed)
    providers = {label: MaskProvider.from_config(MaskConfig(source=s), cache, device) for label, s in _tile_labels(source).items()}
    typer.echo(str(contact_sheet(paths, providers, out, tile_width, images_per_row=2 if len(providers) > 1 else 4)))


def _tile_labels(sources: list[str]) -> dict[str, str]:
    """Caption -> mask source: the kind (teacher, unet) where it is enough, else the kind and the run folder, so
    that two U-Net runs compared on one sheet get a tile each."""
    from spotmatch.errors import SpotmatchError

    repeated = sorted({s for s in sources if sources.count(s) > 1})
    if repeated:
        raise SpotmatchError(f"--source {repeated[0]} given twice; name each mask source once")
    kinds = [s.split(":")[0] for s in sources]
    labels = {(kind if kinds.count(kind) == 1 else f"{kind} {Path(s.partition(':')[2]).parent.name or s}"): s
              for kind, s in zip(kinds, sources)}
    return labels if len(labels) == len(sources) else {s: s for s in sources}


def _embed_fn(embedder: str, device: str):
    """`timm:<name>` (ImageNet stand-in), `baseline:<backbone>` (the project's untrained Embedder) or
    `checkpoint:<path>` (a trained one). The project's Embedder reads files, so views go through
    temporary PNGs, with its embedding cache off (every view is a new image)."""
    from spotmatch.errors import SpotmatchError
    from spotmatch.segmentation.diagnostic import path_embedder_as_array_fn, timm_embed_fn

    kind, _, value = embedder.partition(":")
    if kind == "timm":
        return timm_embed_fn(value or "efficientnet_lite0", device=device)
    if kind in ("baseline", "checkpoint"):
        from spotmatch.global_embed.embed import EmbedConfig, Embedder
        from spotmatch.global_embed.model import EmbedderConfig

        run = EmbedConfig(device=device, cache_dir=None, progress=False, num_workers=0)
        if kind == "checkpoint":
            model = Embedder.from_checkpoint(Path(value), run=run)
        else:
            model = Embedder.pretrained_baseline(EmbedderConfig(backbone=value or "efficientnet_lite0"), run=run)
        return path_embedder_as_array_fn(model.embed)
    raise SpotmatchError(
        f"--embedder {embedder!r} unknown; use timm:<name>, baseline:<backbone> or checkpoint:<path>"
    )


@app.command("seg-diagnostic")
def seg_diagnostic_command(
    csv: Path = typer.Option(..., help="labels CSV with identity, station, encounter"),
    source: str = typer.Option("teacher", help="mask source: teacher | unet:<checkpoint> | alpha"),
    embedder: str = typer.Option("timm:efficientnet_lite0", help="timm:<name>, baseline:<backbone> or checkpoint:<path>"),
    images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
    subset: str = typer.Option("all", help="all | val | train (use val for a trained embedder)"),
    split_by: str = typer.Option("encounter", help=SPLIT_HELP),
    cache: Path = typer.Option(Path(DEFAULT_CACHE), "--cache-dir", "--cache", help=CACHE_HELP),
    out: Optional[Path] = typer.Option(None, help="CSV of the table"),
    device: str = typer.Option("auto", help="auto, cpu, cuda ..."),
) -> None:
    """Background-shortcut table: cosine of different cats at one station vs same cat across stations."""
    from spotmatch.io import write_csv_atomic
    from spotmatch.segmentation.diagnostic import check_diagnostic_table, format_table, shortcut_diagnostic
    from spotmatch.segmentation.provider import MaskConfig, MaskProvider

    cache, device = _checked_run(cache, device)
    kind, _, value = embedder.partition(":")
    read = _checkpoints([source]) + ([Path(value)] if kind == "checkpoint" else [])
    dataset = _select(_load(csv, images, out, read), split_by, subset, Path(value) if kind == "checkpoint" else None)
    check_diagnostic_table(dataset.table, str(csv))  # before the embedder loads
    provider = MaskProvider.from_config(MaskConfig(source=source), cache, device)
    results, counts = shortcut_diagnostic(dataset, provider, _embed_fn(embedder, device))
    if out:
        write_csv_atomic(results, out, follow=True)
    typer.echo(format_table(results))
    typer.echo(json.dumps(counts))
