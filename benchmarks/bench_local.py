"""Local matching benchmark: speed per extractor, RootSIFT throughput, local-only vs global-only ranking.

    .venv/bin/python benchmarks/bench_local.py [--dataset ../shared/datasets/snowleopard] [--device auto]
        [--speed-images 6] [--skip-learned] [--skip-ranking] [--checkpoint CKPT] [--masks teacher]
        [--out runs/benchmarks/local_match.md]

Prints a markdown report and writes it to --out. Runs on CPU, or CUDA when present (--device auto).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from spotmatch.data.images import load_image
from spotmatch.data.splits import SplitConfig
from spotmatch.data.tables import load_dataset
from spotmatch.evaluation.protocol import build_protocol, evaluate_protocol, format_table
from spotmatch.evaluation.run import split_for
from spotmatch.io import write_text_atomic
from spotmatch.local_match import EXTRACTORS, LocalMatcher, VerificationConf
from spotmatch.local_match.extractors import create_extractor
from spotmatch.local_match.matchers import create_matcher

from report import machine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "snowleopard"


def speed_table(paths: list[str], device: str, names: list[str]) -> str:
    """Extraction ms per image and matching ms per pair (consecutive images paired), after one warm-up."""
    records = [load_image(p) for p in paths]
    rows = ["| extractor | matcher | settings | device | extract ms/image | match+verify ms/pair | keypoints/image |", "|---|---|---|---|---:|---:|---:|"]
    for name in names:
        learned = name != "rootsift"
        extractor = create_extractor(name, **({"device": device} if learned else {}))
        matcher = create_matcher(name, extractor.matcher, **({"device": device} if learned else {}))
        extractor.extract(records[0])  # warm-up: first call pays for allocation and kernel selection
        start = time.perf_counter()
        features = [extractor.extract(r) for r in records]
        extract_ms = (time.perf_counter() - start) / len(records) * 1000
        pairs = list(zip(features[:-1], features[1:]))
        matcher.match(*pairs[0])
        start = time.perf_counter()
        for pair in pairs:
            matcher.match(*pair)
        match_ms = (time.perf_counter() - start) / len(pairs) * 1000
        kp = np.mean([len(f) for f in features])
        where = getattr(extractor, "device", "cpu")
        rows.append(f"| {name} | {extractor.matcher} | `{extractor.conf_name}` | {where} | {extract_ms:.0f} | {match_ms:.1f} | {kp:.0f} |")
    return "\n".join(rows)


def naive_pair(path0: str, path1: str) -> int:
    """The baseline loop: decode both images, whole-frame SIFT at full size, ratio test, MAGSAC, nothing kept."""
    sift = cv2.SIFT_create()
    grey = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in (path0, path1)]
    (k0, d0), (k1, d1) = (sift.detectAndCompute(g, None) for g in grey)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d0, d1, k=2)
    good = [m for m, n in (x for x in knn if len(x) == 2) if m.distance < 0.8 * n.distance]
    if len(good) < 8:
        return 0
    p0 = np.float32([k0[m.queryIdx].pt for m in good])
    p1 = np.float32([k1[m.trainIdx].pt for m in good])
    _, inliers = cv2.findHomography(p0, p1, cv2.USAC_MAGSAC, 10.0)
    return int(inliers.sum()) if inliers is not None else 0


def plain_sift(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Whole-frame OpenCV SIFT at full size, no mask and no keypoint cap: the naive loop's features."""
    keypoints, descriptors = cv2.SIFT_create().detectAndCompute(cv2.imread(path, cv2.IMREAD_GRAYSCALE), None)
    return np.float32([k.pt for k in keypoints]), descriptors


def naive_match(features0: tuple[np.ndarray, np.ndarray], features1: tuple[np.ndarray, np.ndarray]) -> int:
    (p0, d0), (p1, d1) = features0, features1
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(d0, d1, k=2)
    good = [m for m, n in (x for x in knn if len(x) == 2) if m.distance < 0.8 * n.distance]
    if len(good) < 8:
        return 0
    index0, index1 = np.array([m.queryIdx for m in good]), np.array([m.trainIdx for m in good])
    _, inliers = cv2.findHomography(p0[index0], p1[index1], cv2.USAC_MAGSAC, 10.0)
    return int(inliers.sum()) if inliers is not None else 0


def rootsift_matcher(cache_dir: Path, masks: str | None, named: bool = True) -> LocalMatcher:
    """RootSIFT with its on-disk cache, keypoints inside `masks` (a mask source) when given, else whole-frame.
    `named=False` leaves the source unnamed, so features are keyed by each mask's own hash: finding them
    means decoding the image and making its mask (how every masked lookup went before 2026-11-25)."""
    from spotmatch.global_embed.embed import mask_provider

    provider = mask_provider(masks, str(cache_dir)) if masks else None
    return LocalMatcher.from_name("rootsift", cache_dir=cache_dir, workers=torch.get_num_threads(),
                                  mask_source=provider.mask_for if provider else None,
                                  mask_name=provider.name if provider and named else None)


