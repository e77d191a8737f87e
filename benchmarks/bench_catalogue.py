"""Grow a catalogue to N images and time `add` and `identify` (embed query + FAISS top-K + keypoint
re-score of the shortlist + fusion).

Scale-test shortcut (this benchmark only): the gallery is copies of a few real frames, downscaled to
`--side` pixels, each with its copy number appended after the JPEG end marker so every file hash
differs while the pixels do not. Because the pixels are identical, a copy's embedding and keypoints
are reused from its source frame (embedding by a lookup, keypoints by hard-linking the cache file),
so the add rate measured is the catalogue's own work (hash, full decode check, transaction, index)
and the model runs once per source. Queries are real frames not in the gallery, at full resolution,
through the real model: identify latency is not shortcut.

    .venv/bin/python benchmarks/bench_catalogue.py --size 10000
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from spotmatch.catalogue.service import AddConfig, IdentifyConfig, ImageSource, add_images, identify, init_catalogue, open_engine
from spotmatch.catalogue.store import GalleryRestriction
from spotmatch.data.images import file_sha256
from spotmatch.io import write_text_atomic

from report import header

REPO = Path(__file__).resolve().parents[1]
SNOW = REPO.parent / "shared" / "datasets" / "snowleopard"


@dataclass
class SourceEmbedder:
    """Embeds a copy by looking up its source frame's embedding (identical pixels, see the module note)."""

    model_id: str
    dim: int
    by_copy: dict[str, np.ndarray]

    def embed(self, paths: list) -> np.ndarray:
        return np.stack([self.by_copy[str(p)] for p in paths])


