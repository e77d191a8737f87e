"""Embedding throughput: decode + resize + forward (the real `Embedder.embed` path, cache off)
against the bare forward pass on ready tensors, same model, batch and device; and the loader alone
(decode + resize, no forward), the rate at which the device can be fed. With --decode-on-device, a
second row decodes the JPEGs on the device (nvJPEG on a GPU) instead of in the worker processes.

    python benchmarks/bench_embed.py --images ../shared/datasets/snowleopard/images --backbone efficientnet_lite2 \
        --image-size 384 --batch-size 64 --num-workers 2 --device cpu --limit 128 --out runs/benchmarks/bench_embed_cpu.md

Prints a markdown table and writes it to --out.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from spotmatch.global_embed.device_decode import decoded_on_device
from spotmatch.global_embed.embed import EmbedConfig, Embedder
from spotmatch.global_embed.loading import ImageTensorDataset, iterate_batches
from spotmatch.global_embed.model import EmbedderConfig
from spotmatch.io import write_text_atomic


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward_rate(embedder: Embedder, batch_size: int, n_images: int) -> float:
    batch = torch.randint(0, 256, (batch_size, 3, embedder.conf.image_size, embedder.conf.image_size), dtype=torch.uint8)
    embedder._forward(batch)  # warm-up: kernels, allocator
    synchronise(embedder.device)
    started, done = time.perf_counter(), 0
    while done < n_images:
        embedder._forward(batch)  # includes the uint8 host-to-device copy and normalisation, as in the real path
        done += batch_size
    synchronise(embedder.device)
    return done / (time.perf_counter() - started)


def distinct_copies(paths: list[Path], repeat: int, folder: Path) -> list[Path]:
    """`repeat` byte-distinct copies of each image: the embedder embeds each content hash once, so
    plain repeats would be served from memory. Bytes after a JPEG's end marker are ignored by decoders
    (and a PNG's after IEND), so decoding cost is unchanged."""
    copies = []
    for i in range(repeat):
        for path in paths:
            copy = folder / f"{i}_{path.name}"
            copy.write_bytes(path.read_bytes() + f"copy{i}".encode())
            copies.append(copy)
    return copies


def decode_rate(embedder: Embedder, paths: list[Path]) -> float:
    """The loader alone (decode, crop, letterbox, batch; no forward): how fast the GPU can be fed."""
    dataset = ImageTensorDataset(paths, embedder.conf, decode_on_device=embedder.run.decode_on_device)
    started, done = time.perf_counter(), 0
    batches = iterate_batches(dataset, embedder.run.batch_size, embedder.run.num_workers, pin_memory=embedder.device.type == "cuda")
    if dataset.decode_on_device:
        batches = decoded_on_device(batches, dataset, embedder.device)
    for batch in batches:
        done += len(batch.indices)
    synchronise(embedder.device)
    return done / (time.perf_counter() - started)


def full_path_rate(embedder: Embedder, paths: list[Path]) -> float:
    embedder.embed(paths[: embedder.run.batch_size])  # warm-up, uncached
    started = time.perf_counter()
    embedder.embed(paths)
    synchronise(embedder.device)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--pretrained", default="none", help="weights do not change speed; none avoids needing them")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=256, help="distinct source images")
    parser.add_argument("--repeat", type=int, default=1, help="byte-distinct copies of each image (a longer timed run)")
    parser.add_argument("--decode-on-device", action="store_true", help="also time JPEG decoding on the device (a second row)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    sources = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.limit]
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as copies:  # --repeat 16 on a GPU makes ~19k copies
        paths = distinct_copies(sources, args.repeat, Path(copies))
        conf = EmbedderConfig(backbone=args.backbone, pretrained=args.pretrained, image_size=args.image_size)
        modes = [False, True] if args.decode_on_device else [False]
        rows, bare = [], None
        for on_device in modes:
            run = EmbedConfig(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, cache_dir=None, progress=False,
                              decode_on_device=on_device)
            embedder = Embedder.pretrained_baseline(conf, run)
            bare = bare or bare_forward_rate(embedder, args.batch_size, max(len(paths), 4 * args.batch_size))
            full = full_path_rate(embedder, paths)  # its warm-up starts the decoding workers' fork server
            decoding = decode_rate(embedder, paths)
            rows.append(f"| {args.backbone} | {args.image_size} | {args.batch_size} | {args.num_workers} | {'device' if on_device else 'workers'} "
                        f"| {bare:.1f} | {full:.1f} | {full / bare:.2f} | {decoding:.1f} |")
    device_name = torch.cuda.get_device_name() if embedder.device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    table = "\n".join([
        f"`python benchmarks/bench_embed.py --images {args.images} --backbone {args.backbone} --image-size {args.image_size} "
        f"--batch-size {args.batch_size} --num-workers {args.num_workers} --device {args.device} --limit {args.limit} --repeat {args.repeat}"
        f"{' --decode-on-device' if args.decode_on_device else ''}`",
        "",
        f"device: {device_name}; torch {torch.__version__}; {len(paths)} images ({len(sources)} files x {args.repeat} copies) from `{args.images}`",
        "",
        "| backbone | size | batch | workers | JPEG decoding | bare forward img/s | decode+resize+forward img/s | ratio | decode+resize only img/s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        *rows,
    ])
    print(table)
    if args.out:
        write_text_atomic(table + "\n", args.out)


if __name__ == "__main__":
    main()
