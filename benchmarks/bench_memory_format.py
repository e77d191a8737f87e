"""What the memory layout of the network and its input costs: images/s of the forward pass (inference)
and of a training step (forward, backward, AdamW), each backbone in contiguous NCHW and in channels_last
(NHWC, `spotmatch.global_embed.model.MEMORY_FORMAT`), on random input, same model and batch.

    .venv/bin/python benchmarks/bench_memory_format.py [--backbones efficientnet_lite0:256 efficientnet_lite2:384 ...]
        [--batch-size 16] [--rounds 3] [--device cpu] [--out docs/results/bench_memory_format.md]

The two layouts alternate within each round, so a neighbour's load on the machine falls on both; the
table gives the median of the rounds.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from spotmatch.global_embed.model import EmbedderConfig, ReIDNet
from spotmatch.io import write_text_atomic

LAYOUTS = {"contiguous (NCHW)": torch.contiguous_format, "channels_last (NHWC)": torch.channels_last}


def images_per_second(step, batch_size: int, steps: int = 2) -> float:
    step()  # warm-up: kernels and allocator for this layout
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started)


def rates(backbone: str, image_size: int, batch_size: int, rounds: int, device: torch.device) -> dict[tuple[str, str], float]:
    """Median images/s per (layout, "forward" or "train step")."""
    torch.manual_seed(0)
    model = ReIDNet(EmbedderConfig(backbone=backbone, pretrained="none", image_size=image_size)).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.rand(batch_size, 3, image_size, image_size, device=device)
    measured: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for layout, memory_format in LAYOUTS.items():
            model.to(memory_format=memory_format)
            inputs = batch.contiguous(memory_format=memory_format)

            @torch.inference_mode()
            def forward():
                model.eval()(inputs)

            def train_step():
                loss = model.train()(inputs).pow(2).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()

            measured.setdefault((layout, "forward"), []).append(images_per_second(forward, batch_size))
            measured.setdefault((layout, "train step"), []).append(images_per_second(train_step, batch_size))
    return {key: statistics.median(values) for key, values in measured.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0:256", "efficientnet_lite2:384", "resnet50:224", "convnext_small:224"],
                        help="timm name:input size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    lines = [f"`python benchmarks/bench_memory_format.py --backbones {' '.join(args.backbones)} --batch-size {args.batch_size} "
             f"--rounds {args.rounds} --device {args.device}`", "",
             f"device: {device_name}; torch {torch.__version__}, {torch.get_num_threads()} threads; random input; median of {args.rounds} rounds", "",
             "| backbone | size | forward img/s, NCHW | forward img/s, NHWC | NHWC / NCHW | train step img/s, NCHW | train step img/s, NHWC | NHWC / NCHW |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in args.backbones:
        backbone, image_size = spec.rsplit(":", 1)
        r = rates(backbone, int(image_size), args.batch_size, args.rounds, device)
        cells = []
        for kind in ("forward", "train step"):
            nchw, nhwc = r[("contiguous (NCHW)", kind)], r[("channels_last (NHWC)", kind)]
            cells += [f"{nchw:.1f}", f"{nhwc:.1f}", f"{nhwc / nchw:.2f}"]
        lines.append(f"| {backbone} | {image_size} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        write_text_atomic(table + "\n", args.out)


if __name__ == "__main__":
    main()
