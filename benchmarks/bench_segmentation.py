"""Seconds per image for the mask sources on this machine: teacher (u2netp, onnxruntime) and a U-Net checkpoint.

    .venv/bin/python benchmarks/bench_segmentation.py --checkpoint runs/seg-lite0-gpu/unet.pt [--device cuda]

Times the model call only (decoding excluded), on the first N snowleopard frames, after one warm-up.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from spotmatch.data.images import load_image
from spotmatch.io import write_text_atomic
from spotmatch.segmentation.teacher import SalientObjectTeacher
from spotmatch.segmentation.unet import UNetSegmenter

from report import header

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "datasets" / "snowleopard" / "images"


def seconds_per_image(model, images) -> float:
    model.probability(images[0])  # warm-up: session/graph set-up is not per-image cost
    started = time.perf_counter()
    for rgb in images:
        model.probability(rgb)
    return (time.perf_counter() - started) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="U-Net checkpoint from `spotmatch train-seg`")
    parser.add_argument("--device", default="cpu", help="cpu, cuda ...")
    parser.add_argument("--images", type=int, default=20, help="snow-leopard frames timed (at least 1)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "segmentation.md", help="the table, also printed")
    args = parser.parse_args()
    images = [load_image(p).rgb for p in sorted(IMAGES.glob("*.JPG"))[: args.images]]
    rows = {
        "teacher u2netp (onnxruntime, CPU)": seconds_per_image(SalientObjectTeacher(), images),
        f"U-Net {args.checkpoint.parent.name} ({args.device})": seconds_per_image(
            UNetSegmenter.from_checkpoint(args.checkpoint, args.device), images
        ),
    }
    table = [f"| model | ms per image ({len(images)} frames, {images[0].shape[1]}x{images[0].shape[0]}) |", "|---|---|"]
    table += [f"| {name} | {seconds * 1000:.0f} |" for name, seconds in rows.items()]
    report = header("Mask sources: seconds per image", f"the first {len(images)} snow-leopard frames; model call only, after"
                    f" one warm-up") + "\n" + "\n".join(table) + "\n"
    print(report)
    write_text_atomic(report, args.out)


if __name__ == "__main__":
    main()
