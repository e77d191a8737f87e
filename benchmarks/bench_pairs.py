"""A competition-size pair file through `spotmatch score-pairs`: is each image embedded once, and does
memory stay flat as the pairs grow?

Builds Kaggle-format test files (`row_id, query_image, gallery_image`) from every ordered pair of N
images of a data set (N = 433 gives 187,056 pairs: the 187k-pair file of the project's targets), plus random
subsets of those pairs over the same images, and runs the real `score-pairs` command on each in a fresh
process with an empty cache, so that every run embeds (and, with --fusion, extracts keypoints) from
scratch. Each run reports how many images went through the network, its time, the memory peak while
embedding, and how much memory scoring the rows adds after it (the scoring process only: the
image-decoding workers are separate processes, and their work is per image, not per row).

    .venv/bin/python benchmarks/bench_pairs.py --checkpoint runs/demo/best.pt [--fusion runs/demo/fusion.json] \
        [--images 433] [--fractions 0.015625 0.125 1] [--out docs/results/bench_pairs_global.md]

Linux only: memory is the kernel's count of the process's resident pages (VmRSS, and its peak VmHWM, restarted
when embedding ends).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "snowleopard" / "images"


def write_pair_files(image_dir: Path, n_images: int, fractions: list[float], seed: int, folder: Path) -> list[Path]:
    """Every ordered pair of n_images images (shuffled), and the first `fraction` of those rows."""
    names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(names) < n_images:
        raise SystemExit(f"{image_dir}: {len(names)} images, fewer than --images {n_images}")
    rng = np.random.default_rng(seed)
    chosen = np.array(sorted(rng.choice(names, n_images, replace=False)))
    query, gallery = np.nonzero(~np.eye(n_images, dtype=bool))
    order = rng.permutation(len(query))
    pairs = pd.DataFrame({"query_image": chosen[query[order]], "gallery_image": chosen[gallery[order]]})
    paths = []
    for fraction in sorted(fractions):
        rows = pairs.iloc[: max(1, round(fraction * len(pairs)))]
        path = folder / f"test_{len(rows)}.csv"
        rows.assign(row_id=[f"r{i}" for i in range(len(rows))])[["row_id", "query_image", "gallery_image"]].to_csv(path, index=False)
        paths.append(path)
    return paths


def memory_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since start or the last reset) of this process (Linux)."""
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":")) / 1024


def start_scoring_phase() -> float:
    """Give the embedding's freed memory back to the system and restart the peak from here; returns the
    resident size the scoring phase starts from. Without the trim, what the allocator kept from the
    embedding's batches (up to a few hundred MiB, varying from run to run) would hide or fake growth."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current resident size
    return memory_mib("VmRSS")


def run_child(args: argparse.Namespace) -> None:
    """One `score-pairs` run in this process; prints one JSON line: the images that went through the
    network, the memory peak while embedding (the pair table already loaded), and the growth after it
    (pairs scored, keypoints matched and fused, the submission written)."""
    from spotmatch import cli
    from spotmatch.global_embed.embed import Embedder

    forwarded, embedding_peaks, scoring_starts = [], [], []
    embed_uncached = Embedder._embed_uncached

    def counting(self, paths, hashes):
        forwarded.extend(hashes)
        embeddings = embed_uncached(self, paths, hashes)
        embedding_peaks.append(memory_mib("VmHWM"))
        scoring_starts.append(start_scoring_phase())
        return embeddings

    Embedder._embed_uncached = counting
    command = ["score-pairs", args.child, "--checkpoint", args.checkpoint, "--out", str(Path(args.work) / "submission.csv"),
               "--images", str(args.image_dir), "--cache-dir", str(Path(args.work) / "cache"), "--num-workers", str(args.num_workers)]
    if args.fusion:
        command += ["--fusion", args.fusion]
    started = time.perf_counter()
    sys.argv = ["spotmatch", *command]
    try:
        cli.main()  # the command line as users run it
    except SystemExit as exit_status:
        if exit_status.code:
            raise
    print(json.dumps({"embedded": len(forwarded), "embedded_distinct": len(set(forwarded)), "seconds": time.perf_counter() - started,
                      "embedding_peak_mib": max(embedding_peaks), "scoring_start_mib": scoring_starts[-1],
                      "scoring_peak_mib": memory_mib("VmHWM")}))


def measure(pair_file: Path, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_pairs_") as work:
        # Absolute: the child runs from the repository root, wherever this was started from.
        command = [sys.executable, __file__, "--child", str(pair_file), "--work", work, "--checkpoint", str(Path(args.checkpoint).resolve()),
                   "--image-dir", str(Path(args.image_dir).resolve()), "--num-workers", str(args.num_workers)]
        if args.fusion:
            command += ["--fusion", str(Path(args.fusion).resolve())]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"score-pairs on {pair_file} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        pairs = pd.read_csv(pair_file, usecols=["query_image", "gallery_image"])
        result["keypoint_files"] = len(list((Path(work) / "cache").rglob("*.npz")))  # one per image the local stage saw
        result["rows_written"] = len(pd.read_csv(Path(work) / "submission.csv"))
    return {"pairs": len(pairs), "distinct_images": len(set(pairs["query_image"]) | set(pairs["gallery_image"])), **result}


def table(results: list[dict], args: argparse.Namespace) -> str:
    stages = "global + local top-20 + fusion" if args.fusion else "global only"
    lines = [
        f"`score-pairs` ({stages}), checkpoint `{args.checkpoint}`, {args.images} images of `{os.path.relpath(args.image_dir, REPO)}`"
        f" (seed {args.seed}), fresh cache per run, `--num-workers {args.num_workers}`;"
        f" {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU used.",
        "",
        "| pairs | distinct images | network forwards | distinct among them | keypoint files | rows written | seconds"
        " | peak MiB while embedding | MiB when embedding ends | growth while scoring, MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['pairs']:,} | {r['distinct_images']} | {r['embedded']} | {r['embedded_distinct']} | {r['keypoint_files']} |"
                     f" {r['rows_written']:,} | {r['seconds']:.1f} | {r['embedding_peak_mib']:.0f} | {r['scoring_start_mib']:.0f} |"
                     f" {r['scoring_peak_mib'] - r['scoring_start_mib']:+.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="embedder checkpoint")
    parser.add_argument("--fusion", help="calibration file: run the whole chain (local stage + fusion)")
    parser.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGES, help="folder of photos the pairs are drawn from")
    parser.add_argument("--images", type=int, default=433, help="N: the file holds all N*(N-1) ordered pairs")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1 / 64, 1 / 8, 1.0],
                        help="shares of the pairs file scored, one row each (memory should stay flat across them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs drawn for each share")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    with tempfile.TemporaryDirectory(prefix="bench_pairs_files_") as folder:
        results = []
        for pair_file in write_pair_files(args.image_dir, args.images, args.fractions, args.seed, Path(folder)):
            results.append(measure(pair_file, args))
            print(json.dumps(results[-1]), file=sys.stderr)
    text = table(results, args)
    print(text)
    if args.out:
        write_text_atomic(text + "\n", args.out)


if __name__ == "__main__":
    main()
