"""One mask per image for every other stage: `MaskProvider.from_config(conf, cache_dir).mask_for(record)`.

Sources: "alpha" (the image's own alpha channel only), "teacher" (u2netp salient-object model),
"unet:<checkpoint>" (a U-Net trained by `spotmatch train-seg`), "none". Whatever the source, an image
that carries an alpha mask gets that mask: a hand-made cut-out beats any model.

Predicted masks are cached as PNGs under `<cache>/masks/<name>/<sha256>.png`, where `<name>` holds the
source and a hash of the config (and, for a U-Net, of the checkpoint file), so a changed setting or a
retrained model never reads a stale mask and an unchanged one never recomputes.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from spotmatch.config import config_hash
from spotmatch.data.images import ImageRecord
from spotmatch.errors import SpotmatchError
from spotmatch.io import file_digest, write_cache_entry
from spotmatch.segmentation.teacher import TEACHER_SETUP, SalientObjectTeacher, TeacherConfig, teacher_model_path

SOURCES = ("alpha", "teacher", "unet:<checkpoint>", "none")
ASPECT_TOLERANCE = 0.02  # a cached mask is reused at another size when its aspect ratio agrees this well


@dataclass(frozen=True)
class MaskConfig:
    source: str = "teacher"
    threshold: float = 0.5  # on the model's foreground probability
    min_component_fraction: float = 0.1  # blobs smaller than this share of the largest one are dropped
    min_area_fraction: float = 0.002  # a mask smaller than this share of the frame means "no animal found"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:  # written this way round so that NaN fails too
            raise SpotmatchError(f"--threshold {self.threshold}: a foreground probability must lie in [0, 1], such as 0.5")

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def checkpoint(self) -> Path | None:
        return Path(self.source.partition(":")[2]) if self.kind == "unet" else None


def absolute_source(source: str) -> str:
    """`source` with a U-Net checkpoint's path made absolute, so that a file recording it (a calibration)
    names the same masks from any working directory."""
    conf = MaskConfig(source=source)
    return f"unet:{conf.checkpoint.resolve()}" if conf.kind == "unet" else source


class ProbabilityModel(Protocol):
    def probability(self, rgb: np.ndarray) -> np.ndarray: ...


def clean_mask(probability: np.ndarray, conf: MaskConfig) -> np.ndarray:
    """Threshold, then keep only the blobs comparable in size to the largest (speckle in rocks and grass goes)."""
    binary = (probability >= conf.threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 2:  # background plus at most one blob: nothing to filter
        return binary.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= conf.min_component_fraction * areas.max()) + 1
    return np.isin(labels, keep)


def unet_digest(path: Path, length: int = 10) -> str:
    try:
        return file_digest(path)[:length]
    except FileNotFoundError:
        raise SpotmatchError(f"{path}: U-Net checkpoint not found; train one with `spotmatch train-seg`") from None


def mask_cache_name(conf: MaskConfig) -> str:
    """Folder name under `<cache>/masks/`: readable source, then a hash of everything that changes the mask."""
    settings = dataclasses.asdict(conf)
    if conf.kind == "teacher":
        label = f"teacher-{conf.teacher.model}"
    elif conf.kind == "unet":
        checkpoint_digest = unet_digest(conf.checkpoint)
        settings["source"] = checkpoint_digest  # the file's content, not where it happens to lie
        # train-seg names every checkpoint unet.pt: its run folder is the readable part then
        stem = conf.checkpoint.stem
        label = f"unet-{conf.checkpoint.parent.name if stem == 'unet' else stem}"
    else:
        label = conf.kind
    return f"{label}-{config_hash(settings)}"


class MaskCache:
    """Binary masks as 0/255 PNGs keyed by image content hash, written atomically."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.png"

    def get(self, sha256: str, shape: tuple[int, int]) -> np.ndarray | None:
        """The stored mask at `shape`. Callers may decode one file at different sizes (JPEG draft mode),
        so a mask of the same aspect ratio is resized; anything else (unreadable, foreign) is a miss."""
        path = self.path(sha256)
        if not path.is_file():
            return None
        stored = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if stored is None:
            return None
        if stored.shape != shape:
            stored_aspect, wanted_aspect = stored.shape[1] / stored.shape[0], shape[1] / shape[0]
            if abs(stored_aspect / wanted_aspect - 1.0) > ASPECT_TOLERANCE:
                return None
            stored = cv2.resize(stored, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        return stored > 127

    def put(self, sha256: str, mask: np.ndarray) -> bool:
        """Into the mask cache (False where it cannot be written: then made again next time)."""
        ok, encoded = cv2.imencode(".png", mask.astype(np.uint8) * 255)
        if not ok:
            raise SpotmatchError(f"{self.path(sha256)}: cannot encode mask PNG; check free disk space")
        return write_cache_entry(self.path(sha256), lambda tmp: tmp.write_bytes(encoded.tobytes()))


def check_model_available(conf: MaskConfig) -> None:
    """Fail now, not hours into a run, when the model behind `conf` cannot be loaded (cheap checks only)."""
    if conf.kind == "teacher":
        teacher_model_path(conf.teacher.model)
        try:
            importlib.import_module("onnxruntime")
        except ImportError:
            raise SpotmatchError(f"teacher model {conf.teacher.model}: onnxruntime is not installed; {TEACHER_SETUP}") from None
    elif conf.kind == "unet" and not conf.source.partition(":")[2]:  # Path("") would read as "." below
        raise SpotmatchError(f"mask source {conf.source!r}: the checkpoint path is missing after 'unet:'; use unet:runs/seg-lite0/unet.pt")
    elif conf.kind == "unet" and not conf.checkpoint.is_file():
        raise SpotmatchError(f"{conf.checkpoint}: U-Net checkpoint not found; train one with `spotmatch train-seg`")
    elif conf.kind not in ("teacher", "unet", "alpha", "none"):
        raise SpotmatchError(f"mask source {conf.source!r} unknown; use one of {', '.join(SOURCES)}")


@dataclass(frozen=True)
class ModelLoader:
    """Builds the probability model behind a config; a plain picklable value, unlike the model itself."""

    conf: MaskConfig
    device: str = "cpu"

    def __call__(self) -> ProbabilityModel:
        if self.conf.kind == "teacher":
            return SalientObjectTeacher(self.conf.teacher)
        from spotmatch.segmentation.unet import UNetSegmenter

        return UNetSegmenter.from_checkpoint(self.conf.checkpoint, device=self.device)


class MaskProvider:
    """`mask_for(record)`: (H, W) bool animal mask, or None when there is none (use the whole frame).

    The model is built on the first cache miss and is not pickled: a provider handed to DataLoader
    workers (e.g. as the embedder's `mask_fn`) travels light, and when the cache is filled beforehand
    (`fill_cache`) no worker ever loads a model.
    """

    def __init__(self, conf: MaskConfig, load_model: Callable[[], ProbabilityModel] | None, cache: MaskCache | None):
        self.conf = conf
        self.load_model = load_model
        self.cache = cache
        self._model: ProbabilityModel | None = None
        self.computed = 0  # masks predicted by the model in this provider's life (the rest came from the cache)
        self.cache_hits = 0

    @classmethod
    def from_config(cls, conf: MaskConfig, cache_dir: str | Path | None = None, device: str = "cpu") -> "MaskProvider":
        """`cache_dir` is the project cache root; masks go to `<cache_dir>/masks/<name>/`. None: no caching."""
        check_model_available(conf)
        if conf.kind in ("alpha", "none"):
            return cls(conf, None, None)
        cache = MaskCache(Path(cache_dir) / "masks" / mask_cache_name(conf)) if cache_dir else None
        return cls(conf, ModelLoader(conf, device), cache)

    @property
    def name(self) -> str | None:
        """What makes these masks, content-addressed (a U-Net by its file's digest); None when only the
        images' own alpha masks are used."""
        return mask_cache_name(self.conf) if self.load_model is not None else None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_model"] = None  # onnxruntime sessions and GPU tensors do not cross process boundaries
        return state

    @property
    def model(self) -> ProbabilityModel:
        if self._model is None:
            self._model = self.load_model()
        return self._model

    def _predicted_mask(self, record: ImageRecord) -> np.ndarray:
        shape = record.rgb.shape[:2]
        cached = self.cache.get(record.sha256, shape) if self.cache else None
        if cached is not None:
            self.cache_hits += 1
            return cached
        mask = clean_mask(self.model.probability(record.rgb), self.conf)
        self.computed += 1
        if self.cache:
            self.cache.put(record.sha256, mask)
        return mask

    def mask_for(self, record: ImageRecord) -> np.ndarray | None:
        if record.mask is not None:
            return record.mask
        if self.load_model is None:
            return None
        mask = self._predicted_mask(record)
        return mask if mask.mean() >= self.conf.min_area_fraction else None

    def fill_cache(self, paths: list[Path]) -> int:
        """Compute and store every missing mask now, in this process; returns how many were computed."""
        from spotmatch.data.images import file_sha256, load_image

        before = self.computed
        for path in paths:
            if self.load_model is None or (self.cache and self.cache.path(file_sha256(path)).is_file()):
                continue  # nothing to predict: hashing the bytes is far cheaper than decoding them
            self.mask_for(load_image(path))
        return self.computed - before
