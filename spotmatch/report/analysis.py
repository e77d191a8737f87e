"""The numbers a report shows: embeddings on the checkpoint's own split, the retrieval protocol's
similarities, and AP per identity, all from the project's protocol and metrics (no AP of our own)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from spotmatch.data.tables import Dataset
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.metrics import retrieval_metrics
from spotmatch.evaluation.protocol import Protocol, build_protocol, evaluate_protocol, refuse_trivial_protocol


@dataclass
class RetrievalAnalysis:
    """Everything derived from one embedding of the data set; rows index `dataset.table`."""

    embeddings: np.ndarray  # (n_images, d), L2-normalised, every row of the table
    split: pd.Series  # "train" / "val" per row
    split_origin: str  # where the split came from, in words
    protocol: Protocol
    similarity: np.ndarray  # (n_queries, n_gallery) cosine similarity over the protocol's rows
    metrics_by_view: dict[str, dict]  # view name -> retrieval_metrics dict
    per_identity: pd.DataFrame  # one row per query identity, worst AP first


def protocol_similarity(embeddings: np.ndarray, protocol: Protocol) -> np.ndarray:
    return embeddings[protocol.query_rows] @ embeddings[protocol.gallery_rows].T


def per_identity_metrics(similarity: np.ndarray, identities: np.ndarray, protocol: Protocol, view: str = "all") -> pd.DataFrame:
    """AP (mean over the identity's queries), top-1 and counts per query identity.

    Each identity's row is `retrieval_metrics` on that identity's queries alone, so its AP is exactly
    the per-identity term that IB-mAP averages."""
    query_ids, gallery_ids = identities[protocol.query_rows], identities[protocol.gallery_rows]
    allowed = protocol.views[view]
    rows = []
    for identity in sorted(set(query_ids)):
        mine = query_ids == identity
        metrics = retrieval_metrics(similarity[mine], query_ids[mine], gallery_ids, allowed[mine])
        rows.append({"identity": identity, "ap": metrics["map"], "top1": metrics["top1"],
                     "queries": int(mine.sum()), "queries_without_match": metrics["n_queries_without_match"],
                     "gallery_images": int((gallery_ids == identity).sum())})
    frame = pd.DataFrame(rows, columns=["identity", "ap", "top1", "queries", "queries_without_match", "gallery_images"])
    # Worst first: the identities to look at; identities with no answerable query (NaN) go last.
    return frame.sort_values(["ap", "identity"], na_position="last", kind="stable").reset_index(drop=True)


def report_protocol(dataset: Dataset, split: pd.Series, split_by: str) -> Protocol:
    """The held-out queries and gallery the report ranks, refused before anything is embedded when they
    cannot say anything (no query, or a gallery of one animal)."""
    protocol = build_protocol(dataset.table, split, split_by)
    if len(protocol.query_rows) == 0:
        raise SpotmatchError(f"{dataset.csv_path}: the split holds no validation images to query with; "
                             f"report on the table the checkpoint was trained on, or one with several images per identity")
    refuse_trivial_protocol(protocol, dataset.table["identity"].to_numpy(), dataset.csv_path, "use a table with more animals")
    return protocol


def analyse(dataset: Dataset, embeddings: np.ndarray, protocol: Protocol, split: pd.Series, split_origin: str) -> RetrievalAnalysis:
    identities = dataset.table["identity"].to_numpy()
    similarity = protocol_similarity(embeddings, protocol)
    return RetrievalAnalysis(
        embeddings=embeddings, split=split, split_origin=split_origin, protocol=protocol,
        similarity=similarity, metrics_by_view=evaluate_protocol(similarity, identities, protocol),
        per_identity=per_identity_metrics(similarity, identities, protocol),
    )


def pair_similarities(analysis: RetrievalAnalysis, identities: np.ndarray, view: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """(same-individual, different-individual) similarities over the protocol's allowed pairs."""
    same = identities[analysis.protocol.query_rows][:, None] == identities[analysis.protocol.gallery_rows][None, :]
    allowed = analysis.protocol.views[view]
    return analysis.similarity[allowed & same], analysis.similarity[allowed & ~same]


def ranked_neighbours(analysis: RetrievalAnalysis, query_index: int, top_k: int, view: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The top-k allowed gallery rows (table positions) for one query (index into query_rows), and their similarity."""
    candidates = np.flatnonzero(analysis.protocol.views[view][query_index])
    scores = analysis.similarity[query_index, candidates]
    order = np.argsort(-scores, kind="stable")[:top_k]  # ties in the gallery's order (the metrics count them against the query)
    return analysis.protocol.gallery_rows[candidates[order]], scores[order]


def sample_rows(split: pd.Series, max_images: int, seed: int) -> np.ndarray:
    """Rows shown with thumbnails: every validation image first, then a seeded random sample of the
    training images, at most `max_images` in all (thumbnails are what makes the page heavy)."""
    is_val = (split == "val").to_numpy()
    rng = np.random.default_rng(seed)
    val_rows, train_rows = np.flatnonzero(is_val), np.flatnonzero(~is_val)
    picked = list(rng.permutation(val_rows)[:max_images])
    picked += list(rng.permutation(train_rows)[: max(0, max_images - len(picked))])
    return np.sort(np.asarray(picked, dtype=int))


def neighbour_queries(analysis: RetrievalAnalysis, identities: np.ndarray, how_many: int) -> np.ndarray:
    """Queries (indices into query_rows) for the neighbour grids: the first query of each identity,
    worst identities first, so the grids show where the model fails before where it works."""
    query_ids = identities[analysis.protocol.query_rows]
    chosen = []
    for identity in analysis.per_identity["identity"]:
        chosen.append(int(np.flatnonzero(query_ids == identity)[0]))
        if len(chosen) == how_many:
            break
    return np.asarray(chosen, dtype=int)
