"""The README's main job: train small on snow leopards, calibrate the fusion, score a competition-format pair file
through the whole engine, print IB-mAP of each stage."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.data.splits import SplitConfig
from spotmatch.data.tables import load_dataset, load_pairs
from spotmatch.engine import calibrate as calibration
from spotmatch.engine.engine import DEFAULT_SHORTLIST_K, Engine, EngineConfig
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


@dataclass
class DemoResult:
    """The global embedding before and after training on the held-out pairs of test.csv; then the whole engine
    on the same held-out queries, from its calibration run (fused probabilities cross-validated over query
    animals: each query's from a calibrator that never saw its animal)."""

    global_embedding: dict[str, dict]
    engine: dict[str, dict]
    comparisons: dict
    submission: Path
    calibration_report: Path


def main(data_csv: Path, out_dir: Path, preset: str = "demo", device: str = "auto") -> DemoResult:
    if not Path(data_csv).is_file():
        raise SpotmatchError(f"{data_csv}: demo data not found; pass --data to a labels CSV (the default lives in ../shared)")
    out_dir = Path(out_dir)
    dataset = load_dataset(data_csv)
    chosen = PRESETS[preset]
    split_conf = SplitConfig(by="encounter" if "encounter" in dataset.table.columns else "identity")
    train_conf = dataclasses.replace(chosen.train, device=device)
    # The demo's folder is its own: running it again trains again.
    checkpoint = training.main(dataset, chosen.embedder, train_conf, split_conf, out_dir, overwrite=True)

    split = pd.Series(pd.read_csv(out_dir / "split.csv")["split"].to_numpy(), index=dataset.table.index)
    # The same split as labelled tables, e.g. to start a catalogue with the known photos (README).
    labelled = dataset.table.drop(columns="path")
    write_csv_atomic(labelled[split.to_numpy() == "train"], out_dir / "gallery.csv")
    write_csv_atomic(labelled[split.to_numpy() == "val"], out_dir / "queries.csv")
    pairs_csv = write_competition_pairs(dataset.table, split, split_conf.by, out_dir / "test.csv")
    pairs = load_pairs(pairs_csv, dataset.image_dir)
    identity_of = dict(zip(dataset.table["filename"], dataset.table["identity"]))
    run = EmbedConfig(device=device, cache_dir=str(out_dir / "cache"))
    trained = Embedder.from_checkpoint(checkpoint, run)
    global_embedding = {}
    for name, embedder in (
        (f"{chosen.embedder.backbone} untrained (ImageNet)", Embedder.pretrained_baseline(chosen.embedder, run)),
        (f"{chosen.embedder.backbone} trained ({checkpoint})", trained),
    ):
        similarity = cosine_to_similarity(global_pair_scores(pairs, embedder)["cosine"].to_numpy())
        global_embedding[name] = {"all": pair_metrics(pairs, similarity, identity_of)}

    # The hybrid chain: fit the fusion on the held-out queries (cross-validated figures), then score test.csv with it.
    engine_conf = EngineConfig(cache_dir=run.cache_dir)
    calibration_conf = calibration.CalibrateConfig(rerankers=())
    calibrated = calibration.main(dataset, split, split_conf.by, trained, engine_conf, calibration_conf, out_dir)
    calibration.write_report(calibrated, f"data: {data_csv} ({len(dataset)} images); the split of {checkpoint}; local: rootsift,"
                                         f" top-{DEFAULT_SHORTLIST_K}, masks: as the checkpoint; {calibration_conf.describe()}", out_dir)
    engine = Engine.from_embedder(trained, calibrated["fusion_path"], engine_conf)
    scored = engine.score_pairs(pairs)
    submission = write_submission(scored["row_id"], scored["similarity"].to_numpy(), out_dir / "submission.csv")
    stages = [name for name in calibrated["retrieval"] if name in ("global only", "fused") or name.startswith("local only")]
    return DemoResult(global_embedding, {name: calibrated["retrieval"][name] for name in stages},
                      {pair: diff for pair, diff in calibrated["comparisons"].items() if pair[0] == "fused"},
                      submission, out_dir / "calibration.md")
