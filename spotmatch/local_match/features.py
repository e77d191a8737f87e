"""Local features of one image and their on-disk cache.

The cache key is (image content hash [+ external mask hash], extractor config name): a changed setting
writes to a different folder, an unchanged one never recomputes. Files are uncompressed `.npz`, written
atomically, because loading them is on the hot path of pair re-scoring.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spotmatch.errors import SpotmatchError
from spotmatch.io import atomic_path

if TYPE_CHECKING:
    from spotmatch.data.images import ImageRecord
    from spotmatch.local_match.extractors import Extractor


@dataclass
class Features:
    """Keypoints (n, 2) as (x, y) pixels of the original image, descriptors (n, d), detector scores (n,)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]  # (width, height) of the image the keypoints refer to

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def empty(cls, descriptor_dim: int, image_size: tuple[int, int]) -> "Features":
        return cls(
            np.zeros((0, 2), np.float32), np.zeros((0, descriptor_dim), np.float32), np.zeros(0, np.float32), image_size
        )

    def select(self, keep: np.ndarray) -> "Features":
        return Features(self.keypoints[keep], self.descriptors[keep], self.scores[keep], self.image_size)

    def save(self, target: Path) -> Path:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    keypoints=self.keypoints,
                    descriptors=self.descriptors,
                    scores=self.scores,
                    image_size=np.asarray(self.image_size, np.int64),
                )
        return target

    @classmethod
    def load(cls, path: Path) -> "Features":
        try:
            with np.load(path) as data:
                return cls(data["keypoints"], data["descriptors"], data["scores"], tuple(int(v) for v in data["image_size"]))
        except (OSError, KeyError, ValueError) as exc:
            raise SpotmatchError(f"{path}: unreadable feature cache file ({exc}); delete it to recompute") from None


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

    def get(self, record: "ImageRecord", mask: np.ndarray | None = None) -> Features:
        key = self.key(record, mask)
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
        features = Features.load(path)
        self._remember(key, features)
        return features

    def _remember(self, key: str, features: Features) -> None:
        with self._lock:
            self._memory[key] = features
            while len(self._memory) > self.max_in_memory:
                self._memory.popitem(last=False)
