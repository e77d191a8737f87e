"""The global embedder: timm backbone → GeM pooling → linear + BatchNorm neck → L2-normalised embedding."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spotmatch.global_embed.backbones import create_backbone

# The layout the networks and their input batches are kept in, on every device. On 2 CPU cores it makes
# EfficientNet-Lite's training steps 1.4 to 1.5 times and its forward pass 1.2 to 1.4 times as fast, and
# leaves ResNet-50 and ConvNeXt-S level (0.98 to 1.06; benchmarks/bench_memory_format.py); on a GPU it is
# PyTorch's advice for mixed precision. The loader's batches come in it without a transposing copy
# (transforms.stack_images).
MEMORY_FORMAT = torch.channels_last


@dataclass
class EmbedderConfig:
    """What defines an embedder's architecture and input: saved in every checkpoint."""

    backbone: str = "efficientnet_lite2"
    pretrained: str = "auto"  # see backbones.py
    embedding_dim: int = 512
    image_size: int = 384  # square input; images are letterboxed, never stretched
    gem_p: float = 3.0
    mask_crop_margin: float = 0.1  # crop to the mask's box grown by this fraction when a mask exists
    masks: str = "alpha"  # mask source (segmentation.MaskConfig): alpha, teacher, unet:<checkpoint>, none
    background_fill: str = "grey"  # outside the mask: none, black, grey, blur, noise (segmentation.background)


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent: between average (p=1) and max (p→∞)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(feature_map.clamp(min=self.eps).pow(self.p), 1)
        return pooled.pow(1.0 / self.p).flatten(1)


class ReIDNet(nn.Module):
    def __init__(self, conf: EmbedderConfig, pretrained: str | None = None):
        super().__init__()
        self.backbone = create_backbone(conf.backbone, conf.pretrained if pretrained is None else pretrained)
        self.pool = GeM(conf.gem_p)
        # BN neck (Luo et al., "Bag of tricks"): the metric loss sees normalised features.
        self.neck = nn.Sequential(nn.Linear(self.backbone.num_features, conf.embedding_dim, bias=False),
                                  nn.BatchNorm1d(conf.embedding_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised neck features (what ArcFace trains on)."""
        return self.neck(self.pool(self.backbone(images).float()))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward(images), dim=1)


class ArcFace(nn.Module):
    """Additive angular margin head (Deng et al. 2019); used in training only."""

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 30.0, margin: float = 0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = F.linear(F.normalize(features), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(cosine)
        target = torch.cos(theta + self.margin)
        # Past pi - m the margin would make the target logit larger again; fall back to a linear penalty.
        target = torch.where(theta + self.margin < math.pi, target, cosine - self.margin * math.sin(self.margin))
        one_hot = F.one_hot(labels, cosine.shape[1]).bool()
        return self.scale * torch.where(one_hot, target, cosine)
