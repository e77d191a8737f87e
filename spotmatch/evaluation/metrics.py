"""Identity-balanced mAP (the Jaguar Re-ID competition's metric) and friends.

For each query, the average precision of its gallery ranked by similarity; the mean over the queries
of each identity; the mean over identities. Queries with no true match among their allowed gallery
are left out (they have no AP), and counted in `n_queries_without_match`.

Ties are broken against the query: among equal scores the wrong identities rank first. A scorer that
gives many pairs one value (an isotonic calibrator's steps, a saturated probability) would otherwise be
credited with the gallery's file order, which is often sorted by identity.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from sklearn.metrics import roc_auc_score


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """`relevant` in ranking order, best score first, ties broken against the query."""
    return relevant[np.lexsort((relevant, -scores))]


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    hits = ranked_relevance(scores, relevant)
    ranks_of_hits = np.flatnonzero(hits) + 1
    return float(np.mean(np.arange(1, len(ranks_of_hits) + 1) / ranks_of_hits))


def retrieval_metrics(similarity: np.ndarray, query_ids, gallery_ids, allowed: np.ndarray | None = None) -> dict:
    """similarity (q, g); `allowed` (q, g) bool marks which gallery items each query is ranked against."""
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    allowed = np.ones(similarity.shape, dtype=bool) if allowed is None else allowed
    per_identity: dict[str, list[float]] = defaultdict(list)
    top1, top5, without_match = [], [], 0
    pair_scores, pair_labels = [], []
    for q in range(len(query_ids)):
        candidates = np.flatnonzero(allowed[q])
        scores = similarity[q, candidates]
        relevant = gallery_ids[candidates] == query_ids[q]
        pair_scores.append(scores)
        pair_labels.append(relevant)
        if not relevant.any():
            without_match += 1
            continue
        per_identity[query_ids[q]].append(average_precision(scores, relevant))
        ranked = ranked_relevance(scores, relevant)
        top1.append(ranked[0])
        top5.append(ranked[:5].any())
    all_ap = [ap for aps in per_identity.values() for ap in aps]
    labels = np.concatenate(pair_labels) if pair_labels else np.zeros(0, bool)
    scores = np.concatenate(pair_scores) if pair_scores else np.zeros(0)
    return {
        "ib_map": float(np.mean([np.mean(aps) for aps in per_identity.values()])) if per_identity else float("nan"),
        "map": float(np.mean(all_ap)) if all_ap else float("nan"),
        "top1": float(np.mean(top1)) if top1 else float("nan"),
        "top5": float(np.mean(top5)) if top5 else float("nan"),
        "roc_auc": float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan"),
        "n_queries": len(all_ap),
        "n_identities": len(per_identity),
        "n_queries_without_match": without_match,
        "identity_ap": {identity: float(np.mean(aps)) for identity, aps in per_identity.items()},
        "identity_queries": {identity: len(aps) for identity, aps in per_identity.items()},
    }


def identity_bootstrap_difference(first: dict, second: dict, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IB-mAP of `first` minus `second` (two `retrieval_metrics` results on the same queries) and its 95%
    interval from resampling the query identities with replacement. Paired: a resample draws the same
    animals for both, so what one animal finds easy or hard cancels out."""
    identities = sorted(first["identity_ap"])
    if sorted(second["identity_ap"]) != identities:
        raise ValueError("both rankings must be evaluated on the same query identities")
    differences = np.array([first["identity_ap"][i] - second["identity_ap"][i] for i in identities])
    draws = np.random.default_rng(seed).integers(0, len(differences), size=(resamples, len(differences)))
    low, high = np.percentile(differences[draws].mean(axis=1), [2.5, 97.5])
    return float(differences.mean()), float(low), float(high)
