"""Small images for the page: JPEG thumbnails and PNG figures as base64 data URIs (the page must
open offline, so nothing is linked that could go missing)."""
from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from spotmatch.data.images import load_image


def thumbnail(path: str | Path, size: int) -> Image.Image:
    """The image shrunk to fit `size` x `size`, EXIF orientation applied (decoded at reduced scale)."""
    image = Image.fromarray(load_image(path, draft_size=size).rgb)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def jpeg_data_uri(image: Image.Image, quality: int = 70) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def png_data_uri(path: str | Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
