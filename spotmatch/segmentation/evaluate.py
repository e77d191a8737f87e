"""Looking at masks: IoU between two mask sources, and a contact sheet of overlays to inspect by eye."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import pandas as pd

from spotmatch.data.images import load_image
from spotmatch.errors import SpotmatchError
from spotmatch.io import atomic_path
from spotmatch.local_match.viz import drawable
from spotmatch.segmentation.provider import MaskProvider

OVERLAY_COLOUR = np.array([40, 220, 60], dtype=np.float32)  # RGB green: visible on rock, snow and IR grey
SHEET_SUFFIXES = (".jpg", ".jpeg", ".png")


def mask_iou(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Intersection over union; None is an empty mask, and two empty masks agree fully."""
    a_any, b_any = a is not None and a.any(), b is not None and b.any()
    if not a_any and not b_any:
        return 1.0
    if not a_any or not b_any:
        return 0.0
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def compare_masks(paths: Sequence[Path], predicted: MaskProvider, reference: MaskProvider) -> pd.DataFrame:
    """One row per image: IoU of `predicted` against `reference`, both masks' area fractions, IR flag."""
    rows = []
    for path in paths:
        record = load_image(path)
        mask_p, mask_r = predicted.mask_for(record), reference.mask_for(record)
        rows.append(
            {
                "filename": Path(path).name,
                "infrared": record.greyscale,
                "iou": mask_iou(mask_p, mask_r),
                "area_predicted": 0.0 if mask_p is None else float(mask_p.mean()),
                "area_reference": 0.0 if mask_r is None else float(mask_r.mean()),
            }
        )
    return pd.DataFrame(rows)


def summarise_iou(per_image: pd.DataFrame) -> dict:
    def group(frame: pd.DataFrame) -> dict:
        # the median too: IoU is bimodal (agree, or one model misses the cat), so a mean alone misleads
        if not len(frame):  # None: JSON's null (NaN is not JSON, and a reader's parser refuses it)
            return {"images": 0, "mean_iou": None, "median_iou": None}
        return {"images": int(len(frame)), "mean_iou": float(frame["iou"].mean()), "median_iou": float(frame["iou"].median())}

    return {
        "all": group(per_image),
        "day": group(per_image[~per_image["infrared"]]),
        "infrared": group(per_image[per_image["infrared"]]),
    }


def overlay_tile(rgb: np.ndarray, mask: np.ndarray | None, width: int, caption: str) -> np.ndarray:
    """Thumbnail with the mask tinted and outlined, and a caption strip; RGB uint8."""
    scale = width / rgb.shape[1]
    height = round(rgb.shape[0] * scale)
    thumb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32)
    if mask is not None:
        small = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
        thumb[small] = 0.6 * thumb[small] + 0.4 * OVERLAY_COLOUR
        thumb = thumb.astype(np.uint8)
        contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(thumb, contours, -1, (255, 255, 0), 1)
    thumb = thumb.astype(np.uint8)
    strip = np.full((18, width, 3), 255, dtype=np.uint8)
    cv2.putText(strip, drawable(caption)[: width // 7], (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([strip, thumb])


def check_sheet_path(output: Path) -> None:
    """Refuse, before any mask is computed, a sheet name that OpenCV cannot encode as an image."""
    if output.is_dir():  # io.check_output would suggest a .csv name in it
        raise SpotmatchError(f"--out {output}: is a folder; name an image file, such as {output / 'contact_sheet.jpg'}")
    if output.suffix.lower() not in SHEET_SUFFIXES:
        raise SpotmatchError(f"--out {output}: the contact sheet is an image; end the name in {', '.join(SHEET_SUFFIXES)}")


def _pad_to(tile: np.ndarray, height: int) -> np.ndarray:
    return np.pad(tile, ((0, height - tile.shape[0]), (0, 0), (0, 0)), constant_values=255)


def contact_sheet(
    paths: Sequence[Path],
    providers: dict[str, MaskProvider],
    output: Path,
    tile_width: int = 240,
    images_per_row: int = 2,
) -> Path:
    """One group of tiles per image (one tile per mask source, side by side), `images_per_row` groups a row."""
    check_sheet_path(output)
    if not paths:
        raise SpotmatchError(f"{output}: no images for the contact sheet; check the dataset and the selection")
    groups = []
    for path in paths:
        record = load_image(path)
        tag = "IR" if record.greyscale else "day"
        tiles = []
        for name, provider in providers.items():
            mask = provider.mask_for(record)
            area = 0.0 if mask is None else mask.mean()
            tiles.append(overlay_tile(record.rgb, mask, tile_width, f"{name} {tag} {area:.0%} {Path(path).stem[:14]}"))
        tile_height = max(t.shape[0] for t in tiles)
        groups.append(np.hstack([_pad_to(t, tile_height) for t in tiles] + [np.full((tile_height, 8, 3), 255, np.uint8)]))
    group_height = max(g.shape[0] for g in groups)
    groups = [_pad_to(g, group_height) for g in groups]
    while len(groups) % images_per_row:
        groups.append(np.full_like(groups[0], 255))
    rows = [np.hstack(groups[i : i + images_per_row]) for i in range(0, len(groups), images_per_row)]
    sheet = np.vstack(rows)
    suffix = output.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, 85] if suffix in (".jpg", ".jpeg") else []
    ok, encoded = cv2.imencode(suffix, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise SpotmatchError(f"{output}: cannot encode the contact sheet; use a .jpg or .png name")
    with atomic_path(output) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return output


def pick_sheet_images(paths: Sequence[Path], n_day: int, n_infrared: int, seed: int = 0) -> list[Path]:
    """A fixed random choice of daytime and infrared frames, so the sheet shows both."""
    rng = np.random.default_rng(seed)
    day, infrared = [], []
    for path in rng.permutation(np.array([str(p) for p in paths], dtype=object)):
        bucket = infrared if load_image(path).greyscale else day
        bucket.append(Path(path))
        if len(day) >= n_day and len(infrared) >= n_infrared:
            break
    return day[:n_day] + infrared[:n_infrared]
