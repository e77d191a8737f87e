"""Pair scoring: embed each distinct image once, then score every (query, gallery) row."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.errors import SpotmatchError
from spotmatch.fusion.features import global_similarity
from spotmatch.fusion.rerank import rerank_pairs
from spotmatch.global_embed.embed import Embedder
from spotmatch.io import write_csv_atomic

# Rows per vectorised dot product. Each chunk gathers two (rows x dim) float32 copies of the embeddings:
# 16k rows of 512-d embeddings hold 64 MiB, whatever the size of the pair file (200k rows held 780 MiB).
PAIR_CHUNK = 16_384


def cosine_to_similarity(cosine: np.ndarray) -> np.ndarray:
    """Map cosine in [-1, 1] to [0, 1], order-preserving (uncalibrated: fusion calibrates)."""
    return np.clip((cosine + 1.0) / 2.0, 0.0, 1.0)


def one_pair_scores(embedder: Embedder, query: str | Path, gallery: str | Path) -> pd.DataFrame:
    """`global_pair_scores` of a single (query, gallery) pair, as `explain` shows it."""
    pair = pd.DataFrame({"row_id": [0], "query_image_path": [str(query)], "gallery_image_path": [str(gallery)]})
    return global_pair_scores(pair, embedder)


def global_pair_scores(pairs: pd.DataFrame, embedder: Embedder, rerank: str = "none") -> pd.DataFrame:
    """`cosine` per row; with a re-ranker (fusion.rerank.RERANKERS), also `reranked_similarity`; and
    `global_rank`: 0 for the best gallery image among that query's rows by the global similarity."""
    codes, unique_paths = pd.factorize(pd.concat([pairs["query_image_path"], pairs["gallery_image_path"]], ignore_index=True))
    query_pos, gallery_pos = codes[: len(pairs)], codes[len(pairs):]
    embeddings = embedder.embed(list(unique_paths))
    cosine = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), PAIR_CHUNK):
        stop = start + PAIR_CHUNK
        cosine[start:stop] = np.einsum("ij,ij->i", embeddings[query_pos[start:stop]], embeddings[gallery_pos[start:stop]])
    scores = pd.DataFrame({"row_id": pairs["row_id"].to_numpy(), "cosine": cosine}, index=pairs.index)
    if rerank != "none":
        scores["reranked_similarity"] = rerank_pairs(rerank, embeddings, query_pos, gallery_pos)
    # Ranked over each query's distinct gallery images: a pair listed twice takes one place, so that both rows get
    # the same rank, and the same local evidence and score, instead of straddling the shortlist's edge. Tied scores
    # (one photo under two names) share the better place, whichever row comes first.
    pair_codes = query_pos.astype(np.int64) * len(unique_paths) + gallery_pos
    first_rows = ~pd.Series(pair_codes).duplicated().to_numpy()
    ranked_by = global_similarity(scores)
    first_rank = ranked_by[first_rows].groupby(query_pos[first_rows]).rank(method="min", ascending=False).astype(int) - 1
    rank_of_pair = dict(zip(pair_codes[first_rows], first_rank.to_numpy()))
    scores["global_rank"] = [rank_of_pair[code] for code in pair_codes]
    return scores


def write_submission(row_ids: pd.Series, similarity: np.ndarray, out_path: str | Path) -> Path:
    """Competition file `row_id, similarity`, written to a temporary file and renamed. Refused, with nothing
    written, when a similarity is not a number in [0, 1]: the scorer would reject or misread the file, and
    only a damaged checkpoint or calibration file gets past their loaders' checks to produce one."""
    similarity = np.asarray(similarity, dtype=float)
    invalid = np.flatnonzero(~((similarity >= 0) & (similarity <= 1)))  # NaN fails both comparisons
    if invalid.size:
        first = invalid[0]
        raise SpotmatchError(
            f"{out_path}: not written: the similarity of {invalid.size} row(s) is not a number in [0, 1] (first: row_id "
            f"{str(row_ids.iloc[first])!r}, {similarity[first]}); the checkpoint or the --fusion file is damaged: make it again "
            f"(`spotmatch train`, `spotmatch calibrate`)"
        )
    return write_csv_atomic(pd.DataFrame({"row_id": row_ids.to_numpy(), "similarity": similarity}), out_path, follow=True)
