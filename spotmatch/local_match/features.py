"""Local features of one image and their on-disk cache; the evidence of matched pairs and its cache.

The feature cache key is (image content hash [+ external mask hash], extractor config name): a changed
setting writes to a different folder, an unchanged one never recomputes. Files are uncompressed `.npz`,
written atomically, because loading them is on the hot path of pair re-scoring. The pair cache keys
(both images' feature keys) in one SQLite file per local-stage settings name (extractor + matcher).
"""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from spotmatch.errors import SpotmatchError
from spotmatch.io import CACHE_WRITE_FAILURES, write_cache_entry

if TYPE_CHECKING:
    from spotmatch.data.images import ImageRecord
    from spotmatch.local_match.extractors import Extractor


# What two images' pixels must share to be one picture (`same_pixels`): every cell of a 16 x 16 grid that both show
# whole differs by less than this mean grey level (0-1). Re-encoding or resizing a copy changes a cell by at most
# 0.013 on the snow-leopard frames; frames of one camera from different visits differ somewhere by 0.25 or more.
ONE_PICTURE_GRID, ONE_PICTURE_CELL_DIFFERENCE = 16, 0.03
ONE_PICTURE_MIN_CELLS = 16  # fewer whole cells in common (a small cut-out) judge nothing


def appearance_grid(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """(2, 16, 16) float32: each cell's mean grey (0-1) over the pixels the mask keeps, and the share it keeps."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    kept = np.full(grey.shape, 255, np.uint8) if mask is None else mask.astype(np.uint8) * 255
    # Averaged down to 16 times the grid first, in 8 bits: a 12-megapixel frame in float would cost as much as its keypoints.
    height, width = grey.shape
    scale = min(1.0, 16 * ONE_PICTURE_GRID / max(height, width))
    if scale < 1.0:
        small = (max(ONE_PICTURE_GRID, round(width * scale)), max(ONE_PICTURE_GRID, round(height * scale)))
        grey, kept = (cv2.resize(image, small, interpolation=cv2.INTER_AREA) for image in (grey, kept))
    grey, kept = grey.astype(np.float32) / 255, kept.astype(np.float32) / 255
    size = (ONE_PICTURE_GRID, ONE_PICTURE_GRID)
    share = cv2.resize(kept, size, interpolation=cv2.INTER_AREA)
    mean = cv2.resize(grey * kept, size, interpolation=cv2.INTER_AREA) / np.maximum(share, 1e-6)
    return np.stack([mean, share]).astype(np.float32)


def cell_difference(features0: "Features", features1: "Features") -> float | None:
    """The largest difference in mean grey over the grid cells both images show whole, where they have the same
    framing (aspect ratio within 1 %: a copy at any size); None where they cannot be compared (other framings,
    fewer than ONE_PICTURE_MIN_CELLS such cells: a cut-out shows only the animal's cells whole, its photo all)."""
    if features0.grid is None or features1.grid is None:
        return None
    (width0, height0), (width1, height1) = features0.image_size, features1.image_size
    if abs(width0 * height1 - width1 * height0) > 0.01 * width1 * height0:
        return None
    both = (features0.grid[1] > 0.99) & (features1.grid[1] > 0.99)
    if both.sum() < ONE_PICTURE_MIN_CELLS:
        return None
    return float(np.abs(features0.grid[0] - features1.grid[0])[both].max())


def same_pixels(features0: "Features", features1: "Features") -> bool:
    """Whether two images are one picture by their pixels: a copy (resized or re-encoded), a cut-out and its photo."""
    difference = cell_difference(features0, features1)
    return difference is not None and difference < ONE_PICTURE_CELL_DIFFERENCE


@dataclass
class Features:
    """Keypoints (n, 2) as (x, y) pixels of the original image, descriptors (n, d), detector scores (n,), and the
    image's `appearance_grid` (for telling one picture from one camera's two frames)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]  # (width, height) of the image the keypoints refer to
    grid: np.ndarray | None = None  # (2, 16, 16) `appearance_grid` inside the mask; None only inside an extractor

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def empty(cls, descriptor_dim: int, image_size: tuple[int, int], grid: np.ndarray | None = None) -> "Features":
        return cls(
            np.zeros((0, 2), np.float32), np.zeros((0, descriptor_dim), np.float32), np.zeros(0, np.float32), image_size, grid
        )

    def select(self, keep: np.ndarray) -> "Features":
        return Features(self.keypoints[keep], self.descriptors[keep], self.scores[keep], self.image_size, self.grid)

    def save(self, target: Path) -> bool:
        """Into the feature cache (False where it cannot be written: then extracted again next time)."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, keypoints=self.keypoints, descriptors=self.descriptors, scores=self.scores,
                         image_size=np.asarray(self.image_size, np.int64), grid=self.grid)

        return write_cache_entry(target, write)

    @classmethod
    def load(cls, path: Path) -> "Features":
        try:
            with np.load(path) as data:
                # A file from before the grid (2026-12-07) lacks it: read as damaged, and so extracted again.
                return cls(data["keypoints"], data["descriptors"], data["scores"], tuple(int(v) for v in data["image_size"]),
                           data["grid"])
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise SpotmatchError(f"{path}: unreadable feature cache file ({exc or type(exc).__name__}); delete it to recompute") from None


def mask_digest(mask: np.ndarray) -> str:
    """Short hash of a mask's pixels, so features of one image under two masks never share a cache file."""
    packed = np.packbits(np.ascontiguousarray(mask, dtype=bool))
    return hashlib.sha256(np.asarray(mask.shape, np.int64).tobytes() + packed.tobytes()).hexdigest()[:12]


class FeatureCache:
    """Features per image for one extractor: memory LRU, then `<root>/local/<conf-name>/<sha>.npz`, then extract.

    `root=None` keeps only the (bounded) memory layer. The memory layer holds at most `max_in_memory`
    images, so memory stays bounded whatever the number of pairs streamed through it.
    """

    def __init__(self, extractor: "Extractor", root: str | Path | None, max_in_memory: int = 256):
        self.extractor = extractor
        self.folder = Path(root) / "local" / extractor.conf_name if root is not None else None
        self.max_in_memory = max_in_memory
        self._memory: OrderedDict[str, Features] = OrderedDict()
        self._lock = threading.Lock()  # pairs are matched from a thread pool; the LRU must stay consistent
        self.extracted = 0  # how many times the extractor actually ran (tests and benchmarks read it)

    def key(self, record: "ImageRecord", mask: np.ndarray | None) -> str:
        """The record's own alpha mask is part of its file content; an external mask adds its own hash."""
        if mask is None or mask is record.mask:
            return record.sha256
        return f"{record.sha256}-m{mask_digest(mask)}"

    def path_for(self, key: str) -> Path | None:
        return self.folder / f"{key}.npz" if self.folder is not None else None

    def get(self, record: "ImageRecord", mask: np.ndarray | None = None, key: str | None = None) -> Features:
        """`key`: the caller's name for these features when it knows one without the mask (see `key`)."""
        key = key or self.key(record, mask)
        cached = self.cached(key)
        if cached is not None:
            return cached
        features = self.extractor.extract(record, mask)
        self.extracted += 1
        path = self.path_for(key)
        if path is not None:
            features.save(path)
        self._remember(key, features)
        return features

    def cached(self, key: str) -> Features | None:
        """Features already in memory or on disk under `key`, without decoding or extracting anything."""
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        path = self.path_for(key)
        if path is None or not path.is_file():
            return None
        try:
            features = Features.load(path)
        except SpotmatchError:  # damaged (a crash, a full disk): a miss, extracted again over it
            return None
        self._remember(key, features)
        return features

    def _remember(self, key: str, features: Features) -> None:
        with self._lock:
            self._memory[key] = features
            while len(self._memory) > self.max_in_memory:
                self._memory.popitem(last=False)


# What SQLite says when a cache file cannot be opened or written here (a full disk, a read-only folder, a
# long lock): a cache, it is skipped. Anything else (a damaged or foreign file) is named.
CACHE_UNAVAILABLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_BUSY")


# Part of the pair cache's file name: raise it when a code change alters matching without changing a setting
# (2: distances measured in each image's own size; 3: one picture told by the keypoints both images show; 4: and by
# their pixels, so a copy at another size and a cut-out with its photo keep their matches; all 2026-12-07).
PAIR_CACHE_VERSION = 4
PairKey = tuple[str, str]  # the feature-cache keys of the two images


class PairEvidenceCache:
    """The four numbers `score_pairs` keeps per pair (matches, inliers, inlier ratio, local score), in
    `<root>/local/pairs/<settings name>-v<version>.sqlite`. A learned matcher on CPU takes 0.2 to 0.5 s
    per pair, so re-running `calibrate` with other fit options, or `score-pairs` on an overlapping
    file, reads the evidence instead of matching again. One short transaction per chunk of pairs; SQLite's
    locking lets several processes share the file."""

    def __init__(self, root: str | Path, conf_name: str):
        self.path = Path(root) / "local" / "pairs" / f"{conf_name}-v{PAIR_CACHE_VERSION}.sqlite"

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=60)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE IF NOT EXISTS evidence (key0 TEXT, key1 TEXT, matches INTEGER, inliers INTEGER, "
                           "inlier_ratio REAL, local_score REAL, PRIMARY KEY (key0, key1))")
        return connection

    def _run(self, work, unavailable):
        """`work(connection)` in one transaction; `unavailable` where the cache cannot be opened or written (a full
        disk, a folder this user cannot write): a cache, it is then skipped. A damaged file is named."""
        try:
            connection = self._connect()
            try:
                with connection:  # one transaction: committed whole or not at all
                    return work(connection)
            finally:
                connection.close()
        except sqlite3.DatabaseError as error:
            if (error.sqlite_errorname or "").startswith(CACHE_UNAVAILABLE):
                return unavailable
            raise SpotmatchError(f"{self.path}: pair-evidence cache unreadable ({error}); delete the file and it is rebuilt") from None
        except OSError as error:  # its folder cannot be made
            if error.errno in CACHE_WRITE_FAILURES:
                return unavailable
            raise

    def get_many(self, keys: list[PairKey]) -> dict[PairKey, tuple]:
        query = "SELECT matches, inliers, inlier_ratio, local_score FROM evidence WHERE key0 = ? AND key1 = ?"
        def read(connection):
            found = {key: connection.execute(query, key).fetchone() for key in dict.fromkeys(keys)}
            return {key: tuple(row) for key, row in found.items() if row is not None}
        return self._run(read, {})

    def put_many(self, rows: dict[PairKey, tuple]) -> None:
        values = [(*key, int(matches), int(inliers), float(ratio), float(score)) for key, (matches, inliers, ratio, score) in rows.items()]
        if values:
            self._run(lambda connection: connection.executemany("INSERT OR REPLACE INTO evidence VALUES (?, ?, ?, ?, ?, ?)", values), None)
