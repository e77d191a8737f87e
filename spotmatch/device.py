"""The torch device a stage runs on, from a user's --device."""
from __future__ import annotations

import torch

from spotmatch.errors import SpotmatchError


def resolve_device(name: str) -> torch.device:
    """'auto': CUDA when present, else CPU. A name torch does not know, or CUDA on a machine without it, is
    refused before any model loads."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpotmatchError(f"--device {name}: not a device torch knows; use auto, cpu or cuda (cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpotmatchError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu (or auto)")
    return device
