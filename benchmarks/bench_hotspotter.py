"""HotSpotter's way of scoring keypoints against ours, on a checkpoint's held-out split.

HotSpotter (Crall et al. 2013), the classic for spotted cats, matches each query descriptor against
the descriptors of the *whole gallery* at once and scores a gallery image by LNBNN (local naive-Bayes
nearest neighbour): every query descriptor votes for the images among its K nearest gallery
descriptors, with weight d(K+1-th neighbour) - d(neighbour), so a descriptor that many gallery photos
share (fur texture, ground, rock) votes little and a distinctive one much. Ours matches each pair on
its own (mutual nearest neighbours with Lowe's ratio test). Both then verify geometrically the same
way (spotmatch's `verify`: static-scene filter, MAGSAC++), and a pair's local score is the sum of its
inliers' weights.

For each query's global top-K this prints and writes IB-mAP per view of local only (the shortlist
re-ranked by the local score, the rest in the cosine's order) and of the fusion (calibrators
cross-validated over query animals, as in `spotmatch calibrate`) with either scoring, and each
difference with its 95 % interval over the query animals:

    .venv/bin/python benchmarks/bench_hotspotter.py --data ../shared/datasets/snowleopard/labels.csv \\
        --checkpoint runs/snow-cpu/best.pt --out docs/results/hotspotter-snow.md

Not HotSpotter itself: RootSIFT on spotmatch's keypoints (DoG, capped, inside the mask where there is
one) rather than Hessian-affine ones, an exact search rather than FLANN's approximate one, and our
verification.
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from spotmatch.cli.global_cmds import _embed_config
from spotmatch.data.splits import SplitConfig
from spotmatch.data.tables import load_dataset
from spotmatch.engine import calibrate as calibration
from spotmatch.engine.engine import EngineConfig, build_local
from spotmatch.evaluation.protocol import build_protocol, compare_models, evaluate_protocol, format_comparisons, format_table
from spotmatch.evaluation.run import split_for
from spotmatch.global_embed.embed import Embedder
from spotmatch.io import write_text_atomic
from spotmatch.local_match.features import Features, same_pixels
from spotmatch.local_match.matchers import VerificationConf, verify


@dataclass(frozen=True)
class LNBNNConf:
    knn: int = 4  # HotSpotter's K: each query descriptor votes for the images among its K nearest gallery descriptors
    verification: VerificationConf = VerificationConf()


class GalleryDescriptors:
    """Every gallery image's RootSIFT descriptors in one matrix (unit vectors), searched exactly."""

    chunk = 256  # query descriptors per product: bounds memory at chunk x (all gallery descriptors) floats

    def __init__(self, features: list[Features]):
        counts = [len(f) for f in features]
        self.features = features
        self.start = np.concatenate([[0], np.cumsum(counts)])
        self.owner = np.repeat(np.arange(len(features)), counts)
        self.descriptors = torch.from_numpy(np.concatenate([f.descriptors for f in features]).astype(np.float32))

    def nearest(self, descriptors: np.ndarray, k: int, exclude: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine and index of each descriptor's k nearest gallery descriptors, none of image `exclude`.
        (FAISS's flat index with an ID selector can leave an image out too, but it was far slower here.)"""
        similarity, nearest = [], []
        for start in range(0, len(descriptors), self.chunk):
            product = torch.from_numpy(descriptors[start:start + self.chunk]) @ self.descriptors.T
            if exclude is not None:
                product[:, self.start[exclude]:self.start[exclude + 1]] = -np.inf
            best, index = product.topk(k, dim=1)
            similarity.append(best.numpy())
            nearest.append(index.numpy())
        return np.concatenate(similarity), np.concatenate(nearest)

    def lnbnn(self, query: Features, candidates: np.ndarray, conf: LNBNNConf, exclude: int | None = None) -> dict[int, tuple]:
        """Evidence row (matches, inliers, inlier ratio, score) for each candidate gallery position; `exclude`:
        a gallery position whose descriptors are left out of the search (the query itself, in an open set)."""
        similarity, nearest = self.nearest(query.descriptors.astype(np.float32), conf.knn + 1, exclude)
        distance = np.sqrt(np.clip(2.0 - 2.0 * similarity, 0.0, None))
        weight = distance[:, -1:] - distance[:, :-1]
        nearest = nearest[:, :-1]
        voter = self.owner[nearest]
        rows = {}
        for g in candidates:
            query_index, slot = np.nonzero(voter == g)
            # one vote per query descriptor and image: its nearest descriptor there (slots run nearest first)
            query_index, first = np.unique(query_index, return_index=True)
            slot = slot[first]
            gallery_features = self.features[g]
            gallery_index = nearest[query_index, slot] - self.start[g]
            evidence = verify(query.keypoints[query_index], gallery_features.keypoints[gallery_index],
                              weight[query_index, slot].astype(np.float32), conf.verification,
                              (max(query.image_size), max(gallery_features.image_size)), keypoints=(query.keypoints, gallery_features.keypoints),
                              one_picture=same_pixels(query, gallery_features))
            rows[g] = (evidence.matches, evidence.inliers, evidence.inlier_ratio, evidence.score)
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="labels CSV (its images/ folder beside it)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="embedder checkpoint: its split picks the queries, its cosine the shortlist")
    parser.add_argument("--top-k", type=int, default=20, help="gallery photos per query re-scored by each local scorer")
    parser.add_argument("--knn", type=int, default=LNBNNConf.knn, help="LNBNN: nearest gallery descriptors per query descriptor")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/spotmatch"), help="embedding and keypoint cache folder")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/hotspotter.md"), help="Markdown table to write")
    args = parser.parse_args()
    started = time.perf_counter()

    dataset = load_dataset(args.data, None, drop_ambiguous=True)
    split, split_by, origin = split_for(dataset, SplitConfig(), args.checkpoint)
    protocol = build_protocol(dataset.table, split, split_by)
    identities, paths = dataset.table["identity"].to_numpy(), np.array([str(p) for p in dataset.paths])
    query_ids, gallery_ids = identities[protocol.query_rows], identities[protocol.gallery_rows]
    embedder = Embedder.from_checkpoint(args.checkpoint, _embed_config(32, "auto", False, 2, args.cache_dir))
    rows = np.union1d(protocol.query_rows, protocol.gallery_rows)  # an open set's queries are its gallery: embed once
    embeddings = dict(zip(rows, embedder.embed(list(paths[rows]))))
    allowed = protocol.views["all"]
    cosine = np.stack([embeddings[r] for r in protocol.query_rows]) @ np.stack([embeddings[r] for r in protocol.gallery_rows]).T
    ranks = calibration.ranks_within(cosine, allowed)
    shortlisted_qg = (ranks < args.top_k) & allowed

    scorer = build_local(EngineConfig(shortlist_k=args.top_k, cache_dir=str(args.cache_dir)), embedder.conf.masks)
    pairwise = calibration.local_evidence(scorer, paths, protocol, set(zip(*np.nonzero(shortlisted_qg))))
    features = scorer.features_many(paths[rows])
    gallery = GalleryDescriptors([features[p] for p in paths[protocol.gallery_rows]])
    gallery_position = {row: position for position, row in enumerate(protocol.gallery_rows)}
    conf = LNBNNConf(knn=args.knn, verification=scorer.matcher.conf.verification)
    lnbnn = {}
    for q, row in enumerate(protocol.query_rows):
        found = gallery.lnbnn(features[paths[row]], np.flatnonzero(shortlisted_qg[q]), conf, exclude=gallery_position.get(row))
        lnbnn.update({(q, g): evidence for g, evidence in found.items()})

    fit = calibration.CalibrateConfig(rerankers=())
    rankings = {"global only": {"frame": None, "scores": cosine}}
    scorings = {"pairwise (mutual NN + ratio)": pairwise, f"LNBNN (K = {args.knn}, whole gallery)": lnbnn}
    for name, evidence in scorings.items():
        frame = calibration.pair_frame(cosine, ranks, allowed, args.top_k, evidence, query_ids, gallery_ids)
        shortlisted = (frame["global_rank"] < args.top_k).to_numpy()
        rankings[f"local only, {name}"] = {"frame": frame, "scores": calibration.local_only_order(frame, shortlisted)}
        rankings[f"fused, {name}"] = {"frame": frame, "scores": calibration.cross_validated_probability(frame, fit)}
    results = {}
    for name, ranking in rankings.items():
        scores = ranking["scores"] if ranking["frame"] is None else calibration.as_matrix(ranking["frame"], ranking["scores"], allowed.shape)
        results[name] = evaluate_protocol(np.where(allowed, scores, -np.inf), identities, protocol)
    ours, theirs = scorings
    comparisons = compare_models(results, [(f"{stage}, {theirs}", f"{stage}, {ours}") for stage in ("local only", "fused")])
    report = "\n\n".join([
        f"data: {args.data} ({len(dataset)} images); {origin}; {protocol.kind}; RootSIFT on each query's top-{args.top_k}, "
        f"settings {scorer.conf_name}; {time.perf_counter() - started:.0f} s, {platform.machine()}, {torch.get_num_threads()} threads",
        format_table(results), format_comparisons(comparisons)])
    write_text_atomic(report + "\n", args.out)
    print(report)


if __name__ == "__main__":
    main()
