"""What starting DataLoader workers costs: a fresh loader per pass, with and without the fork server's
preload, against one persistent loader (training's epochs); and decoding in the main process, in
one thread or in `--workers` threads (a Ray actor's way, which starts no processes).

    .venv/bin/python benchmarks/bench_loader.py [--images ../shared/datasets/snowleopard/images] [--workers 2]
        [--passes 4] [--out docs/results/bench_loader.md]

Each variant runs in its own Python process, so each starts its own fork server (the preload only
takes effect when the server starts). Seconds per pass over `--n-images` small images: the first pass
includes starting the fork server.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "no-preload": "a fresh loader per pass, fork server without preload (the code before 2026-11-24)",
    "fresh": "a fresh loader per pass (`make_loader`: each `embed` call, each validation pass)",
    "persistent": "one loader, workers kept between passes (`make_loader(persistent=True)`: training epochs)",
    "main-process": "no workers: decoded in the main process, one thread",
    "threads": "no workers: decoded in threads of the main process (`threaded_batches`: a Ray actor)",
}


def one_variant(variant: str, images: Path, n_images: int, workers: int, passes: int) -> list[float]:
    from torch.utils.data import DataLoader

    from spotmatch.global_embed import loading
    from spotmatch.global_embed.model import EmbedderConfig

    paths = sorted(images.iterdir())[:n_images]
    dataset = loading.ImageTensorDataset(paths, EmbedderConfig(image_size=128), [0] * len(paths))

    def plain_loader():  # the DataLoader as built before the fork server preloaded anything
        return DataLoader(dataset, batch_size=8, num_workers=workers, collate_fn=loading._Collate(dataset.labels),
                          multiprocessing_context="forkserver", worker_init_fn=loading._single_threaded_worker,
                          prefetch_factor=4)

    persistent = loading.make_loader(dataset, 8, workers, persistent=True) if variant == "persistent" else None

    def one_pass():
        if variant == "threads":
            return loading.checked_batches(loading.threaded_batches(dataset, 8, workers))
        if variant == "main-process":
            return loading.iterate_batches(dataset, 8, 0)
        return loading.checked_batches(persistent or (plain_loader() if variant == "no-preload" else loading.make_loader(dataset, 8, workers)))

    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        for _batch in one_pass():
            pass
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "snowleopard" / "images")
    parser.add_argument("--n-images", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant, args.images, args.n_images, args.workers, args.passes)))
        return

    rows = ["| loader | " + " | ".join(f"pass {i + 1} s" for i in range(args.passes)) + " |",
            "|---|" + "---:|" * args.passes]
    for variant, label in VARIANTS.items():
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--images", str(args.images),
                                "--n-images", str(args.n_images), "--workers", str(args.workers), "--passes", str(args.passes)],
                               capture_output=True, text=True, check=True, cwd=REPO)
        seconds = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(f"| {label} | " + " | ".join(f"{s:.2f}" for s in seconds) + " |")
    report = (f"Command: `{' '.join(['python', *sys.argv])}`  \nMachine: {platform.machine()}, {os.cpu_count()} CPU cores; "
              f"{args.workers} workers, {args.n_images} images at 128 px per pass\n\n" + "\n".join(rows) + "\n")
    print(report)
    if args.out:
        from spotmatch.io import write_text_atomic

        write_text_atomic(report, args.out)


if __name__ == "__main__":
    main()
