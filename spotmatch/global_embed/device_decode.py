"""JPEG decoding on the embedding device (nvJPEG on a GPU), for passes whose CPU decoding workers cannot
keep up with the network: on one H100 they fed EfficientNet-Lite2 at 41 % of its bare forward rate
(docs/training.md, "Embedding throughput").

The workers then only read each file's bytes and EXIF orientation; the device decodes a whole batch in
one call, turns each image upright and letterboxes it as `transforms.letterbox` does on the CPU. Files
it cannot take as they are (PNG, CMYK JPEG, anything that needs a mask) keep the CPU path inside the
same batch, and a batch that nvJPEG refuses (a truncated file) is prepared again on the CPU, which
names the bad file in its one-line error.

torchvision's decoders are deprecated from 0.29 in favour of TorchCodec's (`torchcodec.decoders.
decode_jpeg`, the same call); torchvision's are used while the pinned version has them, to add no
dependency.
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import ExifTags, Image

from spotmatch.data.images import DECODE_ERRORS, read_image_bytes
from spotmatch.errors import SpotmatchError

JPEG_MAGIC = b"\xff\xd8"
# Modes nvJPEG turns into RGB as PIL does; CMYK and YCCK JPEGs need PIL's conversion.
DEVICE_MODES = ("RGB", "L")


@dataclass
class EncodedJpeg:
    # The file's bytes. Plain bytes travel from a worker process pickled through its pipe; a tensor each would
    # cost a shared-memory file descriptor per image, which a long pass of small files runs out of.
    data: bytes
    orientation: int  # EXIF orientation, 1 (upright) to 8


def encoded_jpeg(path: str | Path) -> EncodedJpeg | None:
    """The bytes and orientation of a JPEG the device can decode as it is; None for any other file, which
    the CPU path decodes (and, if it is damaged, names in its error). Reads the header only."""
    data = read_image_bytes(path)
    if not data.startswith(JPEG_MAGIC):
        return None
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG" or image.mode not in DEVICE_MODES:
            return None
        orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except DECODE_ERRORS:
        return None
    return EncodedJpeg(data, orientation if 1 <= orientation <= 8 else 1)


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored → as seen, the turn PIL's `ImageOps.exif_transpose` makes for each EXIF value."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 2)
    flips = {2: (2,), 3: (1, 2), 4: (1,), 6: (2,), 7: (1, 2), 8: (1,)}.get(orientation, ())
    return image.flip(flips) if flips else image


@functools.lru_cache(maxsize=16)  # a data set's photos come in a few sizes; each kernel holds up to tens of MB of GPU memory
def area_weights(in_len: int, out_len: int, device: torch.device) -> torch.Tensor:
    """(out_len, in_len) matrix averaging each output pixel's share of the input, fractional pixels at its
    edges weighed by their overlap: OpenCV's INTER_AREA for shrinking, as a matmul the device runs."""
    scale = in_len / out_len
    edges = torch.arange(out_len + 1, device=device, dtype=torch.float64) * scale
    pixels = torch.arange(in_len, device=device, dtype=torch.float64)
    overlap = (torch.minimum(edges[1:, None], pixels[None, :] + 1) - torch.maximum(edges[:-1, None], pixels[None, :])).clamp(min=0)
    return (overlap / scale).float()


def letterbox_tensor(image: torch.Tensor, size: int, pad_rgb: tuple[int, int, int]) -> torch.Tensor:
    """(3, H, W) uint8 → (3, size, size) uint8: the long side resized to `size`, centred on the pad colour;
    the geometry and filters of `transforms.letterbox` (INTER_AREA shrinking, bilinear enlarging), so that
    the network sees the CPU path's pixels (tests/test_global.py); an antialiased bilinear shrink did not."""
    height, width = image.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if scale < 1:
        rows, cols = area_weights(height, new_h, image.device), area_weights(width, new_w, image.device)
        resized = rows @ image.float() @ cols.T
    else:
        resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    canvas = torch.tensor(pad_rgb, dtype=torch.uint8, device=image.device).view(3, 1, 1).repeat(1, size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = resized.round().clamp(0, 255).to(torch.uint8)
    return canvas


def decode_jpegs(encoded: list[EncodedJpeg], device: torch.device) -> list[torch.Tensor]:
    """One batched decode; raises RuntimeError for a file nvJPEG cannot read."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see the module docstring
        return decode_jpeg([torch.frombuffer(bytearray(item.data), dtype=torch.uint8) for item in encoded], mode=ImageReadMode.RGB,
                           device=device)


def decoded_on_device(batches: Iterable, dataset, device: torch.device) -> Iterator:
    """`Batch`es whose encoded JPEGs are decoded and letterboxed on `device`, joined to the images the
    workers prepared: `images` on `device`, `indices` in the same order."""
    from spotmatch.global_embed.loading import Batch
    from spotmatch.global_embed.transforms import PAD_RGB, stack_images

    for batch in batches:
        if not batch.encoded:
            yield batch
            continue
        try:
            decoded = decode_jpegs(batch.encoded, device)
            prepared = [letterbox_tensor(upright(image, item.orientation), dataset.conf.image_size, PAD_RGB)
                        for image, item in zip(decoded, batch.encoded)]
        except RuntimeError:  # nvJPEG names no file: the CPU path finds the bad one and says which
            prepared = [_prepared_on_cpu(dataset, index).to(device) for index in batch.encoded_indices]
        images = [*batch.images.to(device).unbind(0), *prepared] if len(batch.indices) else prepared
        labels = torch.tensor([dataset.labels[i] for i in [*batch.indices, *batch.encoded_indices]], dtype=torch.long)
        yield Batch(stack_images(images), labels, [*batch.indices, *batch.encoded_indices])


def _prepared_on_cpu(dataset, index: int) -> torch.Tensor:
    _, image, error = dataset.prepare(index)
    if error is not None:
        raise SpotmatchError(error)
    return image
