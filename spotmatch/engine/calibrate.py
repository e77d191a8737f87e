"""`spotmatch calibrate`: fit the fusion on labelled pairs and measure every stage honestly.

On the checkpoint's own held-out split (validation queries never trained on):
1. global cosine for every (query, gallery) pair of the protocol, plain or re-ranked (alpha-QE,
   k-reciprocal);
2. local evidence for each query's top-K gallery images (hard negatives included by construction);
3. fused probabilities by cross-validation grouped by the query's identity: a pair's probability
   comes from a calibrator that never saw its query animal;
4. IB-mAP per view for global-only, local-only (top-K re-ranked by local score), fused and fused +
   re-ranking, with 95% intervals for fused minus each single source (query identities resampled);
   ECE (plain and identity-balanced), Brier and log loss of the held-out probabilities; a reliability diagram;
5. the final calibrator, fit on all pairs, saved with its decision threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from spotmatch.data.tables import Dataset
from spotmatch.engine.engine import EngineConfig, build_local, scorer_name
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.protocol import Protocol, build_protocol, compare_models, evaluate_protocol
from spotmatch.fusion.calibration import FusionModel
from spotmatch.fusion.features import pair_features
from spotmatch.fusion.quality import calibration_report, reliability_diagram, threshold_for_precision
from spotmatch.fusion.rerank import k_reciprocal_rerank, query_expansion
from spotmatch.global_embed.embed import Embedder


@dataclass
class CalibrateConfig:
    method: str = "logistic"  # or "isotonic"
    folds: int = 5
    target_precision: float = 0.9  # the "same individual" threshold is set to reach this precision
    rerankers: tuple[str, ...] = ("qe", "k-reciprocal")
    # "identity": every query animal weighs the same, and within a query every gallery animal does, as in
    # identity-balanced mAP; so one animal that owns half the photos (snow leopards' Cat1) does not set
    # the calibration for all others. "none": every pair weighs the same.
    balance: str = "identity"

    def __post_init__(self):
        if self.balance not in BALANCES:  # checked before any image is embedded
            raise SpotmatchError(f"--balance {self.balance}: unknown weighting; use {' or '.join(BALANCES)}")


BALANCES = ("identity", "none")


def pair_weights(frame: pd.DataFrame, balance: str) -> np.ndarray:
    """Sample weight per pair (mean 1): 1 each, or 1 / (pairs of its query identity) / (pairs of its
    gallery identity in its query's list)."""
    if balance == "none":
        return np.ones(len(frame))
    query_identity = frame["query_identity"]
    weight = 1.0 / query_identity.map(query_identity.value_counts()).to_numpy(dtype=float)
    block = frame["q"].astype(str) + "\x1f" + frame["gallery_identity"].astype(str)
    weight /= block.map(block.value_counts()).to_numpy(dtype=float)
    return weight * len(frame) / weight.sum()


def global_similarities(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray, rerankers) -> dict[str, np.ndarray]:
    variants = {"plain": query_embeddings @ gallery_embeddings.T}
    if "qe" in rerankers:
        variants["qe"] = query_expansion(query_embeddings, gallery_embeddings)
    if "k-reciprocal" in rerankers:
        variants["k-reciprocal"] = k_reciprocal_rerank(query_embeddings, gallery_embeddings)
    return variants


def ranks_within(similarity: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """0 for each query's best allowed gallery item; disallowed items rank last."""
    masked = np.where(allowed, similarity, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(similarity.shape[1])[None, :].repeat(len(similarity), 0), axis=1)
    return ranks


def local_evidence(scorer, paths: np.ndarray, protocol: Protocol, pairs_qg: set[tuple[int, int]]) -> dict[tuple[int, int], tuple]:
    """Local evidence for (query position, gallery position) pairs, by the local stage's score_pairs."""
    ordered = sorted(pairs_qg)
    frame = pd.DataFrame({
        "row_id": np.arange(len(ordered)),
        "query_image_path": [paths[protocol.query_rows[q]] for q, _ in ordered],
        "gallery_image_path": [paths[protocol.gallery_rows[g]] for _, g in ordered],
    })
    evidence = scorer.score_pairs(frame)
    return {pair: tuple(row) for pair, row in zip(ordered, evidence[["matches", "inliers", "inlier_ratio", "local_score"]].itertuples(index=False))}


def pair_frame(similarity: np.ndarray, ranks: np.ndarray, allowed: np.ndarray, shortlist_k: int,
               evidence: dict, query_ids: np.ndarray, gallery_ids: np.ndarray) -> pd.DataFrame:
    q, g = np.nonzero(allowed)
    frame = pd.DataFrame({"q": q, "g": g, "cosine": similarity[q, g], "global_rank": ranks[q, g],
                          "label": (query_ids[q] == gallery_ids[g]).astype(int), "query_identity": query_ids[q],
                          "gallery_identity": gallery_ids[g]})
    local = np.full((len(frame), 4), np.nan)
    shortlisted = frame["global_rank"].to_numpy() < shortlist_k
    for i in np.flatnonzero(shortlisted):
        local[i] = evidence[(q[i], g[i])]
    frame[["matches", "inliers", "inlier_ratio", "local_score"]] = local
    return frame


def cross_validated_probability(frame: pd.DataFrame, conf: CalibrateConfig) -> np.ndarray:
    features, labels, groups = pair_features(frame), frame["label"].to_numpy(), frame["query_identity"].to_numpy()
    weights = pair_weights(frame, conf.balance)
    folds = min(conf.folds, len(np.unique(groups)))
    if folds < 2:
        raise SpotmatchError("calibration needs held-out queries of at least 2 identities; use a larger validation split")
    probability = np.empty(len(frame))
    for fit_rows, held_out in GroupKFold(n_splits=folds).split(features, labels, groups):
        model = FusionModel.new(conf.method).fit(features.iloc[fit_rows], labels[fit_rows], weights[fit_rows])
        probability[held_out] = model.predict_proba(features.iloc[held_out])
    return probability


def as_matrix(frame: pd.DataFrame, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    matrix = np.full(shape, -np.inf)
    matrix[frame["q"].to_numpy(), frame["g"].to_numpy()] = values
    return matrix


def main(dataset: Dataset, split: pd.Series, split_by: str, embedder: Embedder, engine_conf: EngineConfig,
         conf: CalibrateConfig, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    protocol = build_protocol(dataset.table, split, split_by)
    if len(protocol.query_rows) == 0:
        raise SpotmatchError(f"{dataset.csv_path}: the split has no validation queries to calibrate on; train with --val-fraction > 0")
    identities, paths = dataset.table["identity"].to_numpy(), np.array([str(p) for p in dataset.paths])
    query_ids, gallery_ids = identities[protocol.query_rows], identities[protocol.gallery_rows]
    rows = np.union1d(protocol.query_rows, protocol.gallery_rows)
    embeddings = np.zeros((len(dataset), embedder.dim), np.float32)
    embeddings[rows] = embedder.embed(list(paths[rows]))
    similarities = global_similarities(embeddings[protocol.query_rows], embeddings[protocol.gallery_rows], conf.rerankers)
    allowed = protocol.views["all"]
    ranks = {name: ranks_within(s, allowed) for name, s in similarities.items()}

    scorer = build_local(engine_conf, embedder.conf.masks)
    k = engine_conf.shortlist_k
    needed = {(q, g) for r in ranks.values() for q, g in zip(*np.nonzero((r < k) & allowed))}
    evidence = local_evidence(scorer, paths, protocol, needed)

    shape = allowed.shape
    frames = {name: pair_frame(similarities[name], ranks[name], allowed, k, evidence, query_ids, gallery_ids) for name in similarities}
    plain = frames["plain"]
    rankings = {"global only": similarities["plain"]}
    local_only = np.where(plain["global_rank"] < k, 10.0 + plain["local_score"].fillna(0) + 1e-3 * plain["cosine"], plain["cosine"])
    local_name = f"local only (top-{k} re-ranked)"
    rankings[local_name] = as_matrix(plain, local_only, shape)
    held_out_probability = {}
    for name, frame in frames.items():
        held_out_probability[name] = cross_validated_probability(frame, conf)
        label = "fused" if name == "plain" else f"fused + {name}"
        rankings[label] = as_matrix(frame, held_out_probability[name], shape)
    for name in conf.rerankers:
        rankings[f"global + {name}"] = similarities[name]

    identity_of_rows = identities.copy()
    retrieval = {name: evaluate_protocol(np.where(allowed, matrix, -np.inf), identity_of_rows, protocol)
                 for name, matrix in rankings.items()}
    comparisons = compare_models(retrieval, [("fused", "global only"), ("fused", local_name)])

    labels = plain["label"].to_numpy()
    balanced_weight = pair_weights(plain, "identity")
    probability = held_out_probability["plain"]
    shortlisted = (plain["global_rank"] < k).to_numpy()
    quality = {"all pairs": calibration_report(probability, labels, balanced_weight),
               f"top-{k} pairs": calibration_report(probability[shortlisted], labels[shortlisted], balanced_weight[shortlisted])}
    quality["by query identity"] = calibration_by_identity(plain, probability)
    threshold = threshold_for_precision(probability, labels, conf.target_precision)
    calls = probability >= threshold
    quality["decision"] = {"threshold": threshold, "target_precision": conf.target_precision,
                           "precision": float(labels[calls].mean()) if calls.any() else float("nan"),
                           "recall": float(calls[labels == 1].mean()) if labels.any() else float("nan")}

    fusion = FusionModel.new(conf.method, embedder_id=embedder.model_id, extractor=scorer_name(scorer),
                             threshold=threshold, target_precision=conf.target_precision, quality=quality)
    fusion.fit(pair_features(plain), labels, pair_weights(plain, conf.balance))
    fusion_path = fusion.save(out_dir / "fusion.json")
    diagram = reliability_diagram({"all pairs": (probability, labels),
                                   f"top-{k} pairs": (probability[shortlisted], labels[shortlisted])},
                                  out_dir / "reliability.png")
    return {"retrieval": retrieval, "comparisons": comparisons, "quality": quality, "fusion_path": fusion_path, "diagram": diagram}


def calibration_by_identity(frame: pd.DataFrame, probability: np.ndarray) -> dict[str, dict]:
    """Per query animal: its pairs, the share that are matches, and the mean held-out probability. A gap
    between the two is what the plain ECE counts and the identity-balanced one evens out."""
    table = pd.DataFrame({"identity": frame["query_identity"].astype(str), "label": frame["label"], "probability": probability})
    grouped = table.groupby("identity").agg(pairs=("label", "size"), match_rate=("label", "mean"), mean_probability=("probability", "mean"))
    return {identity: {"pairs": int(row.pairs), "match_rate": float(row.match_rate), "mean_probability": float(row.mean_probability)}
            for identity, row in grouped.sort_values("pairs", ascending=False).iterrows()}


def format_quality(quality: dict) -> str:
    lines = ["| pairs (held-out identities) | n | positives | ECE | ECE, identity-balanced | Brier | log loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, q in quality.items():
        if name not in ("decision", "by query identity"):
            lines.append(f"| {name} | {q['pairs']} | {q['positives']} | {q['ece']:.4f} | {q['ece_balanced']:.4f} | {q['brier']:.4f} | {q['log_loss']:.4f} |")
    lines += ["", "| query animal | pairs | share that match | mean held-out probability |", "|---|---:|---:|---:|"]
    lines += [f"| {identity} | {q['pairs']} | {q['match_rate']:.3f} | {q['mean_probability']:.3f} |"
              for identity, q in quality["by query identity"].items()]
    d = quality["decision"]
    lines.append("")
    if np.isnan(d["precision"]):
        lines.append(f"No probability threshold reaches precision {d['target_precision']} on the held-out pairs: "
                     f"the saved threshold (1.0) never calls 'same individual'; lower --target-precision.")
    else:
        lines.append(f"Decision threshold for precision >= {d['target_precision']}: p >= {d['threshold']:.3f} "
                     f"(held-out precision {d['precision']:.3f}, recall {d['recall']:.3f}).")
    return "\n".join(lines)
