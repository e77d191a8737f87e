"""Throughput of one batch job: local backend vs the Ray backend with 1 and 2 actors, on this machine.

    .venv/bin/python benchmarks/bench_ray.py --checkpoint runs/x/best.pt --n-images 120            # embed
    .venv/bin/python benchmarks/bench_ray.py --stage match --n-images 40                           # RootSIFT pairs

`embed`: cache off (every image is decoded and embedded). `match`: each image against the next
`--gallery-per-query` images, RootSIFT extraction and verification from an empty feature cache.
Each run writes to a fresh job folder. Ray start-up (cluster + actors loading their stage) is inside
the Ray timings: that is what a job pays.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spotmatch.engine import ray_backend as rb
from spotmatch.global_embed.embed import EmbedConfig, Embedder
from spotmatch.local_match.pipeline import LocalMatcher

SNOW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "snowleopard"


@dataclass
class BenchConfig:
    checkpoint: Path | None = None  # needed by the embed stage
    stage: str = "embed"  # or "match"
    n_images: int = 120
    batch_size: int = 16
    gallery_per_query: int = 5  # match: pairs per query image
    pairs_per_shard: int = 50  # match: rows per Ray shard


def timed(label: str, unit: str, n: int, job) -> dict:
    started = time.perf_counter()
    job()
    seconds = time.perf_counter() - started
    return {"backend": label, unit: n, "seconds": round(seconds, 1), f"{unit}_per_s": round(n / seconds, 1)}


def match_pairs(paths: list[Path], per_query: int) -> pd.DataFrame:
    rows = [(q, paths[(i + k) % len(paths)]) for i, q in enumerate(paths) for k in range(1, per_query + 1)]
    return pd.DataFrame({"row_id": range(len(rows)), "query_image_path": [str(q) for q, _ in rows],
                         "gallery_image_path": [str(g) for _, g in rows]})


def local_and_ray_jobs(conf: BenchConfig, paths: list[Path]):
    """(unit, n, local job, ray job(ray_conf, job_dir)) for the chosen stage."""
    if conf.stage == "embed":
        run = EmbedConfig(batch_size=conf.batch_size, num_workers=0, cache_dir=None, progress=False)
        return ("images", len(paths), lambda: Embedder.from_checkpoint(conf.checkpoint, run).embed(paths),
                lambda ray_conf, job_dir: rb.embed_on_ray(paths, conf.checkpoint, run, ray_conf, job_dir))
    pairs = match_pairs(paths, conf.gallery_per_query)

    def settings(folder: str) -> dict:
        return {"name": "rootsift", "cache_dir": str(Path(folder) / "cache"), "workers": 1}

    def local_job():
        with tempfile.TemporaryDirectory() as folder:
            LocalMatcher.from_name(**settings(folder)).score_pairs(pairs)

    return ("pairs", len(pairs), local_job, lambda ray_conf, job_dir: rb.match_on_ray(pairs, settings(job_dir), ray_conf, job_dir))


def main(conf: BenchConfig) -> pd.DataFrame:
    names = pd.read_csv(SNOW / "labels.csv")["filename"].head(conf.n_images)
    paths = [SNOW / "images" / n for n in names]
    unit, n, local_job, ray_job = local_and_ray_jobs(conf, paths)
    rows = [timed("local (1 process)", unit, n, local_job)]
    for workers in (1, 2):
        pool = rb.ActorPool(num_cpus=1, concurrency=workers)
        ray_conf = rb.RayConfig(num_cpus_local=os.cpu_count(), batch_size=conf.batch_size, pairs_per_shard=conf.pairs_per_shard,
                                embed=pool, local=pool)
        with tempfile.TemporaryDirectory() as job_dir, rb.ray_session(ray_conf):
            rows.append(timed(f"ray, {workers} actor(s)", unit, n, lambda: ray_job(ray_conf, job_dir)))
    return pd.DataFrame(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="embedder checkpoint (the embed stage)")
    parser.add_argument("--stage", choices=("embed", "match"), default="embed")
    parser.add_argument("--n-images", type=int, default=120)
    args = parser.parse_args()
    if args.stage == "embed" and args.checkpoint is None:
        parser.error("--stage embed needs --checkpoint")
    print(main(BenchConfig(args.checkpoint, args.stage, args.n_images)).to_string(index=False))