def cached_rootsift_rows(pairs: pd.DataFrame, cache_dir: Path, masks: str | None, named: bool = True) -> tuple[str, ...]:
    """Table rows: verified pairs/s with every feature on disk (a fresh matcher: nothing in memory yet),
    and the one-off extraction that filled the cache (not for `named=False`, which finds the masks made)."""
    images = pd.unique(pairs.values.ravel())
    start = time.perf_counter()
    rootsift_matcher(cache_dir, masks, named).features_many(images)
    extract_s = time.perf_counter() - start
    fresh = rootsift_matcher(cache_dir, masks, named)
    start = time.perf_counter()
    fresh.score_pairs(pairs)
    rate = len(pairs) / (time.perf_counter() - start)
    counter = rootsift_matcher(cache_dir, masks)  # after the timing, so that it measured reads from disk
    keypoints = np.mean([len(counter.features(p).keypoints) for p in images])
    where = f"inside {masks} masks" if masks else "whole frame"
    if not named:
        where += ", each lookup decoding the image and hashing its mask (before 2026-11-25)"
    rate_row = (f"| spotmatch rootsift, {where} ({keypoints:.0f} keypoints/image), features from disk cache,"
                f" {fresh.workers} threads | {len(pairs)} | {rate:.1f} |")
    if not named:
        return (rate_row,)
    return (rate_row, f"| (one-off extraction of the {len(images)} images into the cache, {where}{', masks made too' if masks else ''})"
                      f" | | {len(images) / extract_s:.1f} images/s |")


def throughput_table(table: pd.DataFrame, cache_dir: Path, n_pairs: int, n_naive: int, masks: str | None) -> str:
    """Naive loops against spotmatch on cached features, whole-frame and (with `masks`) inside the animal."""
    rng = np.random.default_rng(0)
    paths = table["path"].to_numpy()
    picks = rng.integers(0, len(paths), size=(n_pairs, 2))
    pairs = pd.DataFrame({"query_image_path": paths[picks[:, 0]], "gallery_image_path": paths[picks[:, 1]]})
    settings = [(None, True), *([(masks, True), (masks, False)] if masks else [])]
    spotmatch_rows = [row for source, named in settings for row in cached_rootsift_rows(pairs, cache_dir, source, named)]
    start = time.perf_counter()
    for a, b in pairs.values[:n_naive]:
        naive_pair(a, b)
    naive_rate = n_naive / (time.perf_counter() - start)
    naive_features = {p: plain_sift(p) for p in pd.unique(pairs.values[:n_naive].ravel())}
    start = time.perf_counter()
    for a, b in pairs.values[:n_naive]:
        naive_match(naive_features[a], naive_features[b])
    naive_cached_rate = n_naive / (time.perf_counter() - start)
    whole_kp = np.mean([len(f[0]) for f in naive_features.values()])
    return "\n".join(
        [
            "| pipeline | pairs | verified pairs/s |",
            "|---|---:|---:|",
            f"| naive loop: decode + whole-frame full-size SIFT + ratio + MAGSAC per pair, 1 thread | {n_naive} | {naive_rate:.1f} |",
            f"| naive loop on precomputed whole-frame SIFT ({whole_kp:.0f} keypoints/image), BFMatcher, 1 thread | {n_naive} | {naive_cached_rate:.1f} |",
            *spotmatch_rows,
        ]
    )


def local_similarity(local: LocalMatcher, table: pd.DataFrame, protocol, column: str) -> np.ndarray:
    """(queries, gallery) local score for every protocol pair."""
    q, g = protocol.query_rows, protocol.gallery_rows
    grid_q, grid_g = np.meshgrid(q, g, indexing="ij")
    pairs = pd.DataFrame({"query_image_path": table["path"].to_numpy()[grid_q.ravel()], "gallery_image_path": table["path"].to_numpy()[grid_g.ravel()]})
    evidence = local.score_pairs(pairs)
    return evidence[column].to_numpy(dtype=np.float64).reshape(len(q), len(g))