def write_sources(table: pd.DataFrame, folder: Path, side: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in table["filename"]:
        image = Image.open(SNOW / "images" / name).convert("RGB")
        image.thumbnail((side, side))
        path = folder / name
        image.save(path, quality=90)
        paths.append(path)
    return paths


def write_copies(sources: list[Path], folder: Path, size: int) -> list[tuple[Path, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for number in range(size):
        source = sources[number % len(sources)]
        copy = folder / f"{number:06d}_{source.name}"
        copy.write_bytes(source.read_bytes() + f"copy{number}".encode())  # after EOI: same pixels, new hash
        copies.append((copy, source))
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "runs/snow-cpu/best.pt"), help="the catalogue's embedder (train or demo makes one)")
    parser.add_argument("--fusion", default=str(REPO / "runs/snow-cpu/fusion.json"), help="its calibration file (from calibrate)")
    parser.add_argument("--size", type=int, default=10_000, help="catalogue photos (distinct copies of the source photos)")
    parser.add_argument("--sources", type=int, default=40, help="real photos the copies are made from")
    parser.add_argument("--queries", type=int, default=5, help="photos identified and timed")
    parser.add_argument("--side", type=int, default=512, help="long side of the copies, in pixels")
    parser.add_argument("--shortlist-k", type=int, default=None, help="default: the calibration file's")
    parser.add_argument("--work", default="/tmp/bench_catalogue", help="scratch folder (replaced): the catalogue and its copies")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "catalogue.md", help="the table, also printed")
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    table = pd.read_csv(SNOW / "labels.csv", dtype=str, keep_default_na=False)
    table = table[table["unambiguous"] == "True"].sample(frac=1.0, random_state=0)
    source_rows, query_rows = table.iloc[:args.sources], table.iloc[args.sources:args.sources + args.queries]
    sources = write_sources(source_rows, work / "sources", args.side)
    identity_of = dict(zip(sources, source_rows["identity"]))
    station_of = dict(zip(sources, source_rows["station"]))
    copies = write_copies(sources, work / "copies", args.size)

    store = init_catalogue(work / "cat", Path(args.checkpoint), Path(args.fusion))
    engine = open_engine(store, args.shortlist_k)
    started = time.perf_counter()
    source_embeddings = dict(zip(map(str, sources), engine.embedder.embed(sources)))
    engine.local.features_many([str(s) for s in sources])
    model_seconds = time.perf_counter() - started
    feature_folder = engine.local.cache.folder
    for copy, source in copies:  # hard links: the copy's keypoints are its source's (same pixels)
        os.link(feature_folder / f"{file_sha256(source)}.npz", feature_folder / f"{file_sha256(copy)}.npz")
    stand_in = SourceEmbedder(engine.embedder.model_id, engine.embedder.dim,
                              {str(c): source_embeddings[str(s)] for c, s in copies})

    started = time.perf_counter()
    report = add_images(store, stand_in, engine.local,
                        [ImageSource(c, identity=identity_of[s], station=station_of[s]) for c, s in copies], AddConfig(batch_size=256))
    add_seconds = time.perf_counter() - started
    assert report.added == args.size and not report.failed, report

    started = time.perf_counter()
    index, ids = store.search_index()
    index_seconds = time.perf_counter() - started
    queries = [SNOW / "images" / name for name in query_rows["filename"]]
    # Warm-up (thread pools, lazy imports) on a frame that is not timed: a timed query must not find its
    # embedding or its pairs' evidence already in the catalogue's caches.
    identify(store, engine, [SNOW / "images" / table.iloc[args.sources + args.queries]["filename"]])
    def timed(conf: IdentifyConfig, photos: list[Path]) -> list[float]:
        latencies = []
        for query in photos:
            started = time.perf_counter()
            identify(store, engine, [query], conf)
            latencies.append(time.perf_counter() - started)
        return latencies

    latencies = timed(IdentifyConfig(top_k=5), queries)
    # One site: the restriction picks its images in SQL and searches them exactly (a flat index built per
    # call). The query embeddings are cached by now, its shortlists' pairs mostly not. Then both again with
    # everything cached: the difference is what the restriction itself costs.
    busiest = pd.Series(list(station_of.values())).value_counts().index[0]
    restricted_conf = IdentifyConfig(top_k=5, restriction=GalleryRestriction(stations=(busiest,)))
    kept = len(store.restricted_image_ids(restricted_conf.restriction))
    restricted = timed(restricted_conf, queries)
    cached = {"whole catalogue": timed(IdentifyConfig(top_k=5), queries), "restricted": timed(restricted_conf, queries)}

    rows = [
        "| measure | value |", "|---|---|",
        f"| gallery images | {args.size} ({args.sources} real frames at {args.side}px, copied) |",
        f"| FAISS index | {type(index).__name__} ({len(ids)} vectors, built from the DB blobs in {index_seconds:.2f} s) |",
        f"| add rate (hash + decode check + transaction; embeddings reused) | {args.size / add_seconds:.0f} images/s |",
        f"| model on the {args.sources} source frames (embed + RootSIFT) | {model_seconds / args.sources:.2f} s/image |",
        f"| identify latency, {len(queries)} full-resolution queries, shortlist {engine.conf.shortlist_k} |"
        f" median {np.median(latencies):.2f} s, max {max(latencies):.2f} s |",
        f"| identify restricted to station {busiest} ({kept} images), query embeddings cached |"
        f" median {np.median(restricted):.2f} s, max {max(restricted):.2f} s |",
        f"| identify with everything cached: whole catalogue / restricted | median {np.median(cached['whole catalogue']):.3f} s"
        f" / {np.median(cached['restricted']):.3f} s |",
        f"| catalogue.db size | {(work / 'cat' / 'catalogue.db').stat().st_size / 2**20:.1f} MiB |",
    ]
    report = header("Catalogue at scale: add and identify", f"{SNOW.name} frames (see the module docstring for the copies),"
                    f" checkpoint {args.checkpoint}, calibration {args.fusion}") + "\n" + "\n".join(rows) + "\n"
    print(report)
    write_text_atomic(report, args.out)


if __name__ == "__main__":
    main()
