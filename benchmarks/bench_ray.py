"""Embedding throughput: local backend vs the Ray backend with 1 and 2 actors, on this machine.

    .venv/bin/python benchmarks/bench_ray.py --checkpoint runs/x/best.pt --n-images 120

Cache off (every image is decoded and embedded); each Ray run writes to a fresh job folder.
Ray start-up (cluster + actors loading the model) is inside the Ray timings: that is what a job pays.
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

SNOW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "snowleopard"


@dataclass
class BenchConfig:
    checkpoint: Path
    n_images: int = 120
    batch_size: int = 16


def timed(label: str, n: int, job) -> dict:
    started = time.perf_counter()
    job()
    seconds = time.perf_counter() - started
    return {"backend": label, "images": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 1)}


def main(conf: BenchConfig) -> pd.DataFrame:
    names = pd.read_csv(SNOW / "labels.csv")["filename"].head(conf.n_images)
    paths = [SNOW / "images" / n for n in names]
    run = EmbedConfig(batch_size=conf.batch_size, num_workers=0, cache_dir=None, progress=False)
    rows = [timed("local (1 process)", len(paths), lambda: Embedder.from_checkpoint(conf.checkpoint, run).embed(paths))]
    for workers in (1, 2):
        ray_conf = rb.RayConfig(num_cpus_local=os.cpu_count(), batch_size=conf.batch_size, concurrency=workers, num_cpus=1)
        with tempfile.TemporaryDirectory() as job_dir, rb.ray_session(ray_conf):
            rows.append(timed(f"ray, {workers} actor(s)", len(paths),
                              lambda: rb.embed_on_ray(paths, conf.checkpoint, run, ray_conf, job_dir)))
    return pd.DataFrame(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--n-images", type=int, default=120)
    args = parser.parse_args()
    print(main(BenchConfig(args.checkpoint, args.n_images)).to_string(index=False))
