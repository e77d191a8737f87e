"""Pair features for fusion.

Pairs outside a query's local shortlist have no local evidence. That is not the same as zero
inliers, so such pairs are scored by a separate global-only calibrator (see calibration.py) rather
than by the full model fed silent zeros.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

GLOBAL_FEATURES = ("cosine", "log_rank")
# log_local_score (the sum of the inliers' match confidences) ranks a shortlist better than the inlier
# count alone; kept beside it because the two disagree on pairs with many weak inliers.
LOCAL_FEATURES = ("cosine", "log_rank", "log_inliers", "inlier_ratio", "log_matches", "log_local_score")
# The direction each feature may move the probability (+1: never lowers it, -1: never raises it; absent:
# free). Pooled over queries, a free fit learns signs from differences *between* queries: at a given
# cosine, a worse global rank means many gallery photos scored higher, which happens to queries of an
# animal with many photos; the rank then got a positive weight that works against the cosine within a list.
# The local features stay free: they are nearly collinear, and their contrasts carry the evidence (log local
# score minus log inliers is the inliers' mean match confidence), so their single signs mean nothing.
MONOTONE = {"cosine": 1, "log_rank": -1}


def global_similarity(table: pd.DataFrame) -> pd.Series:
    """The global evidence of each pair: its re-ranked similarity where the table has one, else its cosine."""
    return table["reranked_similarity"] if "reranked_similarity" in table else table["cosine"]


def pair_features(table: pd.DataFrame) -> pd.DataFrame:
    """From columns cosine [or reranked_similarity], global_rank[, matches, inliers, inlier_ratio, local_score]
    to model features; `has_local` marks rows with local evidence (inliers not NaN). The feature named
    "cosine" is the global similarity; a calibration file records whether it was re-ranked."""
    features = pd.DataFrame(index=table.index)
    features["cosine"] = global_similarity(table).astype(float)
    features["log_rank"] = np.log1p(table["global_rank"].astype(float))
    inliers = table["inliers"].astype(float) if "inliers" in table else pd.Series(np.nan, index=table.index)
    features["has_local"] = inliers.notna()
    features["log_inliers"] = np.log1p(inliers)
    features["inlier_ratio"] = table["inlier_ratio"].astype(float) if "inlier_ratio" in table else np.nan
    features["log_matches"] = np.log1p(table["matches"].astype(float)) if "matches" in table else np.nan
    features["log_local_score"] = np.log1p(table["local_score"].astype(float)) if "local_score" in table else np.nan
    return features
