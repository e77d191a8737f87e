"""Who is a query, who is the gallery, and which views of the gallery are reported.

- Closed set (split by a group such as `encounter`): validation images query the training images.
- Open set (split by identity): each validation image queries the other validation images.
Views beside "all": "same flank" when a `side` column exists (the two flanks carry different
patterns), "cross-station" when a `station` column exists (different camera sites: the honest
view when backgrounds repeat per camera), and "other photo_id" when a `photo_id` column exists (nyala
files a left and a right photo of one animal under one photo_id; the embedding finds that partner far
more easily than the animal's other photos, and its flank's pattern cannot confirm it: docs/fusion.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.metrics import identity_bootstrap_difference, retrieval_metrics


@dataclass
class Protocol:
    query_rows: np.ndarray  # row positions in the table
    gallery_rows: np.ndarray
    views: dict[str, np.ndarray]  # view name -> allowed (q, g) bool
    kind: str


def build_protocol(table: pd.DataFrame, split: pd.Series, split_by: str) -> Protocol:
    is_val = (split == "val").to_numpy()
    query_rows = np.flatnonzero(is_val)
    if split_by == "identity":
        gallery_rows, kind = query_rows, "open set (identity-disjoint), each query vs the other validation images"
    else:
        gallery_rows, kind = np.flatnonzero(~is_val), f"closed set (split by {split_by}), validation queries vs training gallery"
    not_self = query_rows[:, None] != gallery_rows[None, :]
    views = {"all": not_self}
    for column, name, same in (("side", "same flank", True), ("station", "cross-station", False), ("photo_id", "other photo_id", False)):
        if column in table.columns:
            values = table[column].to_numpy()
            equal = values[query_rows][:, None] == values[gallery_rows][None, :]
            if same:  # an unknown flank (missing: load_dataset) is the same as no other
                known = pd.notna(values)
                equal &= known[query_rows][:, None] & known[gallery_rows][None, :]
            views[name] = not_self & (equal if same else ~equal)
    return Protocol(query_rows, gallery_rows, views, kind)


def embed_protocol(embed: Callable[[list], np.ndarray], paths: Sequence, protocol: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings, gallery embeddings) in the protocol's row order, each photo embedded once and only the
    photos the protocol uses (an open set's training photos are in neither)."""
    rows = np.union1d(protocol.query_rows, protocol.gallery_rows)
    embedded = np.asarray(embed([paths[row] for row in rows]))
    return embedded[np.searchsorted(rows, protocol.query_rows)], embedded[np.searchsorted(rows, protocol.gallery_rows)]


def refuse_trivial_protocol(protocol: Protocol, identities: np.ndarray, csv_path,
                            fix: str = "hold out more animals (--val-fraction) or use a larger table") -> None:
    """With one animal in the held-out queries' gallery every ranking is perfect (IB-mAP 1.000), which
    would read as a result and pick a checkpoint."""
    animals = np.unique(identities[protocol.gallery_rows])
    if len(protocol.query_rows) and len(animals) < 2:
        raise SpotmatchError(f"{csv_path}: the held-out photos are ranked against one animal only ({animals[0] if len(animals) else 'none'}),"
                             f" so every ranking would be perfect; {fix}")


def evaluate_protocol(similarity: np.ndarray, identities: np.ndarray, protocol: Protocol) -> dict[str, dict]:
    """similarity is (n_queries, n_gallery) over the protocol's rows; one metrics dict per view."""
    query_ids, gallery_ids = identities[protocol.query_rows], identities[protocol.gallery_rows]
    return {name: retrieval_metrics(similarity, query_ids, gallery_ids, allowed) for name, allowed in protocol.views.items()}


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per (model, view)."""
    header = "| model | view | queries | identities | IB-mAP | mAP | top-1 | top-5 | pair ROC-AUC |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    rows = [
        f"| {model} | {view} | {m['n_queries']} | {m['n_identities']} | {m['ib_map']:.3f} | {m['map']:.3f} | {m['top1']:.3f} | {m['top5']:.3f} | {m['roc_auc']:.3f} |"
        for model, views in results.items()
        for view, m in views.items()
    ]
    return "\n".join([header, *rows])


def compare_models(results: dict[str, dict[str, dict]], pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict[str, tuple]]:
    """For each (model, other model): per view, IB-mAP of the first minus the second with its 95% interval
    over the query identities (both ranked the same queries)."""
    return {(first, second): {view: identity_bootstrap_difference(results[first][view], results[second][view])
                              for view in results[first]}
            for first, second in pairs}


def format_comparisons(comparisons: dict[tuple[str, str], dict[str, tuple]]) -> str:
    header = ("| model | minus | view | IB-mAP difference | 95% interval (query identities resampled) |\n"
              "|---|---|---|---:|---|")
    rows = [f"| {first} | {second} | {view} | {difference:+.3f} | {low:+.3f} to {high:+.3f} |"
            for (first, second), views in comparisons.items()
            for view, (difference, low, high) in views.items()]
    return "\n".join([header, *rows])


def format_animal_differences(results: dict[str, dict[str, dict]], pairs: list[tuple[str, str]], top: int = 5) -> str:
    """For each (model, other model) and view, the `top` query animals whose mean AP differs most between
    the two: with a handful of animals, one of them can decide the sign of an IB-mAP difference."""
    header = ("| model | minus | view | query animal | queries | AP model | AP minus | difference |\n"
              "|---|---|---|---|---:|---:|---:|---:|")
    rows = []
    for first, second in pairs:
        for view, metrics in results[first].items():
            first_ap, second_ap = metrics["identity_ap"], results[second][view]["identity_ap"]
            for identity in sorted(first_ap, key=lambda i: -abs(first_ap[i] - second_ap[i]))[:top]:
                rows.append(f"| {first} | {second} | {view} | {identity} | {metrics['identity_queries'][identity]} | "
                            f"{first_ap[identity]:.3f} | {second_ap[identity]:.3f} | {first_ap[identity] - second_ap[identity]:+.3f} |")
    return "\n".join([header, *rows])
