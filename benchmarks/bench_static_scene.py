"""What a fixed camera's static scene does to keypoint evidence, with and without dropping the matches
that stayed put (`VerificationConf.min_displacement`).

Pairs of snow-leopard frames drawn at random (seeded): per camera (station + camera) up to --per-camera
pairs from different encounters, --cross pairs whose two frames come from different stations, and
--burst pairs from one encounter (one burst). For each kind, same cat against different cats: RootSIFT
inliers (mean, median, 90th percentile, max), the pair ROC-AUC of the inlier count, for each
--displacement setting, and the largest share of the keypoints both images show that stayed put (what
`VerificationConf.same_picture_share` is compared with).

    .venv/bin/python benchmarks/bench_static_scene.py [--per-camera 40] [--cross 300] [--burst 200] [--displacement 0 0.01 0.02]
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from spotmatch.data.tables import load_dataset
from spotmatch.io import write_text_atomic
from spotmatch.local_match import LocalMatcher, VerificationConf
from spotmatch.local_match.features import ONE_PICTURE_CELL_DIFFERENCE, cell_difference
from spotmatch.local_match.matchers import one_picture_share

REPO = Path(__file__).resolve().parents[1]
SNOW = REPO.parent / "shared" / "datasets" / "snowleopard"


def sample_pairs(table: pd.DataFrame, per_camera: int, cross: int, burst: int, seed: int) -> pd.DataFrame:
    """Distinct frame pairs: from different encounters within each camera (up to `per_camera` draws each),
    about `cross` across stations, and up to `burst` within one encounter."""
    rng = np.random.default_rng(seed)
    camera = table["station"].astype(str) + " camera " + table["camera"].astype(str)
    pairs = []
    for _, frames in table.groupby(camera):
        if frames["encounter"].nunique() < 2:
            continue
        for _ in range(per_camera):
            a, b = frames.iloc[rng.choice(len(frames), 2, replace=False)].itertuples()
            if a.encounter != b.encounter:
                pairs.append((a.path, b.path, a.identity == b.identity, "same camera"))
    while sum(kind == "different stations" for *_, kind in pairs) < cross:
        a, b = table.iloc[rng.choice(len(table), 2, replace=False)].itertuples()
        if a.station != b.station:
            pairs.append((a.path, b.path, a.identity == b.identity, "different stations"))
    within = [(a, b) for _, frames in table.groupby("encounter") for a, b in itertools.combinations(frames.itertuples(), 2)]
    for i in rng.permutation(len(within))[:burst]:
        a, b = within[i]
        pairs.append((a.path, b.path, a.identity == b.identity, "one burst (same encounter)"))
    frame = pd.DataFrame(pairs, columns=["query_image_path", "gallery_image_path", "same_cat", "kind"])
    unordered = frame[["query_image_path", "gallery_image_path"]].apply(lambda pair: tuple(sorted(pair)), axis=1)
    return frame[~unordered.duplicated()].reset_index(drop=True)  # a pair drawn twice counts once


def inlier_table(pairs: pd.DataFrame, inliers: dict[float, np.ndarray]) -> str:
    rows = ["| frames | cats | pairs | min displacement | mean inliers | median | 90th percentile | max | pair ROC-AUC of inliers |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (kind, same_cat), group in pairs.groupby(["kind", "same_cat"], sort=False):
        for displacement, counts in inliers.items():
            mine, both = counts[group.index], pairs["kind"] == kind
            auc = f"{roc_auc_score(pairs.loc[both, 'same_cat'], counts[both.to_numpy()]):.3f}" if pairs.loc[both, "same_cat"].nunique() == 2 else "n/a"
            rows.append(f"| {kind} | {'same' if same_cat else 'different'} | {len(group)} | {displacement:g} | {mine.mean():.1f} | "
                        f"{np.median(mine):.0f} | {np.quantile(mine, 0.9):.0f} | {mine.max()} | {auc} |")
    return "\n".join(rows)


def still_shares(pairs: pd.DataFrame, cache: Path) -> np.ndarray:
    """Per pair, the share of the keypoints both frames show whose matches stayed put (`one_picture_share`, what
    `VerificationConf.same_picture_share` is compared with), for every pair, however few stayed put."""
    local = LocalMatcher.from_name("rootsift", cache_dir=cache)
    conf = VerificationConf()
    path_pairs = list(zip(pairs["query_image_path"], pairs["gallery_image_path"]))
    features = local.features_many(p for pair in path_pairs for p in pair)
    shares = []
    for a, b in path_pairs:
        index0, index1, _ = local.matcher.correspond(features[a], features[b])
        long_sides = (max(features[a].image_size), max(features[b].image_size))
        points0, points1 = features[a].keypoints[index0], features[b].keypoints[index1]
        still = np.linalg.norm(points1 - points0 * np.float32(long_sides[1] / long_sides[0]), axis=1) < conf.min_displacement * long_sides[1]
        shares.append(one_picture_share(points0[still], points1[still], features[a].keypoints, features[b].keypoints, long_sides,
                                        2 * conf.min_displacement * long_sides[1]))
    return np.array(shares)


def cell_differences(pairs: pd.DataFrame, cache: Path) -> np.ndarray:
    """Per pair, the largest grey-level difference over the grid cells both frames show (`cell_difference`, what
    `same_pixels` compares with ONE_PICTURE_CELL_DIFFERENCE); NaN where the two cannot be compared."""
    local = LocalMatcher.from_name("rootsift", cache_dir=cache)
    path_pairs = list(zip(pairs["query_image_path"], pairs["gallery_image_path"]))
    features = local.features_many(p for pair in path_pairs for p in pair)
    return np.array([np.nan if (d := cell_difference(features[a], features[b])) is None else d for a, b in path_pairs])


def copy_differences(paths: list[str], cache: Path, sides: tuple[int, ...] = (300, 512, 768)) -> np.ndarray:
    """`cell_difference` between each frame and its copies resized to `sides` pixels and saved as JPEG (quality 85)."""
    from PIL import Image

    local = LocalMatcher.from_name("rootsift", cache_dir=cache)
    differences = []
    with tempfile.TemporaryDirectory(prefix="spotmatch-copies-") as folder:
        for number, path in enumerate(paths):
            original = Image.open(path).convert("RGB")
            for side in sides:
                copy = Path(folder) / f"{number}-{side}.jpg"
                original.resize((side, round(side * original.height / original.width)), Image.LANCZOS).save(copy, quality=85)
                differences.append(cell_difference(local.features(path), local.features(copy)))
    return np.array(differences, dtype=float)


def per_kind_table(pairs: pd.DataFrame, column: str, headers: list[str], cells) -> str:
    """One row per kind of frame pair and cat pairing: `cells(values)` gives the row's figures for `column`."""
    rows = ["| frames | cats | pairs | " + " | ".join(headers) + " |", "|---|---|---:|" + "---:|" * len(headers)]
    for (kind, same_cat), group in pairs.groupby(["kind", "same_cat"], sort=False):
        rows.append(f"| {kind} | {'same' if same_cat else 'different'} | {len(group)} | " + " | ".join(cells(group[column])) + " |")
    return "\n".join(rows)


