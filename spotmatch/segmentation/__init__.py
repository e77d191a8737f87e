"""Animal masks so that identity comes from the coat, not the camera site.

The API other stages call:
    provider = MaskProvider.from_config(MaskConfig(source="unet:runs/seg-lite0/unet.pt"), cache_dir)
    mask = provider.mask_for(record)                  # (H, W) bool, or None: use the whole frame
    view = masked_crop(record.rgb, mask, fill="grey") # crop to the animal, background filled
    RandomBackground(p=0.5)(rgb, mask, rng)           # training augmentation for the embedder
"""
from spotmatch.segmentation.background import (
    FILLS,
    RandomBackground,
    apply_background,
    crop_to_mask,
    masked_crop,
    replace_background,
)
from spotmatch.segmentation.provider import MaskConfig, MaskProvider

__all__ = [
    "FILLS",
    "MaskConfig",
    "MaskProvider",
    "RandomBackground",
    "apply_background",
    "crop_to_mask",
    "masked_crop",
    "replace_background",
]
