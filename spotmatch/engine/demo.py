"""The README's main job: train small on snow leopards, calibrate the fusion, score a competition-format pair file
through the whole engine, print IB-mAP of each stage."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.data.splits import SplitConfig, split_dataset
from spotmatch.data.tables import load_dataset, load_pairs
from spotmatch.engine import calibrate as calibration
from spotmatch.engine.engine import Engine, EngineConfig
from spotmatch.engine.scoring import cosine_to_similarity, global_pair_scores, write_submission
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.pairs import pair_metrics
from spotmatch.evaluation.protocol import build_protocol, refuse_trivial_protocol
from spotmatch.global_embed import train as training
from spotmatch.global_embed.embed import EmbedConfig, Embedder
from spotmatch.global_embed.presets import PRESETS
from spotmatch.io import write_csv_atomic

DEMO_DATA = Path("shared") / "datasets" / "snowleopard" / "labels.csv"


def default_data() -> Path:
    """The snow-leopard set in `../shared` beside the working folder (the README runs the demo from the
    repository), else beside the source tree (a checkout run from elsewhere); the first when neither has it."""
    candidates = [Path.cwd().parent / DEMO_DATA, Path(__file__).resolve().parents[2].parent / DEMO_DATA]
    return next((candidate for candidate in candidates if candidate.is_file()), candidates[0])


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


# Written first into a folder the demo makes: only such a folder is ever cleared and trained over again.
DEMO_MARKER = ".spotmatch-demo"
# Its own outputs besides the run's (which `train --overwrite` clears): cleared first, so that an interrupted
# demo never leaves a new model beside the last one's submission.
DEMO_OUTPUTS = ("split.csv", "gallery.csv", "queries.csv", "test.csv", "submission.csv")


def claim_out_dir(out_dir: Path) -> None:
    """The demo trains over its own earlier run in `out_dir`, and nothing else: a folder holding other files
    (a `train` run, say) is refused."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpotmatchError(f"--out {out_dir}: is a file, not a folder; name a folder for the demo's run")
    made_by_demo = (out_dir / DEMO_MARKER).exists() or all((out_dir / name).exists() for name in ("test.csv", "queries.csv"))  # or before the marker
    if out_dir.is_dir() and any(out_dir.iterdir()) and not made_by_demo:
        raise SpotmatchError(f"--out {out_dir}: holds files the demo did not make (a training run?); the demo would train over"
                             f" them: choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DEMO_MARKER).touch()
    for name in DEMO_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)


def refuse_unusable_demo_data(dataset, split_conf: SplitConfig, data_csv: Path) -> None:
    """Before any training: the demo scores held-out photos against the photos of their animals it trained on."""
    protocol = build_protocol(dataset.table, split_dataset(dataset, split_conf), split_conf.by)
    if len(protocol.query_rows) == 0:
        raise SpotmatchError(f"{data_csv}: no held-out photo (split by {split_conf.by}) has a photo of its animal left to train on,"
                             f" so the demo has nothing to find; use a labels CSV whose animals have several photos"
                             f"{' in several encounters' if split_conf.by == 'encounter' else ''}")
    refuse_trivial_protocol(protocol, dataset.table["identity"].to_numpy(), data_csv, "use a labels CSV with more animals")


def main(data_csv: Path, out_dir: Path, preset: str = "demo", device: str = "auto") -> DemoResult:
    if not Path(data_csv).is_file():
        raise SpotmatchError(f"{data_csv}: demo data not found; pass --data LABELS.csv (columns filename, identity; the photos"
                             f" in images/ beside it), or run the demo from a folder with ../{DEMO_DATA} beside it")
    if preset not in PRESETS:
        raise SpotmatchError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    dataset = load_dataset(data_csv)
    chosen = PRESETS[preset]
    split_conf = SplitConfig(by="encounter" if "encounter" in dataset.table.columns else "identity")
    train_conf = dataclasses.replace(chosen.train, device=device)
    training.refuse_unusable_data(dataset, (), train_conf, split_conf)
    refuse_unusable_demo_data(dataset, split_conf, data_csv)
    claim_out_dir(out_dir)
    calibration.check_outputs(out_dir, [data_csv])  # a folder in an output's place: refused before training, not after
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
        (f"{chosen.embedder.backbone} untrained ({'ImageNet' if chosen.embedder.pretrained != 'none' else 'random weights'})",
         Embedder.pretrained_baseline(chosen.embedder, run)),
        (f"{chosen.embedder.backbone} trained ({checkpoint})", trained),
    ):
        similarity = cosine_to_similarity(global_pair_scores(pairs, embedder)["cosine"].to_numpy())
        global_embedding[name] = {"all": pair_metrics(pairs, similarity, identity_of)}

    # The hybrid chain: fit the fusion on the held-out queries (cross-validated figures), then score test.csv with it.
    engine_conf = EngineConfig(cache_dir=run.cache_dir)
    calibration_conf = calibration.CalibrateConfig(rerankers=())
    calibrated = calibration.main(dataset, split, split_conf.by, trained, engine_conf, calibration_conf, out_dir,
                                  split_origin=f"the split of {checkpoint}")
    engine = Engine.from_embedder(trained, calibrated["fusion_path"], engine_conf)
    scored = engine.score_pairs(pairs)
    submission = write_submission(scored["row_id"], scored["similarity"].to_numpy(), out_dir / "submission.csv")
    stages = [name for name in calibrated["retrieval"] if name in ("global only", "fused") or name.startswith("local only")]
    return DemoResult(global_embedding, {name: calibrated["retrieval"][name] for name in stages},
                      {pair: diff for pair, diff in calibrated["comparisons"].items() if pair[0] == "fused"},
                      submission, out_dir / "calibration.md")
