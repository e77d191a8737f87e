"""Downsize a dataset folder (labels.csv + images/) for a GPU machine that receives at most 64 MiB.

    python benchmarks/stage_for_gpu.py ../shared/datasets/snowleopard .stage/snowleopard --side 512 --quality 80
    python benchmarks/stage_for_gpu.py ../shared/datasets/nyala .stage/nyala --side 352 --quality 72

EXIF orientation is applied before resizing; file names are kept so labels.csv still fits.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image, ImageOps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--side", type=int, default=512, help="long side in pixels")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    args = parser.parse_args()
    (args.target / "images").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.source / "labels.csv", args.target / "labels.csv")
    for path in sorted((args.source / "images").iterdir()):
        with Image.open(path) as image:
            image.draft("RGB", (args.side, args.side))
            small = ImageOps.exif_transpose(image).convert("RGB")
        small.thumbnail((args.side, args.side), Image.LANCZOS)
        small.save(args.target / "images" / path.name, quality=args.quality)


if __name__ == "__main__":
    main()
