"""`spotmatch evaluate`: the retrieval protocol over one or more models, as one markdown table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.data.splits import SplitConfig, split_dataset
from spotmatch.data.tables import Dataset, photo_name
from spotmatch.evaluation.protocol import build_protocol, embed_protocol, evaluate_protocol, refuse_trivial_protocol
from spotmatch.errors import SpotmatchError
from spotmatch.global_embed.checkpoint import read_checkpoint


@dataclass
class EvaluatedModel:
    name: str
    embed: Callable[[list[Path]], np.ndarray]  # paths -> (n, d) L2-normalised


def stored_for(filenames: pd.Series, stored: dict[str, str]) -> pd.Series:
    """What a checkpoint stored (`stored`: file name -> split part or label) for each of `filenames`: by the file
    name as written, else by the name without folders (`photo_name`) where that name belongs to one photo in
    both, so that `/data/X.JPG` finds the trained `X.JPG` but `Cat3/IMG_0001.JPG` never takes the part of
    `Cat1/IMG_0001.JPG`. NaN where nothing matches."""
    keys = pd.Series(list(stored), dtype=object)
    by_name = {photo_name(key): stored[key] for key in keys[~keys.map(photo_name).duplicated(keep=False)]}
    names = filenames.map(photo_name)
    return filenames.map(stored).combine_first(names.map(by_name).where(~names.duplicated(keep=False)))


def refuse_extra_training_set(dataset: Dataset, payload: dict, checkpoint: str | Path) -> None:
    """Every image of a set given to `train --extra-train` was trained on, so no split of it is held out. Caught by
    the CSV's path, or by its photos all being among that set's (a moved copy, or a part of it)."""
    for extra in payload.get("extra_training") or []:
        same_path = dataset.csv_path is not None and Path(extra["dataset"]).resolve() == Path(dataset.csv_path).resolve()
        if same_path or stored_for(dataset.table["filename"], dict.fromkeys(extra["filenames"], True)).notna().all():
            raise SpotmatchError(f"{dataset.csv_path}: {checkpoint} was trained on all of {extra['dataset']} (--extra-train), "
                                 f"so nothing here is held out; evaluate it on the set it was validated on")


def split_for(dataset: Dataset, split_conf: SplitConfig, checkpoint: str | Path | None) -> tuple[pd.Series, str, str]:
    """The checkpoint's own split when it was trained on this table or on any of its photos (rows it trained
    on are never held out; rows it never saw are); otherwise a fresh split from `split_conf`. Returns
    (split, split_by, where it came from).

    Photos are known by file name (without folders: `photo_name`) and label, not path: a copy moved elsewhere or downsized for a GPU machine
    (benchmarks/stage_for_gpu.py) keeps both, and a fresh split there could differ (near-duplicate grouping
    hashes the pixels). A part of the training table split afresh would hold out trained photos. A photo of
    another table that only shares a name (0001.jpg) with a trained one is not it: its label differs
    (checkpoints older than 2026-12-07 store no labels, and match by name alone)."""
    if checkpoint is not None:
        payload = read_checkpoint(checkpoint)
        refuse_extra_training_set(dataset, payload, checkpoint)
        trained_on = payload.get("dataset")
        stored = payload.get("split_assignment") or {}
        names = dataset.table["filename"]
        same_path = bool(trained_on and dataset.csv_path) and Path(trained_on).resolve() == Path(dataset.csv_path).resolve()
        assignment = stored_for(names, stored)
        identity_of = payload.get("identity_of")
        if identity_of is not None and not same_path:  # the training table itself keeps its photos through a label fix
            assignment = assignment.where(stored_for(names, identity_of) == dataset.table["identity"])
        trained_here = int((assignment == "train").sum())
        if same_path or trained_here:
            split = assignment.fillna("val")
            origin = f"the split stored in {checkpoint}"
            if assignment.isna().any() or len(names) != len(stored):
                origin += f" ({trained_here} of these {len(names)} photos trained on, the rest held out)"
            return split.rename("split"), payload["split_config"]["by"], origin
    return split_dataset(dataset, split_conf), split_conf.by, f"split by {split_conf.by}, seed {split_conf.seed}"


def evaluate_models(dataset: Dataset, split: pd.Series, split_by: str, models: list[EvaluatedModel]) -> dict[str, dict[str, dict]]:
    protocol = build_protocol(dataset.table, split, split_by)
    identities = dataset.table["identity"].to_numpy()
    refuse_trivial_protocol(protocol, identities, dataset.csv_path)
    same = identities[protocol.query_rows][:, None] == identities[protocol.gallery_rows][None, :]
    if not (protocol.views["all"] & same).any():
        raise SpotmatchError(f"{dataset.csv_path}: no held-out photo has a match in the gallery, so nothing can be scored; use a"
                             f" table with more photos per animal, or another --val-fraction / --split-by")
    results = {}
    for model in models:
        query_embeddings, gallery_embeddings = embed_protocol(model.embed, dataset.paths, protocol)
        results[model.name] = evaluate_protocol(query_embeddings @ gallery_embeddings.T, identities, protocol)
    return results
