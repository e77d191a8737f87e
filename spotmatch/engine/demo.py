"""The README's main job: train small on snow leopards, score a competition-format pair file, print mAP."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.data.splits import SplitConfig
from spotmatch.data.tables import load_dataset, load_pairs
from spotmatch.engine.scoring import cosine_to_similarity, global_pair_scores, write_submission
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.pairs import pair_metrics
from spotmatch.evaluation.protocol import build_protocol
from spotmatch.global_embed import train as training
from spotmatch.global_embed.embed import EmbedConfig, Embedder
from spotmatch.global_embed.presets import PRESETS
from spotmatch.io import write_csv_atomic

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "snowleopard" / "labels.csv"


def write_competition_pairs(table: pd.DataFrame, split: pd.Series, split_by: str, out_path: Path) -> Path:
    """Kaggle-style test.csv over the held-out protocol: each validation query against the gallery."""
    protocol = build_protocol(table, split, split_by)
    query_rows, gallery_rows = np.nonzero(protocol.views["all"])
    filenames = table["filename"].to_numpy()
    pairs = pd.DataFrame({
        "row_id": np.arange(len(query_rows)),
        "query_image": filenames[protocol.query_rows[query_rows]],
        "gallery_image": filenames[protocol.gallery_rows[gallery_rows]],
    })
    return write_csv_atomic(pairs, out_path)


def main(data_csv: Path, out_dir: Path, preset: str = "demo", device: str = "auto") -> dict[str, dict]:
    if not Path(data_csv).is_file():
        raise SpotmatchError(f"{data_csv}: demo data not found; pass --data to a labels CSV (the default lives in ../shared)")
    out_dir = Path(out_dir)
    dataset = load_dataset(data_csv)
    chosen = PRESETS[preset]
    split_conf = SplitConfig(by="encounter" if "encounter" in dataset.table.columns else "identity")
    train_conf = dataclasses.replace(chosen.train, device=device)
    # The demo's folder is its own: running it again trains again.
    checkpoint = training.main(dataset, chosen.embedder, train_conf, split_conf, out_dir, overwrite=True)

    split = pd.read_csv(out_dir / "split.csv")["split"]
    # The same split as labelled tables, e.g. to start a catalogue with the known photos (README).
    labelled = dataset.table.drop(columns="path")
    write_csv_atomic(labelled[split.to_numpy() == "train"], out_dir / "gallery.csv")
    write_csv_atomic(labelled[split.to_numpy() == "val"], out_dir / "queries.csv")
    pairs_csv = write_competition_pairs(dataset.table, split, split_conf.by, out_dir / "test.csv")
    pairs = load_pairs(pairs_csv, dataset.image_dir)
    identity_of = dict(zip(dataset.table["filename"], dataset.table["identity"]))
    run = EmbedConfig(device=device, cache_dir=str(out_dir / "cache"))
    results = {}
    for name, embedder in (
        (f"{chosen.embedder.backbone} untrained (ImageNet)", Embedder.pretrained_baseline(chosen.embedder, run)),
        (f"{chosen.embedder.backbone} trained ({checkpoint})", Embedder.from_checkpoint(checkpoint, run)),
    ):
        similarity = cosine_to_similarity(global_pair_scores(pairs, embedder)["cosine"].to_numpy())
        results[name] = {"all": pair_metrics(pairs, similarity, identity_of)}
    write_submission(pairs["row_id"], similarity, out_dir / "submission.csv")
    return results
