"""How often `catalogue identify` names held-out photos right, wrong, or "new individual": a catalogue
built from a labelled gallery, then every held-out photo identified three ways, for each shortlist
setting (`--per-individual`):

- all: the whole catalogue;
- cross-station: only catalogue photos from other stations than the query's (the honest view at fixed
  cameras: the background cannot help), for the photos whose animal has some there;
- animal missing: every individual but the photo's own, so a name is always wrong and "new individual"
  is the right answer.

    .venv/bin/python benchmarks/bench_identify.py --checkpoint runs/demo/best.pt --fusion runs/demo/fusion.json \\
        --gallery runs/demo/gallery.csv --queries runs/demo/queries.csv --images ../shared/datasets/snowleopard/images

(`spotmatch demo` writes the checkpoint and the two tables; `spotmatch calibrate` the fusion file.)
"""
from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import pandas as pd

from spotmatch.catalogue.service import IdentifyConfig, add_images, identify, init_catalogue, open_engine, sources_from_csv
from spotmatch.catalogue.store import GalleryRestriction
from spotmatch.io import write_text_atomic

ALL_CANDIDATES = 1000  # top_k: every shortlisted individual, to see whether the photo's own animal was among them


def outcome(result, identity: str) -> dict:
    named = result.named is not None
    best = result.candidates[0].individual if result.candidates else None
    # By the decision score, not the verdict's words: a restricted search words both "no match in this gallery".
    called_new = not named and (result.decision_score is None or result.decision_score < result.new_below)
    return {"individuals": len(result.candidates), "in_shortlist": identity in {c.individual for c in result.candidates}, "top1": best == identity,
            "named_right": named and best == identity, "named_wrong": named and best != identity,
            "not_sure": not named and not called_new, "called_new": called_new}


def evaluate(store, engine, queries: pd.DataFrame, photos: list[Path], per_individual: int | None) -> dict[str, pd.DataFrame]:
    gallery = store.images_table()
    stations, individuals = set(gallery["station"].dropna()), set(gallery["individual"].dropna())
    conf = IdentifyConfig(top_k=ALL_CANDIDATES, per_individual=per_individual)
    views = {"all": [outcome(r, i) for r, i in zip(identify(store, engine, photos, conf), queries["identity"])]}
    cross, missing = [], []
    for photo, row in zip(photos, queries.to_dict("records")):
        elsewhere = gallery[(gallery["station"] != row["station"]) & (gallery["individual"] == row["identity"])]
        if len(elsewhere):
            restriction = GalleryRestriction(stations=tuple(sorted(stations - {row["station"]})))
            cross.append(outcome(identify(store, engine, [photo], IdentifyConfig(ALL_CANDIDATES, None, restriction, per_individual))[0],
                                 row["identity"]))
        restriction = GalleryRestriction(individuals=tuple(sorted(individuals - {row["identity"]})))
        missing.append(outcome(identify(store, engine, [photo], IdentifyConfig(ALL_CANDIDATES, None, restriction, per_individual))[0],
                               row["identity"]))
    views["cross-station"], views["animal missing"] = cross, missing
    return {view: pd.DataFrame(rows) for view, rows in views.items()}


def table(results: dict[str, dict[str, pd.DataFrame]]) -> str:
    lines = ["| per individual | view | photos | individuals in shortlist | animal in shortlist | top-1 right | named right |"
             " named wrong | not sure | called new |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting, views in results.items():
        for view, frame in views.items():
            if frame.empty:  # no held-out photo has its animal photographed at another station, say
                lines.append(f"| {setting} | {view} | 0 | | | | | | | |")
                continue
            share = lambda column: "" if view == "animal missing" and column in ("in_shortlist", "top1", "named_right") \
                else f"{frame[column].mean():.1%}"  # noqa: E731  (no right answer among a missing animal's candidates)
            lines.append(f"| {setting} | {view} | {len(frame)} | {frame['individuals'].mean():.1f} | {share('in_shortlist')} |"
                         f" {share('top1')} | {share('named_right')} |"
                         f" {frame['named_wrong'].mean():.1%} | {frame['not_sure'].mean():.1%} | {frame['called_new'].mean():.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the catalogue's embedder")
    parser.add_argument("--fusion", required=True, help="its calibration file (threshold and shortlist)")
    parser.add_argument("--gallery", required=True, help="labelled CSV the catalogue is built from")
    parser.add_argument("--queries", required=True, help="labelled CSV of held-out photos (identity, station)")
    parser.add_argument("--images", required=True, help="folder holding both tables' photos")
    parser.add_argument("--per-individual", nargs="+", default=["none", "2"], help="settings compared ('none': no limit)")
    parser.add_argument("--shortlist-k", type=int, default=None, help="default: the calibration file's")
    parser.add_argument("--work", default="/tmp/bench_identify", help="scratch folder (replaced) for the catalogue")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()

    queries = pd.read_csv(args.queries, dtype=str, keep_default_na=False)
    missing = [column for column in ("filename", "identity", "station") if column not in queries.columns]
    if missing:  # before the catalogue is built: the views need each photo's animal and station
        parser.error(f"{args.queries}: no {', '.join(missing)} column; the held-out table needs filename, identity and station")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    store = init_catalogue(work / "cat", Path(args.checkpoint), Path(args.fusion))
    engine = open_engine(store, args.shortlist_k)
    report = add_images(store, engine.embedder, engine.local, sources_from_csv(Path(args.gallery), Path(args.images)))
    photos = [Path(args.images) / name for name in queries["filename"]]
    started = time.perf_counter()
    results = {setting: evaluate(store, engine, queries, photos, None if setting == "none" else int(setting))
               for setting in args.per_individual}
    text = "\n".join([
        f"catalogue: {report.added} photos of {store.stats()['individuals']} individuals from {args.gallery}; "
        f"held-out photos: {len(queries)} from {args.queries}",
        f"model: {args.checkpoint}, fusion: {args.fusion} (threshold {engine.fusion.threshold:.3f}), shortlist {engine.conf.shortlist_k}; "
        f"{platform.machine()}, {time.perf_counter() - started:.0f} s", "", table(results)])
    print(text)
    if args.out:
        write_text_atomic(text + "\n", args.out)


if __name__ == "__main__":
    main()
