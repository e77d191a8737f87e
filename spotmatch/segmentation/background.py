"""What the embedder sees of the background: crop to the animal, fill the rest, or swap it in training.

The point is to take the camera site out of the identity signal: frames of one camera share rocks and
light, so an embedder can score "same camera" instead of "same coat". `apply_background` never touches
a masked (animal) pixel; only the background changes.
"""
from __future__ import annotations

from typing import Literal, Sequence, get_args

import cv2
import numpy as np

from spotmatch.data.images import mask_bbox
from spotmatch.errors import SpotmatchError

Fill = Literal["none", "black", "grey", "blur", "noise", "extend"]
FILLS: tuple[str, ...] = get_args(Fill)
GREY_LEVEL = 128  # maps to ~0 under the encoders' mean-0.5 normalisation: "no signal"
BLUR_SIGMA_FRACTION = 0.03  # of the long side: strong enough to wipe rock texture, keeps overall light
EXTEND_SIGMA_FRACTION = 0.05  # of the long side: how far the animal's colours are smeared outward


def check_fill(fill: str) -> Fill:
    if fill not in FILLS:
        raise SpotmatchError(f"background fill {fill!r} unknown; use one of {', '.join(FILLS)}")
    return fill  # type: ignore[return-value]


def background_pixels(rgb: np.ndarray, fill: Fill, rng: np.random.Generator | None = None,
                      mask: np.ndarray | None = None) -> np.ndarray:
    """A full-size image of what the background becomes under `fill` ("extend" needs the animal `mask`)."""
    if fill == "extend":
        return extended_animal(rgb, mask)
    if fill == "black":
        return np.zeros_like(rgb)
    if fill == "grey":
        return np.full_like(rgb, GREY_LEVEL)
    if fill == "blur":
        sigma = BLUR_SIGMA_FRACTION * max(rgb.shape[:2])
        return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma)
    if fill == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        return rng.integers(0, 256, size=rgb.shape, dtype=np.uint8)
    return rgb.copy()


def apply_background(
    rgb: np.ndarray, mask: np.ndarray | None, fill: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """`rgb` with every pixel outside `mask` replaced per `fill`; no mask (or fill "none") leaves it as is."""
    fill = check_fill(fill)
    if mask is None or fill == "none":
        return rgb.copy()
    if mask.shape != rgb.shape[:2]:
        raise SpotmatchError(f"mask shape {mask.shape} does not match image {rgb.shape[:2]}; recompute the mask")
    return np.where(mask[..., None], rgb, background_pixels(rgb, fill, rng, mask))


def extended_animal(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The animal's own colours smeared outward (a Gaussian-weighted mean of nearby animal pixels; far
    away, its mean colour): smooth, and made without reading one background pixel, so a keypoint
    descriptor that reaches past the outline describes no rock or grass, and a cut-out's hidden pixels
    (whatever its alpha hides) change nothing."""
    if not mask.any():
        return np.full_like(rgb, GREY_LEVEL)
    sigma = EXTEND_SIGMA_FRACTION * max(rgb.shape[:2])
    weight = mask.astype(np.float32)
    colour_sum = cv2.GaussianBlur(rgb.astype(np.float32) * weight[..., None], (0, 0), sigmaX=sigma)
    weight_sum = cv2.GaussianBlur(weight, (0, 0), sigmaX=sigma)[..., None]
    extended = np.where(weight_sum > 1e-3, colour_sum / np.maximum(weight_sum, 1e-3), rgb[mask].mean(axis=0))
    return np.clip(np.round(extended), 0, 255).astype(np.uint8)


def crop_to_mask(
    rgb: np.ndarray, mask: np.ndarray | None, margin: float = 0.1
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image and mask cut to the mask's box grown by `margin` of its size; unchanged without a mask."""
    box = mask_bbox(mask, margin) if mask is not None else None
    if box is None:
        return rgb, mask
    x0, y0, x1, y1 = box
    return rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1]


def masked_crop(rgb: np.ndarray, mask: np.ndarray | None, fill: str = "none", margin: float = 0.1) -> np.ndarray:
    """The embedder's view of an image: cropped to the animal, background filled. The one call for inference."""
    crop, crop_mask = crop_to_mask(rgb, mask, margin)
    return apply_background(crop, crop_mask, fill)


def _random_synthetic_background(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Flat colour, blurred noise or a linear gradient: textures that carry no camera-site identity."""
    height, width = shape[:2]
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), shape).copy()
    if kind == 1:
        noise = rng.integers(0, 256, size=shape, dtype=np.uint8)
        return cv2.GaussianBlur(noise, (0, 0), sigmaX=float(rng.uniform(1.0, 0.05 * max(height, width))))
    start, stop = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    return np.broadcast_to(start + (stop - start) * ramp, shape).astype(np.uint8)


def _fit_to(image: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random crop of `image`, scaled so it covers `shape`."""
    height, width = shape[:2]
    scale = max(height / image.shape[0], width / image.shape[1])
    resized = cv2.resize(image, (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale))))
    y0 = rng.integers(0, resized.shape[0] - height + 1)
    x0 = rng.integers(0, resized.shape[1] - width + 1)
    return resized[y0 : y0 + height, x0 : x0 + width]


def replace_background(
    rgb: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    backgrounds: Sequence[np.ndarray] = (),
    feather_sigma: float = 2.0,
) -> np.ndarray:
    """Training augmentation: the animal pasted on a random background (one of `backgrounds`, e.g.
    animal-free frames of *other* cameras, or a synthetic texture), so no background feature stays tied
    to an identity. The seam is feathered outward only: animal pixels stay exact, and a hard cut-out edge
    cannot become a feature of its own."""
    if mask is None or not mask.any():
        return rgb.copy()
    use_photo = len(backgrounds) > 0 and rng.random() < 0.5
    if use_photo:
        new_background = _fit_to(backgrounds[rng.integers(len(backgrounds))], rgb.shape, rng)
    else:
        new_background = _random_synthetic_background(rgb.shape, rng)
    alpha = mask.astype(np.float32)
    if feather_sigma > 0:
        alpha = np.maximum(alpha, cv2.GaussianBlur(alpha, (0, 0), sigmaX=feather_sigma))
    alpha = alpha[..., None]
    blended = alpha * rgb.astype(np.float32) + (1.0 - alpha) * new_background.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


class RandomBackground:
    """Callable augmentation for the embedder's pipeline: with probability `p`, `replace_background`."""

    def __init__(self, p: float = 0.5, backgrounds: Sequence[np.ndarray] = (), feather_sigma: float = 2.0):
        self.p = p
        self.backgrounds = list(backgrounds)
        self.feather_sigma = feather_sigma

    def __call__(self, rgb: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
        if mask is None or rng.random() >= self.p:
            return rgb
        return replace_background(rgb, mask, rng, self.backgrounds, self.feather_sigma)
