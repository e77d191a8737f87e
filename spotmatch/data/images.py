"""Image loading: one decode path for every stage.

Every image goes through `load_image`, so EXIF orientation, greyscale/infrared conversion and the
alpha-channel mask are handled once. PIL's plain `convert("RGB")` would silently drop the alpha mask
that the competition's PNG cut-outs carry, so the alpha is split off first.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from spotmatch.errors import SpotmatchError

# Below this alpha value a pixel counts as background.
ALPHA_THRESHOLD = 128
# When the shutter fired, and when the camera stored the frame (the same moment on a camera trap); both in the
# Exif IFD. DateTime (0x0132, in IFD0) is when the file was last changed, by a resize tool or an editor: not a capture time.
_EXIF_CAPTURE_TAGS = (ExifTags.Base.DateTimeOriginal, ExifTags.Base.DateTimeDigitized)
# EXIF's "date not set": zeros ("0000:00:00 00:00:00") or blanks ("    :  :     :  :  ") in the date's place.
_UNSET_TIME = re.compile(r"[0\s:/.-]*")


@dataclass
class ImageRecord:
    """A decoded image: RGB pixels (H, W, 3) uint8, an optional animal mask (H, W) bool."""

    path: Path
    rgb: np.ndarray
    mask: np.ndarray | None
    sha256: str
    captured_at: str | None = None
    greyscale: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), the order OpenCV and PIL use."""
        return self.rgb.shape[1], self.rgb.shape[0]


# What PIL raises for a file it cannot decode (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def quiet_large_photos() -> None:
    """PIL warns, in two lines pointing into site-packages, of every photo over 89 megapixels: today's cameras take
    them. Photos over twice that are still refused, in one line (DecompressionBombError). For the processes this
    package owns: the command line, and its decoding workers."""
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def read_image_bytes(path: str | Path) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SpotmatchError(f"{path}: image file not found; check the path or the --images folder") from None
    except IsADirectoryError:
        raise SpotmatchError(f"{path}: is a folder, not an image file; name the image inside it") from None
    except OSError as exc:  # a link that loops, no permission, a device that failed
        raise SpotmatchError(f"{path}: cannot be read ({exc.strerror or exc}); check the file, or the link it is") from None


def printable(path: str | Path) -> str:
    """`path` as text any terminal, JSON or SQLite takes: bytes of a name that are not UTF-8 (which Python keeps
    as lone surrogates) written as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def refuse_unprintable_name(path: str | Path, kept_by: str) -> None:
    """Where a file's name is stored as text (`kept_by`: the catalogue's database), one that is not UTF-8 is refused."""
    if printable(path) != str(path):
        raise SpotmatchError(f"{printable(path)}: the file name is not valid UTF-8, so {kept_by} cannot record it; rename the file")


def undecodable(path: str | Path, exc: Exception) -> SpotmatchError:
    """The one-line error for an image file PIL cannot decode."""
    reason = "not an image format PIL reads" if isinstance(exc, UnidentifiedImageError) else (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return SpotmatchError(f"{path}: cannot decode image ({reason}); re-export the file or remove it from the input")


def file_sha256(path: str | Path) -> str:
    """Content hash of an image file: the cache key of every stage."""
    return hashlib.sha256(read_image_bytes(path)).hexdigest()


def unset_capture_time(text: str) -> bool:
    """Whether a capture time says "not set" (EXIF's zeros or blanks, an empty text) rather than any date: stored
    as a date, it would read as one to a reviewer, and as year 0 it could never be compared."""
    return _UNSET_TIME.fullmatch(text) is not None


def _capture_time(image: Image.Image) -> str | None:
    """DateTimeOriginal, else DateTimeDigitized, as written; None (date unknown) when neither is set."""
    exif = image.getexif().get_ifd(ExifTags.IFD.Exif)
    for tag in _EXIF_CAPTURE_TAGS:
        value = exif.get(tag)
        if value is not None and not unset_capture_time(str(value).strip()):
            return str(value).strip()
    return None


def _split_alpha(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """Separate colour from alpha; an alpha that hides nothing is not a mask."""
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:  # a PNG's tRNS chunk: one colour is transparent
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        return image, None
    alpha = np.asarray(image.getchannel("A"))
    colour = image.convert("RGB")
    mask = alpha >= ALPHA_THRESHOLD
    return colour, (None if mask.all() else mask)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float thermal/infrared frames: stretch to 8 bit rather than clip.
        values = np.asarray(image, dtype=np.float32)
        low, high = np.percentile(values, [0.5, 99.5])
        scaled = np.clip((values - low) / max(high - low, 1e-6) * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled)
    return image.convert("RGB")


def load_image(path: str | Path, draft_size: int | None = None) -> ImageRecord:
    """Decode an image file fully, or raise a one-line SpotmatchError naming the file and the fix.

    `draft_size` lets JPEG decoding skip detail the caller will not use: libjpeg decodes at the
    smallest 1/2, 1/4 or 1/8 scale that keeps both sides at least that many pixels (2-4x faster).
    """
    return decode_image(read_image_bytes(path), path, draft_size)


def decode_image(data: bytes, path: str | Path, draft_size: int | None = None) -> ImageRecord:
    """`load_image` of bytes already read (an upload); `path` names them in errors and in the record."""
    path = Path(path)
    try:
        image = Image.open(io.BytesIO(data))
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # decode now: a truncated file fails here, not deep inside a batch
        captured_at = _capture_time(image)
        image = ImageOps.exif_transpose(image)
        colour, mask = _split_alpha(image)
        rgb = np.asarray(_to_rgb(colour))
    except DECODE_ERRORS as exc:
        raise undecodable(path, exc) from None
    if mask is not None and not mask.any():  # a cut-out of nothing: the embedder would see the hidden frame, keypoints nothing
        raise SpotmatchError(f"{path}: its alpha channel hides every pixel (none at least half opaque), so no animal is left to"
                             f" match; re-export the cut-out,"
                             f" or save it without alpha to use the whole picture")
    return ImageRecord(
        path=path,
        rgb=np.ascontiguousarray(rgb),
        mask=mask,
        sha256=hashlib.sha256(data).hexdigest(),
        captured_at=captured_at,
        greyscale=looks_greyscale(rgb),
    )


# Mean absolute difference between colour channels below which a frame counts as grey: JPEG colour
# noise keeps night-infrared frames from having exactly equal channels.
GREYSCALE_CHANNEL_DIFFERENCE = 2.0


def looks_greyscale(rgb: np.ndarray) -> bool:
    """Greyscale or night infrared (stored as RGB with near-equal channels)."""
    pixels = rgb[::4, ::4].astype(np.int16)
    difference = np.abs(pixels[..., 0] - pixels[..., 1]).mean() + np.abs(pixels[..., 1] - pixels[..., 2]).mean()
    return bool(difference < GREYSCALE_CHANNEL_DIFFERENCE)


def mask_bbox(mask: np.ndarray, margin: float = 0.0) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the mask's pixels grown by `margin` of the box size; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pad_y, pad_x = int((y1 - y0) * margin), int((x1 - x0) * margin)
    height, width = mask.shape
    return max(0, x0 - pad_x), max(0, y0 - pad_y), min(width, x1 + pad_x), min(height, y1 + pad_y)