def global_similarity(table: pd.DataFrame, protocol, checkpoint: str | None, device: str) -> tuple[np.ndarray, str]:
    from spotmatch.global_embed.embed import EmbedConfig, Embedder
    from spotmatch.global_embed.model import EmbedderConfig

    # num_workers=0: DataLoader worker processes forked after this process has run thread pools can deadlock.
    run = EmbedConfig(device=device, progress=False, num_workers=0)
    if checkpoint:
        embedder, label = Embedder.from_checkpoint(checkpoint, run=run), f"global ({Path(checkpoint).name})"
    else:
        embedder, label = Embedder.pretrained_baseline(EmbedderConfig(), run=run), "global (ImageNet EfficientNet-Lite2 + GeM, untrained)"
    embeddings = embedder.embed(list(table["path"]))
    return embeddings[protocol.query_rows] @ embeddings[protocol.gallery_rows].T, label


def ranking_section(dataset_dir: Path, cache_dir: Path, checkpoint: str | None, device: str) -> str:
    dataset = load_dataset(dataset_dir / "labels.csv")
    # The checkpoint's own split where it has one: a fresh split of a smaller table would query its training photos.
    split, split_by, _ = split_for(dataset, SplitConfig(by="encounter"), checkpoint)
    table = dataset.table
    protocol = build_protocol(table, split, split_by)
    identities = table["identity"].to_numpy()
    try:
        cosine, label = global_similarity(table, protocol, checkpoint, device)
        results_note = ""
    except Exception as exc:  # the global stage is optional here: report why it is missing, keep the local rows
        cosine, results_note = None, f"\n\nGlobal ranking not run: {type(exc).__name__}: {exc}"
    local = LocalMatcher.from_name("rootsift", cache_dir=cache_dir, workers=torch.get_num_threads())
    start = time.perf_counter()
    inliers = local_similarity(local, table, protocol, "inliers")
    elapsed = time.perf_counter() - start
    results = {"local only (rootsift inliers)": evaluate_protocol(inliers, identities, protocol)}
    # The same with a fixed camera's static scene kept as evidence: what dropping it costs and gains.
    keeping_static = LocalMatcher.from_name("rootsift", cache_dir=cache_dir, workers=torch.get_num_threads(),
                                            matcher_conf={"verification": VerificationConf(min_displacement=0.0)})
    results["local only, static matches kept (min_displacement 0)"] = evaluate_protocol(
        local_similarity(keeping_static, table, protocol, "inliers"), identities, protocol)
    if cosine is not None:
        results[label] = evaluate_protocol(cosine, identities, protocol)
        # Simple re-ranking: global order, with strong local evidence moving a candidate up.
        results["global + local (cosine + inliers/100)"] = evaluate_protocol(cosine + inliers / 100.0, identities, protocol)
    n_pairs = inliers.size
    return (
        f"Protocol: {protocol.kind}; {len(protocol.query_rows)} queries, {len(protocol.gallery_rows)} gallery images, "
        f"{n_pairs} pairs matched in {elapsed:.0f} s ({n_pairs / elapsed:.0f} pairs/s incl. extraction).\n\n"
        + format_table(results)
        + results_note
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--speed-images", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--naive-pairs", type=int, default=40)
    parser.add_argument("--skip-learned", action="store_true")
    parser.add_argument("--skip-ranking", action="store_true")
    parser.add_argument("--checkpoint", default=None, help="trained global model for the global-only rows")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache (default: a fresh temporary folder)")
    parser.add_argument("--masks", default=None, help="mask source for the throughput rows (teacher, unet:CKPT, alpha);"
                                                      " default: whole-frame features")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for torch, OpenCV and the pools")
    # Not docs/local_match.md: that file carries notes added by hand, which a run would replace.
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "local_match.md")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="bench_local_"))
    table = load_dataset(args.dataset / "labels.csv").table
    names = ["rootsift"] if args.skip_learned else list(EXTRACTORS)
    sample = table["path"].sample(args.speed_images, random_state=0).tolist()
    sections = [
        "# Local matching benchmark",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  \nData: {args.dataset.name} "
        f"({len(table)} unambiguous images, full camera-trap frames, no animal masks)  \nMachine: {machine()}, {args.threads} threads (other jobs on the machine only slow it: timings are upper bounds on cost)  \n"
        "Settings: each extractor's default config (name below: keypoint cap n, long-side cap r, config hash); "
        "camera-trap text bars masked out; matches that moved less than 1% of the long side dropped (static scene); "
        "homography by MAGSAC++, threshold 1% of the long side, at least 8 matches.",
        f"## Speed per extractor ({args.speed_images} random images, {args.speed_images - 1} consecutive pairs)",
        speed_table(sample, args.device, names),
        "## RootSIFT throughput on random pairs",
        throughput_table(table, cache, args.pairs, args.naive_pairs, args.masks),
    ]
    if not args.skip_ranking:
        sections += ["## Ranking: local only vs global only (split by encounter)", ranking_section(args.dataset, cache, args.checkpoint, args.device)]
    report = "\n\n".join(sections) + "\n"
    print(report)
    write_text_atomic(report, args.out)


if __name__ == "__main__":
    main()
