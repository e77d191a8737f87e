"""Checkpoints that carry their own config, so they load without the original command line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spotmatch.config import config_from_dict, config_to_dict
from spotmatch.errors import SpotmatchError
from spotmatch.global_embed.model import EmbedderConfig, ReIDNet
from spotmatch.io import atomic_path, read_torch_payload

CHECKPOINT_FORMAT = "spotmatch.embedder"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, model: ReIDNet, conf: EmbedderConfig, **extra: Any) -> Path:
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
               "embedder_config": config_to_dict(conf), "model": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict:
    payload = read_torch_payload(path, CHECKPOINT_FORMAT, "embedder", "spotmatch train",
                                 hint=" (plain backbone weights go to --pretrained)")
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise SpotmatchError(f"{path}: written by a newer spotmatch (format {payload['version']}); upgrade spotmatch")
    missing = [key for key in ("embedder_config", "model") if not isinstance(payload.get(key), dict)]
    if missing:
        raise SpotmatchError(f"{path}: an embedder checkpoint without its {' and '.join(missing)}; the file is damaged or was"
                             f" edited: use the best.pt that `spotmatch train` wrote")
    return payload


def load_model(path: str | Path, expected_backbone: str | None = None) -> tuple[ReIDNet, EmbedderConfig, dict]:
    """Rebuild the network from the checkpoint's own config and load its weights strictly."""
    path = Path(path)
    payload = read_checkpoint(path)
    conf = config_from_dict(EmbedderConfig, payload["embedder_config"])
    if expected_backbone and expected_backbone != conf.backbone:
        raise SpotmatchError(
            f"{path}: checkpoint is a '{conf.backbone}' model, not '{expected_backbone}'; drop --backbone or pass a matching checkpoint"
        )
    model = ReIDNet(conf, pretrained="none")
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError:
        raise SpotmatchError(
            f"{path}: weights do not fit the '{conf.backbone}' architecture its config names; the file is damaged or was edited"
        ) from None
    return model, conf, payload
