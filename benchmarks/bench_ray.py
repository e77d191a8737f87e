"""Throughput of one batch job: the local backend against the Ray backend with 1 and 2 actors (`--actors`).

    .venv/bin/python benchmarks/bench_ray.py --checkpoint runs/x/best.pt --n-images 120            # embed
    .venv/bin/python benchmarks/bench_ray.py --stage match --n-images 40                           # RootSIFT pairs
    python3 benchmarks/bench_ray.py --checkpoint runs/nyala-lite2-gpu-b/best.pt --dataset .stage/nyala \
        --n-images 1200 --batch-size 64 --local-workers 15 --gpus-per-actor 1 --actors 1 2          # GPU actors

`embed`: cache off (every image is decoded and embedded). `match`: each image against the next
5 images (`BenchConfig.gallery_per_query`), RootSIFT extraction and verification from an empty feature cache.
Each run writes to a fresh job folder. Ray start-up (cluster + actors loading their stage) is inside
the Ray timings: that is what a job pays.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from spotmatch.engine import ray_backend as rb
from spotmatch.engine.engine import EngineConfig, build_local
from spotmatch.global_embed.embed import EmbedConfig, Embedder
from spotmatch.io import write_text_atomic

from report import machine

SNOW = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "snowleopard"


@dataclass
class BenchConfig:
    checkpoint: Path | None = None  # needed by the embed stage
    stage: str = "embed"  # or "match"
    dataset: Path = SNOW  # a folder holding labels.csv and images/
    n_images: int = 120
    batch_size: int = 16
    local_workers: int = 0  # embed: the local path's DataLoader decode processes
    gpus_per_actor: float = 0.0  # embed: the GPU share of a lone actor; a row of n actors gives each 1/n of it
    cpus_per_actor: float = 1.0  # embed: an actor decodes in this many threads
    actors: tuple[int, ...] = (1, 2)
    gallery_per_query: int = 5  # match: pairs per query image
    pairs_per_shard: int = 50  # match: rows per Ray shard


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


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
        run = EmbedConfig(batch_size=conf.batch_size, num_workers=conf.local_workers, cache_dir=None, progress=False)
        return ("images", len(paths), lambda: Embedder.from_checkpoint(conf.checkpoint, run).embed(paths),
                lambda ray_conf, job_dir: rb.embed_on_ray(paths, conf.checkpoint, run, ray_conf, job_dir))
    pairs = match_pairs(paths, conf.gallery_per_query)

    def stage(folder: str) -> EngineConfig:  # RootSIFT, as `spotmatch match` builds it; a fresh cache per run
        return EngineConfig(cache_dir=str(Path(folder) / "cache"), local_workers=1, cache_pairs=False)

    def local_job():
        with tempfile.TemporaryDirectory() as folder:
            build_local(stage(folder), "alpha").score_pairs(pairs)

    return ("pairs", len(pairs), local_job, lambda ray_conf, job_dir: rb.match_on_ray(pairs, stage(job_dir), "alpha", ray_conf, job_dir))


def main(conf: BenchConfig) -> pd.DataFrame:
    names = pd.read_csv(conf.dataset / "labels.csv")["filename"].head(conf.n_images)
    paths = [conf.dataset / "images" / n for n in names]
    unit, n, local_job, ray_job = local_and_ray_jobs(conf, paths)
    local_label = f"local (1 process, {conf.local_workers} decode workers)" if conf.local_workers else "local (1 process)"
    rows = [timed(local_label, unit, n, local_job)]
    for workers in conf.actors:
        pool = rb.ActorPool(num_cpus=conf.cpus_per_actor, num_gpus=conf.gpus_per_actor / workers, concurrency=workers)
        ray_conf = rb.RayConfig(num_cpus_local=os.cpu_count(), batch_size=conf.batch_size, pairs_per_shard=conf.pairs_per_shard,
                                embed=pool, local=pool)
        with tempfile.TemporaryDirectory() as job_dir, rb.ray_session(ray_conf):
            gpus = f", {pool.num_gpus:g} GPU each" if pool.num_gpus else ""
            cpus = f", {pool.num_cpus:g} CPUs each" if pool.num_cpus != 1 else ""
            rows.append(timed(f"ray, {workers} actor(s){gpus}{cpus}", unit, n, lambda: ray_job(ray_conf, job_dir)))
    return pd.DataFrame(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="embedder checkpoint (the embed stage)")
    parser.add_argument("--stage", choices=("embed", "match"), default="embed")
    parser.add_argument("--dataset", type=Path, default=SNOW, help="folder with labels.csv and images/")
    parser.add_argument("--n-images", type=int, default=120, help="photos taken from the data set (match: pairs among them)")
    parser.add_argument("--batch-size", type=int, default=16, help="embed: images per forward pass and per Ray block")
    parser.add_argument("--local-workers", type=int, default=0, help="embed: decode processes of the local path")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="embed: GPUs of a lone actor; a row of n actors gives each 1/n of it")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="embed: CPUs of each actor, its decoding threads")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to time")
    parser.add_argument("--out", type=Path, help="also write the table here as markdown")
    args = parser.parse_args()
    if args.stage == "embed" and args.checkpoint is None:
        parser.error("--stage embed needs --checkpoint")
    conf = BenchConfig(args.checkpoint, args.stage, args.dataset, args.n_images, args.batch_size, args.local_workers,
                       args.gpus_per_actor, args.cpus_per_actor, tuple(args.actors))
    table = main(conf)
    print(table.to_string(index=False))
    if args.out:
        write_text_atomic(f"Command: `{' '.join(['python', *sys.argv])}`  \nMachine: {machine()}\n\n" + markdown(table), args.out)
