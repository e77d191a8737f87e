"""LoFTR, the detector-free matcher: it matches two images directly, so it has no per-image feature cache.

No LoFTR checkpoint ships in a PyPI package; it runs only from a weights file the user supplies
(`weights=PATH`, e.g. kornia's `loftr_outdoor.ckpt`), and is never downloaded.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import cv2
import numpy as np

from spotmatch.config import config_hash, merge_config
from spotmatch.data.images import load_image
from spotmatch.local_match.extractors import ExtractorConf, as_image_and_mask, inside_mask, keypoint_mask, working_region
from spotmatch.local_match.features import ONE_PICTURE_CELL_DIFFERENCE, ONE_PICTURE_GRID
from spotmatch.local_match.matchers import PairEvidence, VerificationConf, verify
from spotmatch.local_match.pipeline import MaskSource, PairScorer
from spotmatch.local_match.weights import load_into, load_state_dict, resolve_weights
from spotmatch.device import resolve_device


@dataclass(frozen=True)
class LoFTRConf:
    weights: str | None = None  # required: a LoFTR checkpoint file
    max_side: int = 640  # LoFTR's attention grows with the square of the pixel count
    confidence_threshold: float = 0.2
    device: str = "auto"
    verification: VerificationConf = VerificationConf()


class LoFTRMatcher(PairScorer):
    default_conf = LoFTRConf()

    def __init__(self, conf: LoFTRConf | None = None, mask_source: MaskSource | None = None, mask_name: str | None = None,
                 **overrides: Any):
        self.conf = merge_config(conf if conf is not None else self.default_conf, **overrides)
        weights = resolve_weights(self.conf.weights, None, "LoFTR")  # before importing anything heavy
        from kornia.feature import LoFTR

        from spotmatch.io import file_digest

        self.weights_digest = file_digest(weights)  # indoor and outdoor checkpoints find different matches

        state_dict = load_state_dict(weights)
        model = LoFTR(pretrained=None)
        load_into(model, state_dict.get("state_dict", state_dict), str(weights))
        self.device = resolve_device(self.conf.device)
        self.model = model.to(self.device).eval()
        self.mask_source, self.mask_name = mask_source, mask_name
        self.region_conf = ExtractorConf(max_side=self.conf.max_side)

    @property
    def verification(self) -> VerificationConf:
        return self.conf.verification

    @property
    def conf_name(self) -> str:
        # The weights by content, not path: the same file moved finds the same matches.
        values = {**{k: v for k, v in asdict(self.conf).items() if k not in ("device", "weights")}, "weights": self.weights_digest}
        return self.with_masks(f"loftr-r{self.conf.max_side}-{config_hash(values, 6)}")

    def _grey_tensor(self, path: str):
        import torch

        record = load_image(path)
        rgb, animal = as_image_and_mask(record, self.mask_source(record) if self.mask_source else None)
        crop, crop_mask, frame = working_region(rgb, keypoint_mask(rgb, animal, record.mask is not None), self.region_conf, animal)
        grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
        tensor = torch.from_numpy(grey)[None, None].float().div(255.0).to(self.device)
        return tensor, crop_mask, frame, max(rgb.shape[:2])

    def evidence_many(self, path_pairs: Sequence[tuple[str, str]]) -> list[PairEvidence]:
        import torch

        results = []
        for path0, path1 in path_pairs:
            image0, mask0, frame0, side0 = self._grey_tensor(path0)
            image1, mask1, frame1, side1 = self._grey_tensor(path1)
            with torch.inference_mode():
                out = self.model({"image0": image0, "image1": image1})
            points0, points1 = out["keypoints0"].cpu().numpy(), out["keypoints1"].cpu().numpy()
            confidence = out["confidence"].cpu().numpy().astype(np.float32)
            keep = confidence >= self.conf.confidence_threshold
            if mask0 is not None:
                keep &= inside_mask(points0, mask0)
            if mask1 is not None:
                keep &= inside_mask(points1, mask1)
            results.append(
                verify(
                    frame0.to_original(points0[keep]),
                    frame1.to_original(points1[keep]),
                    confidence[keep],
                    self.verification_for(image0, image1),
                    (side0, side1),
                )
            )
        return results

    def verification_for(self, image0, image1) -> VerificationConf:
        """Without keypoints the share of them that stayed put cannot tell one picture from one camera's
        scene: two working images alike pixel for pixel are one picture (a photo and its copy), whose
        matches all stay put and are kept."""
        import torch.nn.functional as F

        one_picture = image0.shape == image1.shape and float(
            F.adaptive_avg_pool2d((image0 - image1).abs(), ONE_PICTURE_GRID).max()) < ONE_PICTURE_CELL_DIFFERENCE
        return replace(self.conf.verification, min_displacement=0.0) if one_picture else self.conf.verification