def difference_table(pairs: pd.DataFrame) -> str:
    return per_kind_table(pairs, "cell_difference", ["smallest", "1st percentile", "median", "one picture by pixels"],
                          lambda d: [f"{d.min():.3f}", f"{d.quantile(0.01):.3f}", f"{d.median():.3f}",
                                     str(int((d < ONE_PICTURE_CELL_DIFFERENCE).sum()))])


def share_table(pairs: pd.DataFrame) -> str:
    return per_kind_table(pairs, "still_share", ["median share", "99th percentile", "max"],
                          lambda share: [f"{share.median():.3f}", f"{share.quantile(0.99):.3f}", f"{share.max():.3f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=SNOW)
    parser.add_argument("--per-camera", type=int, default=40)
    parser.add_argument("--cross", type=int, default=300)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--displacement", type=float, nargs="+", default=[0.0, VerificationConf().min_displacement, 0.02])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "spotmatch", help="keypoint cache (the CLI's by default)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "static_scene.md")  # copied to docs by hand
    args = parser.parse_args()

    table = load_dataset(args.dataset / "labels.csv").table  # unambiguous identities only
    table["path"] = table["path"].astype(str)
    pairs = sample_pairs(table, args.per_camera, args.cross, args.burst, args.seed)
    inliers = {}
    for displacement in args.displacement:
        local = LocalMatcher.from_name("rootsift", cache_dir=args.cache,
                                       matcher_conf={"verification": VerificationConf(min_displacement=displacement)})
        inliers[displacement] = local.score_pairs(pairs)["inliers"].to_numpy()
    pairs["still_share"] = still_shares(pairs, args.cache)
    pairs["cell_difference"] = cell_differences(pairs, args.cache)
    copies = copy_differences(list(dict.fromkeys(pairs["query_image_path"]))[:30], args.cache)
    report = "\n\n".join([
        "# Static scene: keypoint evidence between frames of one fixed camera",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  \nData: {args.dataset.name} ({len(table)} unambiguous images, "
        f"whole frames, text bars masked), frame pairs drawn with seed {args.seed}  \nMachine: "
        f"{platform.machine()}, {os.cpu_count()} CPU cores  \nRootSIFT defaults (mutual NN, ratio 0.8, MAGSAC++ homography, "
        f"at least 8 matches); min displacement: tentative matches that moved less than this fraction of the long side are "
        f"dropped before verification.",
        inlier_table(pairs, inliers),
        "Largest share of the keypoints both frames show whose matches stayed put (at or above "
        f"`same_picture_share` = {VerificationConf().same_picture_share:g}, the pair counts as one picture and keeps them):",
        share_table(pairs),
        "Largest difference in mean grey (0-1) over the 16 x 16 grid cells both frames show (below "
        f"{ONE_PICTURE_CELL_DIFFERENCE:g}, the pair is one picture by its pixels and keeps them):",
        difference_table(pairs),
        f"The same for {len(copies)} copies (the first {len(copies) // 3} frames above, resized to 300, 512 and 768 px and saved"
        f" as JPEG): largest {copies.max():.3f}, median {np.median(copies):.3f}.",
    ])
    print(report)
    write_text_atomic(report + "\n", args.out)


if __name__ == "__main__":
    main()
