"""Metrics from a scored pair file (the competition's view): rank each query's listed gallery images."""
from __future__ import annotations

import numpy as np
import pandas as pd

from spotmatch.evaluation.metrics import retrieval_metrics


def pair_metrics(pairs: pd.DataFrame, similarity: np.ndarray, identity_of: dict[str, str]) -> dict:
    """`pairs` has query_image, gallery_image; only listed pairs are ranked (allowed mask)."""
    queries, query_pos = np.unique(pairs["query_image"].to_numpy(), return_inverse=True)
    gallery, gallery_pos = np.unique(pairs["gallery_image"].to_numpy(), return_inverse=True)
    matrix = np.full((len(queries), len(gallery)), -np.inf)
    allowed = np.zeros_like(matrix, dtype=bool)
    matrix[query_pos, gallery_pos] = similarity
    allowed[query_pos, gallery_pos] = True
    return retrieval_metrics(matrix, [identity_of[q] for q in queries], [identity_of[g] for g in gallery], allowed)
