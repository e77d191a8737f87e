"""Re-ranking used by the strongest Kaggle jaguar entries, on global embeddings.

- Query expansion (alpha-QE, Radenović et al. 2018): a query is replaced by the weighted mean of
  itself and its top gallery neighbours.
- k-reciprocal re-ranking (Zhong et al. 2017): the distance blends the original one with a Jaccard
  distance between k-reciprocal neighbour sets.
Both take and return cosine-like similarities (higher = more alike), so fusion treats them alike.
`rerank_pairs` applies one to the rows of a pair file, each query's gallery being its own rows.
"""
from __future__ import annotations

import numpy as np

from spotmatch.errors import SpotmatchError

RERANKERS = ("none", "qe", "k-reciprocal")
# k-reciprocal holds several (queries + gallery)^2 float64 matrices: 12,000 images take about 1.2 GB each.
K_RECIPROCAL_MAX_IMAGES = 12_000


def _row_by_row(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """`queries @ gallery.T` with each score summed on its own: BLAS blocks a matrix product's sums by how many rows
    it holds, so a query's scores would change with the other queries of its file (a file split by query, a Ray
    shard). NumPy's own einsum loop (no BLAS without `optimize`) sums every score over the dimensions in one order."""
    return np.einsum("qd,gd->qg", queries, gallery)


def query_expansion(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray, neighbours: int = 2,
                    alpha: float = 3.0, allowed: np.ndarray | None = None) -> np.ndarray:
    """Similarity (q, g) after alpha-weighted expansion with each query's top `neighbours` among the allowed
    gallery images (default all; where the gallery holds the queries themselves, leave each query out)."""
    similarity = _row_by_row(query_embeddings, gallery_embeddings)
    candidates = similarity if allowed is None else np.where(allowed, similarity, -np.inf)
    top = np.argsort(-candidates, axis=1)[:, :neighbours]
    weights = np.clip(np.take_along_axis(similarity, top, axis=1), 0, None) ** alpha
    if allowed is not None:  # a query with fewer allowed images than `neighbours` is expanded by those only
        weights *= np.take_along_axis(allowed, top, axis=1)
    expanded = query_embeddings + np.einsum("qn,qnd->qd", weights, gallery_embeddings[top])
    expanded /= np.linalg.norm(expanded, axis=1, keepdims=True)
    return _row_by_row(expanded, gallery_embeddings)


def _reciprocal_neighbours(ranks: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = ranks[i, : k + 1]
    return forward[np.any(ranks[forward, : k + 1] == i, axis=1)]


def k_reciprocal_rerank(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3) -> np.ndarray:
    """Similarity (q, g) = 1 - re-ranked distance. Memory O((q+g)^2): for shortlists and small
    galleries, not for million-image catalogues.

    The neighbour graph holds each distinct image once: where the gallery holds the queries themselves (an
    open set) or two copies of one photo, a second copy would be every image's closest neighbour and fill
    two of its k1 and k2 places."""
    everything, image_of = np.unique(np.concatenate([query_embeddings, gallery_embeddings]), axis=0, return_inverse=True)
    image_of = image_of.ravel()
    query_images, gallery_images = image_of[: len(query_embeddings)], image_of[len(query_embeddings):]
    n = len(everything)
    distance = np.clip(2 - 2 * everything @ everything.T, 0, None)
    # Each row by its own largest distance (the reference code's column scaling, then transposed), which keeps
    # every row's order: the neighbour sets below are the true nearest neighbours.
    distance /= distance.max(axis=1, keepdims=True) + 1e-12
    ranks = np.argsort(distance, axis=1)
    k1, k2 = min(k1, n - 1), min(k2, n)
    weights = np.zeros((n, n))
    for i in range(n):
        reciprocal = _reciprocal_neighbours(ranks, i, k1)
        expansion = [reciprocal]
        for candidate in reciprocal:
            candidate_set = _reciprocal_neighbours(ranks, candidate, int(round(k1 / 2)))
            if len(np.intersect1d(candidate_set, reciprocal)) > 2 / 3 * len(candidate_set):
                expansion.append(candidate_set)
        members = np.unique(np.concatenate(expansion))
        weight = np.exp(-distance[i, members])
        weights[i, members] = weight / weight.sum()
    if k2 > 1:  # local query expansion over each item's k2 nearest neighbours
        weights = weights[ranks[:, :k2]].mean(axis=1)
    gallery_weights = weights[gallery_images]
    jaccard = np.empty((len(query_images), len(gallery_images)))
    for q, image in enumerate(query_images):
        overlap = np.minimum(weights[image], gallery_weights).sum(axis=1)
        jaccard[q] = 1 - overlap / (2 - overlap)  # rows sum to 1, so the union is 2 - overlap
    final = (1 - lambda_value) * jaccard + lambda_value * distance[np.ix_(query_images, gallery_images)]
    return 1 - final


def check_reranker(name: str) -> None:
    if name not in RERANKERS:
        raise SpotmatchError(f"--rerank {name}: unknown re-ranking; use {' or '.join(RERANKERS)}")


def rerank_similarity(name: str, query_embeddings: np.ndarray, gallery_embeddings: np.ndarray,
                      allowed: np.ndarray) -> np.ndarray:
    """(queries, gallery) similarity after the re-ranker `name`; `allowed` marks the pairs that exist
    (query expansion looks for neighbours only there; k-reciprocal uses every image as context)."""
    if name == "qe":
        return query_expansion(query_embeddings, gallery_embeddings, allowed=allowed)
    if name == "k-reciprocal":
        return k_reciprocal_rerank(query_embeddings, gallery_embeddings)
    check_reranker(name)
    raise ValueError(f"no re-ranking to apply for {name!r}")


def rerank_pairs(name: str, embeddings: np.ndarray, query_pos: np.ndarray, gallery_pos: np.ndarray) -> np.ndarray:
    """Re-ranked similarity of each row (query `embeddings[query_pos[i]]`, gallery `embeddings[gallery_pos[i]]`).
    Each query's gallery is its own rows (never itself), as a competition file gives them. Query expansion
    then depends on a query's rows only, so files split by query score the same; k-reciprocal uses every
    query and gallery image of the file as context."""
    queries, query_row = np.unique(query_pos, return_inverse=True)
    gallery, gallery_row = np.unique(gallery_pos, return_inverse=True)
    images = len(np.union1d(queries, gallery))
    if name == "k-reciprocal" and images > K_RECIPROCAL_MAX_IMAGES:
        raise SpotmatchError(f"--rerank k-reciprocal holds (images)^2 distances: the {images:,} distinct query and gallery images "
                             f"are over {K_RECIPROCAL_MAX_IMAGES:,}; use --rerank qe, or split the pair file by query")
    allowed = np.zeros((len(queries), len(gallery)), dtype=bool)
    allowed[query_row, gallery_row] = True
    allowed &= queries[:, None] != gallery[None, :]
    # Row by row (`_row_by_row`), so that a query's scores depend on its own rows only: files split by query, and
    # Ray's shards of whole queries, score alike to the last bit.
    similarity = rerank_similarity(name, embeddings[queries].astype(np.float64), embeddings[gallery].astype(np.float64), allowed)
    return similarity[query_row, gallery_row]
