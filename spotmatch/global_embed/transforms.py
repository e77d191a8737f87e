"""From an ImageRecord to the network's input tensor, and the training augmentation.

Inference and training share `prepare_pixels`, so the model sees the same framing in both.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision.transforms import v2

from spotmatch.data.images import ImageRecord
from spotmatch.global_embed.model import MEMORY_FORMAT, EmbedderConfig
from spotmatch.segmentation.background import masked_crop

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_RGB = np.array(IMAGENET_MEAN) * 255
PAD_RGB = tuple(int(c) for c in _MEAN_RGB)


@dataclass
class AugmentConfig:
    colour_jitter: float = 0.3
    affine_scale: tuple[float, float] = (0.8, 1.15)
    affine_translate: float = 0.1
    rotate_degrees: float = 10.0
    random_erasing: float = 0.25
    # Off by default: a mirrored left flank looks like a right flank with a different pattern.
    horizontal_flip: bool = False
    # Probability of pasting the masked animal on a synthetic background (needs masks: --masks), so no
    # background feature stays tied to an identity.
    random_background: float = 0.0


def letterbox(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the long side to `size` and pad to a square with the mean colour (aspect kept)."""
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    # OpenCV pads in one pass, faster than filling a numpy canvas with a 3-value colour.
    return cv2.copyMakeBorder(resized, top, size - new_h - top, left, size - new_w - left, cv2.BORDER_CONSTANT,
                              value=PAD_RGB)


def prepare_pixels(record: ImageRecord, conf: EmbedderConfig, mask: np.ndarray | None = None) -> np.ndarray:
    """Crop to the animal when a mask is known, fill the background, letterbox: (S, S, 3) uint8."""
    mask = record.mask if mask is None else mask
    if mask is not None and not mask.any():
        mask = None  # nothing found: the whole frame is better than an empty crop
    return letterbox(masked_crop(record.rgb, mask, conf.background_fill, conf.mask_crop_margin), conf.image_size)


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 → (3, S, S) uint8 tensor, a view of the pixels (no copy: `stack_images` makes the
    one copy into the batch). Batches travel from the decoding workers as uint8 (4x less than float32)
    and are normalised on the device by `normalise`."""
    return torch.from_numpy(pixels).permute(2, 0, 1)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(3, S, S) uint8 images → one (N, 3, S, S) batch, in one copy. Images that are views of HWC pixels
    (`to_tensor`: inference) are stacked as HWC rows, which makes the batch channels_last (the layout the
    networks run in, `normalise`) much faster than gathering them into NCHW; augmented training
    images come as NCHW tensors of their own and are stacked as they are."""
    if all(image.permute(1, 2, 0).is_contiguous() for image in images):
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) → ImageNet-normalised float in channels_last (NHWC), on whatever device the
    batch is on: the network's input (model.MEMORY_FORMAT)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).contiguous(memory_format=MEMORY_FORMAT)


def build_train_augment(conf: AugmentConfig) -> v2.Compose:
    """uint8 (3, S, S) in, uint8 out: normalisation happens on the device, as at inference."""
    steps = [
        v2.RandomAffine(
            degrees=conf.rotate_degrees,
            translate=(conf.affine_translate, conf.affine_translate),
            scale=conf.affine_scale,
            fill=[int(c) for c in _MEAN_RGB],
        ),
        v2.ColorJitter(brightness=conf.colour_jitter, contrast=conf.colour_jitter,
                       saturation=conf.colour_jitter, hue=min(0.05, conf.colour_jitter / 6)),
        v2.RandomGrayscale(p=0.1),  # night infrared frames are grey: teach invariance to colour loss
    ]
    if conf.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.RandomErasing(p=conf.random_erasing, value=[int(c) for c in _MEAN_RGB]))
    return v2.Compose(steps)
