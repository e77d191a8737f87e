"""Deterministic train/validation splits that do not leak.

Two kinds: by identity (open set: validation animals are never seen in training) and by a group
column such as `encounter` (closed set: every validation animal also has training images, but from
other encounters). Near-duplicate frames (perceptual hash) are tied together first, so one burst can
never sit on both sides of a split.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from spotmatch.data.images import load_image
from spotmatch.data.tables import Dataset
from spotmatch.errors import SpotmatchError


@dataclass
class SplitConfig:
    by: str = "identity"  # "identity" for an open-set split, or a group column (e.g. "encounter")
    val_fraction: float = 0.3  # of identities (open set) or of each identity's groups (closed set)
    seed: int = 0
    near_duplicate_distance: int = 4  # perceptual-hash Hamming distance that ties frames; -1 disables

    def __post_init__(self):
        # 1 holds every identity out: an open-set evaluation of a table the model never saw. A closed set needs
        # training photos of every held-out animal, so it keeps some.
        if not (0 <= self.val_fraction < 1 or (self.val_fraction == 1 and self.by == "identity")):
            raise SpotmatchError(f"--val-fraction {self.val_fraction}: the held-out share must be at least 0 and below 1"
                                 f" (1, every photo held out, with --split-by identity only)")

    @property
    def holds_out_everything(self) -> bool:
        return self.val_fraction == 1


def perceptual_hashes(paths: list[Path]) -> np.ndarray:
    """64-bit pHash per image as uint64, of the pixels every stage sees (`load_image`: upright by EXIF, 16-bit
    frames stretched; PIL's own 8-bit conversion clips 16-bit frames to one grey, so all would be twins)."""
    hashes = np.empty(len(paths), dtype=np.uint64)
    for i, path in enumerate(paths):
        bits = imagehash.phash(Image.fromarray(load_image(path).rgb)).hash.flatten()
        hashes[i] = np.packbits(bits).view(">u8")[0]
    return hashes


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """(n_pairs, 2) indices i < j of images whose hashes differ in at most `max_distance` bits. FAISS's binary
    range search keeps memory to the pairs found (an n x n distance table is 6 GB at 10,000 photos)."""
    import faiss

    codes = np.ascontiguousarray(hashes, dtype=np.uint64).view(np.uint8).reshape(len(hashes), 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    limits, _, neighbours = index.range_search(codes, max_distance + 1)  # strictly closer than the radius
    rows = np.repeat(np.arange(len(hashes)), np.diff(limits).astype(np.int64))
    keep = rows < neighbours
    return np.stack([rows[keep], neighbours[keep]], axis=1).astype(np.int64)


def split_units(table: pd.DataFrame, by: str, tie_pairs: np.ndarray) -> np.ndarray:
    """Unit id per row: rows sharing a `by` value, or tied as near duplicates, share a unit."""
    codes = pd.factorize(table[by])[0]
    n = len(table)
    edges_from = np.concatenate([np.arange(n), tie_pairs[:, 0]])
    edges_to = np.concatenate([codes + n, tie_pairs[:, 1]])  # row -> its group node, row -> its twin
    graph = coo_matrix((np.ones(len(edges_from)), (edges_from, edges_to)), shape=(n + codes.max() + 1,) * 2)
    return connected_components(graph, directed=False)[1][:n]


def _assign_open_set(table: pd.DataFrame, units: np.ndarray, conf: SplitConfig) -> np.ndarray:
    rng = np.random.default_rng(conf.seed)
    unit_ids = np.unique(units)
    n_val = int(round(conf.val_fraction * table["identity"].nunique()))
    val_units, val_identities = set(), set()
    for unit in rng.permutation(unit_ids):
        if len(val_identities) >= n_val:
            break
        val_units.add(unit)
        val_identities.update(table.loc[units == unit, "identity"])
    return np.isin(units, list(val_units))


def _assign_closed_set(table: pd.DataFrame, units: np.ndarray, conf: SplitConfig) -> np.ndarray:
    """Per identity, move whole units to validation while at least one unit stays in training."""
    rng = np.random.default_rng(conf.seed)
    identity_units = table.assign(unit=units).groupby("identity")["unit"].unique()
    quota = {ident: max(1, int(round(conf.val_fraction * len(u)))) if len(u) > 1 else 0 for ident, u in identity_units.items()}
    remaining = {ident: len(u) for ident, u in identity_units.items()}
    val_units = set()
    for unit in rng.permutation(np.unique(units)):
        identities = set(table.loc[units == unit, "identity"])
        if all(quota[i] > 0 and remaining[i] > 1 for i in identities):
            val_units.add(unit)
            for i in identities:
                quota[i] -= 1
                remaining[i] -= 1
    return np.isin(units, list(val_units))


def split_dataset(dataset: Dataset, conf: SplitConfig) -> pd.Series:
    """'train' or 'val' per row of `dataset.table`, the same for the same data and config."""
    table = dataset.table
    if conf.by not in table.columns:
        raise SpotmatchError(
            f"{dataset.csv_path}: cannot split by '{conf.by}', no such column; use --split-by identity or add it"
        )
    if conf.holds_out_everything:
        return pd.Series("val", index=table.index, name="split")
    tie_pairs = (
        near_duplicate_pairs(perceptual_hashes(dataset.paths), conf.near_duplicate_distance)
        if conf.near_duplicate_distance >= 0
        else np.empty((0, 2), dtype=int)
    )
    units = split_units(table, conf.by, tie_pairs)
    assign = _assign_open_set if conf.by == "identity" else _assign_closed_set
    is_val = assign(table, units, conf)
    return pd.Series(np.where(is_val, "val", "train"), index=table.index, name="split")
