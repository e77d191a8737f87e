"""`spotmatch calibrate`: fit the fusion on labelled pairs and measure every stage honestly.

On the checkpoint's own held-out split (validation queries never trained on):
1. global cosine for every (query, gallery) pair of the protocol, plain or re-ranked (alpha-QE,
   k-reciprocal);
2. local evidence for each query's top-K gallery images (hard negatives included by construction);
3. fused probabilities by cross-validation grouped by the query's identity: a pair's probability
   comes from a calibrator that never saw its query animal;
4. IB-mAP per view for global-only, local-only (top-K re-ranked by local score), fused, fused +
   re-ranking and fused with each query's shortlist kept first, with 95% intervals for fused minus each
   single source (query identities resampled), and the best that re-weighting cosine against local
   score within the shortlist could give (in-sample headroom over local-only); the same three stages
   again with each view (same flank, cross-station) searched on its own, its shortlist taken within it;
   ECE (plain and identity-balanced), Brier and log loss of the held-out probabilities; a reliability diagram;
5. the final calibrator, fit on all pairs, saved with the threshold for `identify`'s decision (name the
   best candidate, or "new individual"), set on held-out photos of animals in the gallery and of
   animals taken out of it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GroupKFold

from spotmatch.data.tables import Dataset
from spotmatch.engine.engine import EngineConfig, build_local, shortlist_length
from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.metrics import retrieval_metrics
from spotmatch.evaluation.protocol import (Protocol, build_protocol, compare_models, embed_protocol, evaluate_protocol,
                                          format_animal_differences, format_comparisons, format_table)
from spotmatch.fusion.calibration import (DECISIONS, FusionModel, best_pair_per_individual, decision_score, keep_shortlist_first,
                                          lowest_shortlisted)
from spotmatch.fusion.features import pair_features
from spotmatch.fusion.quality import NEVER, calibration_report, reliability_diagram, threshold_for_precision
from spotmatch.fusion.rerank import check_reranker, rerank_similarity
from spotmatch.global_embed.embed import Embedder
from spotmatch.io import atomic_path, check_output, write_text_atomic
from spotmatch.local_match.pipeline import EVIDENCE_COLUMNS
from spotmatch.segmentation.provider import absolute_source


@dataclass
class CalibrateConfig:
    method: str = "logistic"  # or "isotonic"
    folds: int = 5
    target_precision: float = 0.9  # the "same individual" threshold is set to reach this precision
    rerankers: tuple[str, ...] = ("qe", "k-reciprocal")  # measured beside fusion alone
    # The global similarity the saved calibrators, their quality figures and thresholds are fit on: plain
    # cosine ("none") or re-ranked ("qe", "k-reciprocal"), for `score-pairs --rerank` with the same name.
    rerank: str = "none"
    # "identity": every query animal weighs the same, and within a query every gallery animal does, as in
    # identity-balanced mAP; so one animal that owns half the photos (snow leopards' Cat1) does not set
    # the calibration for all others. "none": every pair weighs the same.
    balance: str = "identity"
    # `identify` names the best candidate or says "new individual"; its threshold is set on that decision,
    # over photos of catalogued animals and of animals missing from the gallery, mixed in this proportion.
    new_share: float = 0.5
    # What that threshold applies to (fusion.calibration.DECISIONS): the best individual's probability, or
    # its margin over the next individual's. Both are measured; this one is saved.
    decision: str = "margin"
    # A higher cosine never lowers the probability and a worse global rank never raises it, so within a query
    # the global evidence keeps its order (fusion.features.MONOTONE); False: every weight free.
    monotone: bool = True

    def __post_init__(self):  # checked before any image is embedded
        if self.balance not in BALANCES:
            raise SpotmatchError(f"--balance {self.balance}: unknown weighting; use {' or '.join(BALANCES)}")
        if not 0 < self.target_precision <= 1:
            raise SpotmatchError(f"--target-precision {self.target_precision}: must be above 0 and at most 1")
        if not 0 <= self.new_share < 1:
            raise SpotmatchError(f"--new-share {self.new_share}: must be at least 0 and below 1")
        if self.decision not in DECISIONS:
            raise SpotmatchError(f"--decision {self.decision}: unknown rule; use {' or '.join(DECISIONS)}")
        check_reranker(self.rerank)

    @property
    def variants(self) -> tuple[str, ...]:
        """Every re-ranked global similarity to compute: the measured ones and the saved one."""
        return tuple(dict.fromkeys([*self.rerankers, *([self.rerank] if self.rerank != "none" else [])]))

    @property
    def saved_variant(self) -> str:
        return "plain" if self.rerank == "none" else self.rerank

    def describe(self) -> str:
        """The settings line of calibration.md."""
        return (f"calibration: {self.method}, balance: {self.balance}, signs: {'monotone' if self.monotone else 'free'},"
                f" cross-validated over query identities"
                + (f"; saved calibration and its quality figures: on similarities re-ranked by {self.rerank}" if self.rerank != "none" else ""))


BALANCES = ("identity", "none")
SHORTLIST_FIRST = "fused, shortlist first"  # no pair outside a query's shortlist above a shortlisted one
DECISION_WORDS = {"margin": "best individual's lead over the next", "best": "best individual's probability"}


def pair_weights(frame: pd.DataFrame, balance: str) -> np.ndarray:
    """Sample weight per pair (mean 1): 1 each, or IB-mAP's weighting of `frame`'s pairs: every query
    animal the same, within it every query, and within a query every gallery animal (1 / its queries /
    the animals in the query's list / that animal's pairs there). Lists of unequal make-up (a view, a
    shortlist) keep the balance, so weights are made for the pairs they weigh, not taken from a larger set."""
    if balance == "none":
        return np.ones(len(frame))
    queries_of_animal = frame.groupby("query_identity")["q"].transform("nunique")
    animals_in_list = frame.groupby("q")["gallery_identity"].transform("nunique")
    pairs_of_animal = frame.groupby(["q", "gallery_identity"])["q"].transform("size")
    weight = 1.0 / (queries_of_animal * animals_in_list * pairs_of_animal).to_numpy(dtype=float)
    return weight * len(frame) / weight.sum()


def global_similarities(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray, allowed: np.ndarray,
                        rerankers) -> dict[str, np.ndarray]:
    """Cosine, and each re-ranked similarity, per (query, gallery) pair; `allowed` marks the pairs that
    exist (not a query with itself)."""
    variants = {"plain": query_embeddings @ gallery_embeddings.T}
    for name in rerankers:
        variants[name] = rerank_similarity(name, query_embeddings, gallery_embeddings, allowed)
    return variants


def ranks_within(similarity: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """0 for each query's best allowed gallery item; disallowed items rank last; tied items (one photo in the
    gallery twice) share the better place, as `score-pairs` ranks them."""
    from scipy.stats import rankdata

    masked = np.where(allowed & ~np.isnan(similarity), similarity, -np.inf)  # NaN would make its whole row NaN
    return rankdata(-masked, method="min", axis=1).astype(np.int64) - 1


def local_evidence(scorer, paths: np.ndarray, protocol: Protocol, pairs_qg: set[tuple[int, int]]) -> dict[tuple[int, int], tuple]:
    """Local evidence for (query position, gallery position) pairs, by the local stage's score_pairs."""
    ordered = sorted(pairs_qg)
    frame = pd.DataFrame({
        "row_id": np.arange(len(ordered)),
        "query_image_path": [paths[protocol.query_rows[q]] for q, _ in ordered],
        "gallery_image_path": [paths[protocol.gallery_rows[g]] for _, g in ordered],
    })
    evidence = scorer.score_pairs_shown(frame)
    return {pair: tuple(row) for pair, row in zip(ordered, evidence[list(EVIDENCE_COLUMNS)].itertuples(index=False))}


def pair_frame(cosine: np.ndarray, ranks: np.ndarray, allowed: np.ndarray, shortlist_k: int, evidence: dict,
               query_ids: np.ndarray, gallery_ids: np.ndarray, reranked: np.ndarray | None = None) -> pd.DataFrame:
    """One row per allowed (query, gallery) pair, in the same order for every variant; `reranked`: the
    re-ranked similarity that `ranks` come from (None: the cosine's)."""
    q, g = np.nonzero(allowed)
    frame = pd.DataFrame({"q": q, "g": g, "cosine": cosine[q, g], "global_rank": ranks[q, g],
                          "label": (query_ids[q] == gallery_ids[g]).astype(int), "query_identity": query_ids[q],
                          "gallery_identity": gallery_ids[g]})
    if reranked is not None:
        frame["reranked_similarity"] = reranked[q, g]
    local = np.full((len(frame), len(EVIDENCE_COLUMNS)), np.nan)
    shortlisted = frame["global_rank"].to_numpy() < shortlist_k
    for i in np.flatnonzero(shortlisted):
        local[i] = evidence[(q[i], g[i])]
    frame[list(EVIDENCE_COLUMNS)] = local
    return frame


@dataclass
class PairSource:
    """What every pair table of one calibration is built from: each (query, gallery) pair's plain cosine, the
    local evidence of the pairs checked, both sides' identities, and the shortlist length."""
    cosine: np.ndarray
    evidence: dict
    query_ids: np.ndarray
    gallery_ids: np.ndarray
    k: int

    def frame(self, ranks: np.ndarray, allowed: np.ndarray, reranked: np.ndarray | None = None) -> pd.DataFrame:
        """The allowed pairs, their top-k by `ranks` with local evidence (pair_frame)."""
        return pair_frame(self.cosine, ranks, allowed, self.k, self.evidence, self.query_ids, self.gallery_ids, reranked)


def named_animals(identities: np.ndarray, shown: int = 3) -> str:
    """'query animal Cat21', 'query animals Cat1, Cat5, Cat9 and 4 more': short enough for a one-line error."""
    names = [str(identity) for identity in identities]
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"query animal{'s' if len(names) > 1 else ''} {listed}"


def fold_models(frame: pd.DataFrame, conf: CalibrateConfig, labels_csv: str | Path = "calibration"):
    """For each fold grouped by query identity: (the fold's held-out query identities, the fusion fit
    on the other pairs). `labels_csv`: the table the pairs come from, named by the errors."""
    features, labels, groups = pair_features(frame), frame["label"].to_numpy(), frame["query_identity"].to_numpy()
    weights = pair_weights(frame, conf.balance)
    folds = min(conf.folds, len(np.unique(groups)))
    if folds < 2:
        raise SpotmatchError(f"{labels_csv}: calibration needs held-out queries of at least 2 identities; hold out more animals")
    for fit_rows, held_out in GroupKFold(n_splits=folds).split(features, labels, groups):
        # A fold fit on the animals left can lack a kind of pair that the whole set has (an animal with one
        # held-out photo has no match): named, so that the error points at them.
        fit_on = f"{named_animals(np.unique(groups[fit_rows]))} (one cross-validation fold)"
        yield np.unique(groups[held_out]), FusionModel.new(conf.method, conf.monotone).fit(
            features.iloc[fit_rows], labels[fit_rows], weights[fit_rows], labels_csv=labels_csv, queries=fit_on)


def cross_validated_probability(frame: pd.DataFrame, conf: CalibrateConfig, pairs: pd.DataFrame | None = None,
                                labels_csv: str | Path = "calibration") -> np.ndarray:
    """Each pair of `pairs` (default: `frame`'s own) scored by the fusion fit on `frame` without the
    pair's query animal. `labels_csv`: the table `frame` comes from, named by the errors."""
    pairs = frame if pairs is None else pairs
    features, probability = pair_features(pairs), np.full(len(pairs), np.nan)
    for held_out_identities, model in fold_models(frame, conf, labels_csv):
        rows = pairs["query_identity"].isin(held_out_identities).to_numpy()
        if rows.any():
            probability[rows] = model.predict_proba(features[rows])
    return probability


def decision_per_query(frame: pd.DataFrame, probability: np.ndarray, shortlist_k: int, decision: str) -> pd.DataFrame:
    """Per query, what `identify` decides on: its shortlisted pairs (the catalogue scores no others), the best
    individual's probability against the next one's (columns probability: the decision score; label: whether
    the best individual is the query's)."""
    shortlisted = frame["global_rank"].to_numpy() < shortlist_k
    table = pd.DataFrame({"q": frame["q"].to_numpy()[shortlisted], "individual": frame["gallery_identity"].to_numpy()[shortlisted],
                          "probability": probability[shortlisted], "label": frame["label"].to_numpy()[shortlisted]})
    ranked = best_pair_per_individual(table, ["q"], wrong_first="label")
    place = ranked.groupby("q").cumcount()
    runner_up = ranked[place == 1].set_index("q")["probability"]
    best = ranked[place == 0].set_index("q")
    scores = [decision_score(p, runner_up.get(q), decision) for q, p in best["probability"].items()]
    return pd.DataFrame({"q": best.index, "probability": scores, "label": best["label"].to_numpy()})


@dataclass
class NewIndividualCalls:
    """Photos ranked by decision score with their running weights: where calling every photo below a score "new
    individual" is right (the photo's animal missing from the gallery) at `target_precision`, weighed."""

    ranked: np.ndarray
    weighed_new: np.ndarray  # running weight of the photos of missing animals, in `ranked` order
    weighed: np.ndarray  # running weight of all photos
    target_precision: float
    reached_cuts: np.ndarray  # the photos' scores that reach the target as cuts, ascending

    @classmethod
    def of(cls, score: np.ndarray, is_new: np.ndarray, weight: np.ndarray, target_precision: float) -> "NewIndividualCalls":
        order = np.argsort(score, kind="stable")
        calls = cls(score[order], np.cumsum((weight * is_new)[order]), np.cumsum(weight[order]), target_precision, np.zeros(0))
        cuts = np.unique(calls.ranked)
        calls.reached_cuts = cuts[calls.reached(cuts)]
        return calls

    def reached(self, cuts: np.ndarray) -> np.ndarray:
        below = np.searchsorted(self.ranked, cuts, side="left")  # photos scored under each cut
        last = np.maximum(below - 1, 0)
        # the tolerance threshold_for_precision allows too: a target met exactly in counts is met
        return (below > 0) & (self.weighed[last] > 0) & (self.weighed_new[last] >= self.target_precision * self.weighed[last] - 1e-12)

    def threshold(self, ceiling: float) -> float:
        """The highest cut not above `ceiling` (the naming threshold: a photo named is not called new) that reaches the
        target; 0.0, below every score, where none does: a photo the model cannot place is then "not sure", not "new",
        since a team answers "new" with `confirm --new`, a second entry for an animal it may already have."""
        if self.ranked.size and self.reached(np.array([ceiling]))[0]:
            return float(ceiling)
        allowed = self.reached_cuts[self.reached_cuts <= ceiling]
        return float(allowed.max()) if allowed.size else 0.0


def identify_decision(known: pd.DataFrame, new: pd.DataFrame, target_precision: float, new_share: float) -> dict:
    """The thresholds of `identify`'s three answers, from the decision score of each query with its animal in the
    gallery (`known`) and without it (`new`, never right), the two weighed as `new_share` says: the score at which
    the animals it names are right at `target_precision`, and the one below which the photos it calls new are new
    at that precision (between the two it is not sure); then what they do to each kind of photo, and the average
    precision of naming over all thresholds."""
    probability = np.concatenate([known["probability"], new["probability"]])
    correct = np.concatenate([known["label"], np.zeros(len(new), int)])
    is_new = np.concatenate([np.zeros(len(known)), np.ones(len(new))])
    weight = np.concatenate([np.full(len(known), (1 - new_share) / max(len(known), 1)), np.full(len(new), new_share / max(len(new), 1))])
    threshold = threshold_for_precision(probability, correct, target_precision, weight) if correct.any() else NEVER
    right = known["label"].to_numpy() == 1
    known_score, new_score = known["probability"].to_numpy(), new["probability"].to_numpy()
    calls = NewIndividualCalls.of(probability, is_new, weight, target_precision)

    def outcome(at: float) -> dict:
        new_at = calls.threshold(at) if new_share > 0 else 0.0  # with no missing animal in the mix, "new" is never right
        named, known_new = known_score >= at, known_score < new_at
        named_precision = np.average(correct[probability >= at], weights=weight[probability >= at]) if (probability >= at).any() else float("nan")
        called_new = probability < new_at
        new_precision = np.average(is_new[called_new], weights=weight[called_new]) if called_new.any() else float("nan")
        return {"threshold": float(at), "precision": float(named_precision), "new_threshold": new_at, "new_precision": float(new_precision),
                "known_named_right": float(np.mean(named & right)), "known_named_wrong": float(np.mean(named & ~right)),
                "known_not_sure": float(np.mean(~named & ~known_new)), "known_called_new": float(np.mean(known_new)),
                "new_named": float(np.mean(new_score >= at)), "new_called_new": float(np.mean(new_score < new_at))}

    # Where the target is out of reach, the best precision any threshold gives tells what to ask for instead.
    best = max((outcome(at) for at in np.unique(probability)), key=lambda o: (o["precision"], -o["threshold"]))
    average_precision = average_precision_score(correct, probability, sample_weight=weight) if correct.any() else 0.0
    return {**outcome(threshold), "target_precision": target_precision, "new_share": new_share,
            "known_photos": len(known), "new_photos": len(new), "best": best, "average_precision": float(average_precision)}


def as_matrix(frame: pd.DataFrame, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    matrix = np.full(shape, -np.inf)
    matrix[frame["q"].to_numpy(), frame["g"].to_numpy()] = values
    return matrix


@dataclass
class GlobalMeasure:
    """Everything the global stage gives one calibration: the protocol, each (query, gallery) pair's plain and
    re-ranked similarities and ranks, and the galleries `identify` searches: without the query's animal
    (`*_new`) and within each view (`restricted`, `restricted_new`: view -> (ranks, allowed))."""
    protocol: Protocol
    identities: np.ndarray
    paths: np.ndarray
    query_ids: np.ndarray
    gallery_ids: np.ndarray
    allowed: np.ndarray
    similarities: dict[str, np.ndarray]
    ranks: dict[str, np.ndarray]
    allowed_new: np.ndarray
    ranks_new: np.ndarray
    restricted: dict[str, tuple[np.ndarray, np.ndarray]]
    restricted_new: dict[str, tuple[np.ndarray, np.ndarray]]

    def shortlists(self, measure_identify: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ranks, allowed) of every list whose top-K the local stage checks."""
        return ([(ranks, self.allowed) for ranks in self.ranks.values()] + list(self.restricted.values())
                + list(self.restricted_new.values()) + ([(self.ranks_new, self.allowed_new)] if measure_identify else []))

    def evaluate(self, ranking: np.ndarray) -> dict:
        """IB-mAP and the rest per view of one (query, gallery) ranking."""
        return evaluate_protocol(np.where(self.allowed, ranking, -np.inf), self.identities, self.protocol)


def measure_global(dataset: Dataset, split: pd.Series, split_by: str, embedder: Embedder, conf: CalibrateConfig,
                   measure_identify: bool) -> GlobalMeasure:
    """Embed the protocol's photos once and rank every gallery they are searched in."""
    protocol = build_protocol(dataset.table, split, split_by)
    if len(protocol.query_rows) == 0:
        raise SpotmatchError(f"{dataset.csv_path}: its split holds no photo out to calibrate on; calibrate on the table the"
                             f" checkpoint was trained with (trained with --val-fraction > 0), or on a larger one")
    identities, paths = dataset.table["identity"].to_numpy(), np.array([str(p) for p in dataset.paths])
    query_ids, gallery_ids = identities[protocol.query_rows], identities[protocol.gallery_rows]
    query_embeddings, gallery_embeddings = embed_protocol(embedder.embed, paths, protocol)
    allowed = protocol.views["all"]
    similarities = global_similarities(query_embeddings, gallery_embeddings, allowed, conf.variants)
    # What a photo of an animal missing from the gallery meets: every query against the other animals.
    allowed_new = allowed & (query_ids[:, None] != gallery_ids[None, :])
    # Each view searched on its own gallery, as `identify --side` or `--station` searches: the shortlist
    # taken within the view, where the views of `retrieval` filter the whole gallery's ranking.
    restricted = {view: (ranks_within(similarities["plain"], view_allowed), view_allowed)
                  for view, view_allowed in protocol.views.items() if view != "all"}
    restricted_new = {view: (ranks_within(similarities["plain"], view_allowed & allowed_new), view_allowed & allowed_new)
                      for view, (_, view_allowed) in restricted.items()} if measure_identify else {}
    return GlobalMeasure(protocol, identities, paths, query_ids, gallery_ids, allowed, similarities,
                         {name: ranks_within(s, allowed) for name, s in similarities.items()},
                         allowed_new, ranks_within(similarities["plain"], allowed_new), restricted, restricted_new)


def rank_every_stage(measured: GlobalMeasure, frames: dict[str, pd.DataFrame], k: int, conf: CalibrateConfig,
                     labels_csv: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str]:
    """Each stage's (query, gallery) ranking, and each frame's held-out fused probability; with the name of
    the local-only ranking."""
    plain, shape = frames["plain"], measured.allowed.shape
    shortlisted = (plain["global_rank"] < k).to_numpy()
    local_name = f"local only (top-{k} re-ranked)"
    rankings = {"global only": measured.similarities["plain"], local_name: as_matrix(plain, local_only_order(plain, shortlisted), shape)}
    held_out_probability = {}
    # Each frame's first fit: where its shortlists or held-out photos leave a kind of pair out, the error names
    # the table (later fits of `plain` refit these same folds).
    for name, frame in frames.items():
        held_out_probability[name] = cross_validated_probability(frame, conf, labels_csv=labels_csv)
        rankings["fused" if name == "plain" else f"fused + {name}"] = as_matrix(frame, held_out_probability[name], shape)
    shortlist_first = keep_shortlist_first(held_out_probability["plain"], shortlisted, plain["q"].to_numpy())
    rankings[SHORTLIST_FIRST] = as_matrix(plain, shortlist_first, shape)
    for name in conf.variants:
        rankings[f"global + {name}"] = measured.similarities[name]
    return rankings, held_out_probability, local_name


def measure_identify_decision(measured: GlobalMeasure, source: PairSource, plain: pd.DataFrame, probability: np.ndarray,
                              searched_frames: dict, conf: CalibrateConfig) -> tuple[dict[str, dict], dict]:
    """`identify`'s decision, per rule, over held-out photos of catalogued animals and of animals taken out of
    the gallery; and the saved rule's decision with each view searched on its own."""
    new_frame = source.frame(measured.ranks_new, measured.allowed_new)
    new_probability = cross_validated_probability(plain, conf, new_frame)
    decisions = {rule: (decision_per_query(plain, probability, source.k, rule), decision_per_query(new_frame, new_probability, source.k, rule))
                 for rule in DECISIONS}
    in_views = identify_in_views(plain, source, searched_frames, measured.restricted_new, decisions[conf.decision], conf)
    # Only a photo whose animal the gallery holds can be named right: in an open set, an animal with one
    # held-out photo has none, and would count as a known photo that is always wrong.
    return identify_within(decisions, plain.loc[plain["label"] == 1, "q"].unique(), conf), in_views


def main(dataset: Dataset, split: pd.Series, split_by: str, embedder: Embedder, engine_conf: EngineConfig,
         conf: CalibrateConfig, out_dir: str | Path, split_origin: str = "the split passed in") -> dict:
    """Measure, fit, and write fusion.json, reliability.png and calibration.md in `out_dir` as one set
    (write_outputs); `split_origin`: where `split` comes from, for the report's first line."""
    out_dir = Path(out_dir)
    check_outputs(out_dir, [dataset.csv_path] if dataset.csv_path else [])  # before any image is embedded
    labels_csv = dataset.csv_path or "calibration"  # what the errors name: a table built in memory has no file
    # `identify` (the catalogue) ranks plain cosines only, so its decision is measured for plain files only.
    measure_identify = conf.rerank == "none"
    measured = measure_global(dataset, split, split_by, embedder, conf, measure_identify)

    scorer = build_local(engine_conf, embedder.conf.masks)
    k = shortlist_length(engine_conf.shortlist_k, None)
    needed = {(q, g) for ranks, allowed in measured.shortlists(measure_identify) for q, g in zip(*np.nonzero((ranks < k) & allowed))}
    source = PairSource(measured.similarities["plain"], local_evidence(scorer, measured.paths, measured.protocol, needed),
                        measured.query_ids, measured.gallery_ids, k)
    frames = {name: source.frame(measured.ranks[name], measured.allowed, reranked=None if name == "plain" else measured.similarities[name])
              for name in measured.similarities}
    plain = frames["plain"]

    rankings, held_out_probability, local_name = rank_every_stage(measured, frames, k, conf, labels_csv)
    retrieval = {name: measured.evaluate(ranking) for name, ranking in rankings.items()}
    # The saved variant too, when it is re-ranked: what `score-pairs --rerank` will rank with.
    compared = ["fused", SHORTLIST_FIRST] + ([f"fused + {conf.rerank}"] if conf.rerank != "none" else [])
    comparisons = compare_models(retrieval, [(fused, single) for fused in compared for single in ("global only", local_name)])
    searched = searched_within_views(plain, source, measured.restricted, conf)
    searched_frames = searched.pop("frames")
    headroom = mixing_headroom(plain, (plain["global_rank"] < k).to_numpy(), retrieval[local_name],
                               lambda values: measured.evaluate(as_matrix(plain, values, measured.allowed.shape)))

    # Quality and thresholds describe the calibrators that are saved: fit on plain or re-ranked similarities.
    saved, probability = frames[conf.saved_variant], held_out_probability[conf.saved_variant]
    labels, saved_shortlisted = saved["label"].to_numpy(), (saved["global_rank"] < k).to_numpy()
    quality = pair_quality(saved, probability, k, conf.target_precision)
    identify_threshold, new_threshold = NEVER, None  # a file fit on re-ranked similarities never names an animal
    if measure_identify:
        quality["identify by rule"], searched["identify"] = measure_identify_decision(measured, source, plain, probability,
                                                                                      searched_frames, conf)
        quality["identify"] = {**quality["identify by rule"][conf.decision], "decision": conf.decision}
        # The saved threshold serves `identify`, so it is the one set on identify's own decision.
        identify_threshold, new_threshold = quality["identify"]["threshold"], quality["identify"]["new_threshold"]

    fusion = FusionModel.new(conf.method, conf.monotone, embedder_id=embedder.model_id, local_stage=scorer.conf_name,
                             threshold=identify_threshold, new_threshold=new_threshold, target_precision=conf.target_precision,
                             quality=quality,
                             decision=conf.decision, rerank=conf.rerank, shortlist_k=k,
                             local_masks=absolute_source(engine_conf.masks or embedder.conf.masks))
    fusion.fit(pair_features(saved), labels, pair_weights(saved, conf.balance), labels_csv=labels_csv)
    result = {"retrieval": retrieval, "comparisons": comparisons, "searched": searched, "headroom": headroom, "quality": quality}
    header = (f"data: {dataset.csv_path} ({len(dataset)} images); {split_origin}; local: {engine_conf.extractor}, top-{k},"
              f" masks: {engine_conf.masks or 'as the checkpoint'}; {conf.describe()}")
    report = format_report(result, header)
    written = write_outputs(out_dir, report, {"all pairs": (probability, labels),
                                              f"top-{k} pairs": (probability[saved_shortlisted], labels[saved_shortlisted])}, fusion)
    return {**result, "report": report, "fusion_path": written["fusion.json"], "diagram": written["reliability.png"],
            "report_path": written["calibration.md"]}


# calibrate's outputs in the order they are renamed into place: fusion.json, which score-pairs, identify and
# report read, last, so that no run stopped midway leaves a new one beside an old report.
OUTPUTS = ("calibration.md", "reliability.png", "fusion.json")


def check_outputs(out_dir: Path, inputs: list[str | Path]) -> None:
    """Refuse, before any work, an output target that cannot be written: a folder standing in its place, or a
    file the command reads (`inputs`)."""
    for name in OUTPUTS:
        target = Path(out_dir) / name
        if target.is_dir():  # would fail only at the rename, after all the work
            raise SpotmatchError(f"{target}: a folder stands where calibrate writes its {name}; move it away or pass another --out-dir")
        check_output(target, inputs, option="--out-dir")


def write_outputs(out_dir: Path, report: str, curves: dict[str, tuple[np.ndarray, np.ndarray]], fusion: FusionModel) -> dict[str, Path]:
    """Write the report, the reliability diagram of `curves` and the fusion file as one set: each to a temporary
    file beside its target, renamed only once all three are written, so that a failure or Ctrl-C leaves the
    previous set whole. Returns each output's path, by name (OUTPUTS)."""
    targets = {name: Path(out_dir) / name for name in OUTPUTS}
    with contextlib.ExitStack() as renames:
        # Entered in reverse, as the stack renames the last entered first: in OUTPUTS' order. Each writer below
        # syncs its bytes to the disk itself (io.atomic_path), hence durable=False: nothing slow between the renames.
        staged = {name: renames.enter_context(atomic_path(targets[name], durable=False)) for name in reversed(OUTPUTS)}
        fusion.save(staged["fusion.json"])
        reliability_diagram(curves, staged["reliability.png"])
        write_text_atomic(report + "\n", staged["calibration.md"])
    return targets


def format_report(result: dict, header: str) -> str:
    """calibration.md: every stage's IB-mAP per view, fused minus each single source, the searched views, the
    headroom, the animals that move each difference, and calibration quality."""
    return "\n\n".join([
        header,
        format_table(result["retrieval"]),
        format_comparisons(result["comparisons"]),
        *format_searched(result["searched"]),
        format_headroom(result["headroom"]),
        "Query animals that move each difference most:",
        format_animal_differences(result["retrieval"], list(result["comparisons"])),
        format_quality(result["quality"]),
    ])



def pair_quality(saved: pd.DataFrame, probability: np.ndarray, k: int, target_precision: float) -> dict:
    """Calibration of the held-out probabilities over all pairs, the shortlisted ones and as `score-pairs
    --shortlist-first` writes them; per query animal; the pairs outside a shortlist that overtake it; and the
    pair threshold that reaches `target_precision`."""
    labels, balanced_weight = saved["label"].to_numpy(), pair_weights(saved, "identity")
    shortlisted, query = (saved["global_rank"] < k).to_numpy(), saved["q"].to_numpy()
    threshold = threshold_for_precision(probability, labels, target_precision)
    calls = probability >= threshold
    return {"all pairs": calibration_report(probability, labels, balanced_weight),
            f"top-{k} pairs": calibration_report(probability[shortlisted], labels[shortlisted], pair_weights(saved[shortlisted], "identity")),
            "all pairs, shortlist first": calibration_report(keep_shortlist_first(probability, shortlisted, query), labels, balanced_weight),
            "by query identity": calibration_by_identity(saved, probability),
            "overtaken": overtaken_shortlist(query, probability, shortlisted),
            "decision": {"threshold": threshold, "target_precision": target_precision,
                         "precision": float(labels[calls].mean()) if calls.any() else float("nan"),
                         "recall": float(calls[labels == 1].mean()) if labels.any() else float("nan")}}


def searched_within_views(plain: pd.DataFrame, source: PairSource, restricted: dict[str, tuple[np.ndarray, np.ndarray]],
                          conf: CalibrateConfig) -> dict:
    """Global only, local only and fused where each query searches only the gallery of a view (`restricted`:
    view -> (global ranks within the view, its allowed pairs)): the top-k re-ranked are the view's own, and the
    fused probabilities come from calibrators fit on the whole gallery's pairs without the query's animal, as
    the saved file scores a restricted `identify`. Retrieval per model and view, fused minus each single
    source with its interval, the calibration of the fused probabilities, and each view's pairs with them."""
    k = source.k
    local_name = f"local only (top-{k} re-ranked)"
    retrieval: dict[str, dict] = {}
    calibration: dict[str, dict] = {}
    frames: dict[str, tuple[pd.DataFrame, np.ndarray]] = {}
    for view, (view_ranks, view_allowed) in restricted.items():
        frame = source.frame(view_ranks, view_allowed)
        shortlisted, labels = (frame["global_rank"] < k).to_numpy(), frame["label"].to_numpy()
        fused = cross_validated_probability(plain, conf, frame)
        orders = {"global only": frame["cosine"].to_numpy(), local_name: local_only_order(frame, shortlisted), "fused": fused}
        name = f"{view}, searched within"
        for model, values in orders.items():
            similarity = np.where(view_allowed, as_matrix(frame, values, view_allowed.shape), -np.inf)
            retrieval.setdefault(model, {})[name] = retrieval_metrics(similarity, source.query_ids, source.gallery_ids, view_allowed)
        calibration[f"{name}, all pairs"] = calibration_report(fused, labels, pair_weights(frame, "identity"))
        calibration[f"{name}, top-{k} pairs"] = calibration_report(fused[shortlisted], labels[shortlisted], pair_weights(frame[shortlisted], "identity"))
        frames[view] = (frame, fused)
    comparisons = compare_models(retrieval, [("fused", "global only"), ("fused", local_name)]) if retrieval else {}
    return {"retrieval": retrieval, "comparisons": comparisons, "calibration": calibration, "frames": frames, "identify": {}}


def identify_in_views(plain: pd.DataFrame, source: PairSource, searched_frames: dict[str, tuple[pd.DataFrame, np.ndarray]],
                      restricted_new: dict[str, tuple[np.ndarray, np.ndarray]], whole: tuple[pd.DataFrame, pd.DataFrame],
                      conf: CalibrateConfig) -> dict[str, dict]:
    """`identify` searched within each view (`searched_frames`: its pairs and held-out probabilities;
    `restricted_new`: its ranks and pairs with each query's animal taken out), beside the whole gallery's
    decisions (`whole`), on the same photos: those whose animal the view holds (searched there, the others
    are new animals)."""
    outcomes = {}
    for view, (frame, probability) in searched_frames.items():
        new_frame = source.frame(*restricted_new[view])
        decisions = (decision_per_query(frame, probability, source.k, conf.decision),
                     decision_per_query(new_frame, cross_validated_probability(plain, conf, new_frame), source.k, conf.decision))
        photos = frame.loc[frame["label"] == 1, "q"].unique()
        outcomes[view] = identify_within({f"{view}, searched within": decisions, "whole gallery": whole}, photos, conf)
    return outcomes


def identify_within(decisions: dict[str, tuple[pd.DataFrame, pd.DataFrame]], photos: np.ndarray, conf: CalibrateConfig) -> dict[str, dict]:
    """`identify`'s decision per named search (name -> decision_per_query of the photos with their animal in the
    gallery, and of the same photos with it taken out), each on the same `photos` (query positions)."""
    return {name: identify_decision(known[known["q"].isin(photos)], new[new["q"].isin(photos)], conf.target_precision, conf.new_share)
            for name, (known, new) in decisions.items()}


def local_only_order(plain: pd.DataFrame, shortlisted: np.ndarray) -> np.ndarray:
    """Local only: shortlisted pairs by local score (the cosine breaking ties), all above the rest, which
    keep the cosine's order."""
    cosine = plain["cosine"].to_numpy()
    return np.where(shortlisted, 10.0 + plain["local_score"].fillna(0).to_numpy() + 1e-3 * cosine, cosine)


# Weights of the standardised cosine beside the standardised log local score; the first only breaks ties,
# which is local only's order.
MIX_WEIGHTS = (1e-3, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def shortlist_mix(plain: pd.DataFrame, shortlisted: np.ndarray, weight: float) -> np.ndarray:
    """Shortlisted pairs ranked by z(log local score) + weight * z(cosine), all above the other pairs,
    which keep the cosine's order (z: standardised over the shortlisted pairs)."""
    def standardised(values: np.ndarray) -> np.ndarray:
        return (values - values[shortlisted].mean()) / (values[shortlisted].std() + 1e-9)
    cosine = plain["cosine"].to_numpy()
    mixed = standardised(np.log1p(plain["local_score"].fillna(0).to_numpy())) + weight * standardised(cosine)
    return np.where(shortlisted, mixed - mixed[shortlisted].min() + 2.0, cosine)  # cosine <= 1 < every shortlisted score


def mixing_headroom(plain: pd.DataFrame, shortlisted: np.ndarray, local_only: dict, evaluate) -> dict[str, dict]:
    """How far any re-weighting of the global and local evidence *within* the shortlist could lift local
    only: per view, the best IB-mAP of `shortlist_mix` over MIX_WEIGHTS, the weight chosen on the same
    queries it is measured on (in-sample, so an upper bound for this family, not an estimate). Near zero
    says that the cosine tells nothing the local score does not about the order of a shortlist, so
    weighing the two differently cannot beat local only there: the gain has to come from better
    evidence. `evaluate` maps one value per pair of `plain` to `evaluate_protocol`'s result."""
    by_weight = {weight: evaluate(shortlist_mix(plain, shortlisted, weight)) for weight in MIX_WEIGHTS}
    headroom = {}
    for view, local in local_only.items():
        weight = max(MIX_WEIGHTS, key=lambda w: (by_weight[w][view]["ib_map"], -w))
        best = by_weight[weight][view]["ib_map"]
        headroom[view] = {"local_only": local["ib_map"], "weight": weight, "best": best, "gain": best - local["ib_map"]}
    return headroom


def format_searched(searched: dict) -> list[str]:
    """The report's sections on each view searched on its own; none where the data have no views."""
    if not searched["retrieval"]:
        return []
    return ["Each view searched on its own: the gallery restricted to the view before each query's shortlist is taken, "
            "as `identify --side` or `--station` searches (the views above filter the whole gallery's ranking, whose "
            "shortlist can hold photos the view leaves out). Global only is the same ranking as above.",
            format_table(searched["retrieval"]), format_comparisons(searched["comparisons"]),
            "\n".join(calibration_rows(searched["calibration"])),
            *identify_rows(searched["identify"]),
            "Query animals that move each of these differences most:", format_animal_differences(searched["retrieval"], list(searched["comparisons"]))]


def identify_rows(outcomes: dict[str, dict]) -> list[str]:
    """`identify` within each searched view, in the columns of the whole gallery's table (format_quality)."""
    if not outcomes:
        return []
    header = ("`identify` searched within each view and over the whole gallery, on the same photos: those whose animal the "
              "view holds, and the same photos with it taken out, weighed as above; the saved decision rule:")
    return [header, "\n".join(["| photos | search | photos | average precision of naming | best precision | at score >= | named right |"
                               " named wrong | not sure | called new | missing animals named | missing animals called new |",
                               "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                               *(f"| whose animal the {view} view holds | {name} | {r['known_photos']} | {r['average_precision']:.3f} |"
                                 f" {r['best']['precision']:.3f} | {r['best']['threshold']:.3f} | {r['best']['known_named_right']:.1%} |"
                                 f" {r['best']['known_named_wrong']:.1%} | {r['best']['known_not_sure']:.1%} | {r['best']['known_called_new']:.1%} |"
                                 f" {r['best']['new_named']:.1%} | {r['best']['new_called_new']:.1%} |"
                                 for view, searches in outcomes.items() for name, r in searches.items())])]


def calibration_rows(reports: dict[str, dict]) -> list[str]:
    """A Markdown table of `calibration_report`s, one row per named set of held-out pairs."""
    return ["| pairs (held-out identities) | n | positives | ECE | ECE, identity-balanced | Brier | log loss |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *(f"| {name} | {q['pairs']} | {q['positives']} | {q['ece']:.4f} | {q['ece_balanced']:.4f} | {q['brier']:.4f} | {q['log_loss']:.4f} |"
              for name, q in reports.items())]


def format_headroom(headroom: dict[str, dict]) -> str:
    lines = ["Headroom within the shortlist (in-sample upper bound): shortlisted pairs ranked by standardised log local score "
             "+ w x standardised cosine, w chosen on these same queries, per view. A gain near 0: weighing the cosine against "
             "the local score cannot improve on local only's order of the shortlist; a better embedder or matcher has to.", "",
             "| view | local only | best w | IB-mAP at best w | gain |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {view} | {h['local_only']:.3f} | {h['weight']:g} | {h['best']:.3f} | {h['gain']:+.3f} |" for view, h in headroom.items()]
    return "\n".join(lines)


def overtaken_shortlist(query: np.ndarray, probability: np.ndarray, shortlisted: np.ndarray) -> dict:
    """Per query, the pairs outside its shortlist whose fused probability is above its lowest shortlisted
    pair's: the pairs `keep_shortlist_first` moves."""
    overtaking = ~shortlisted & (probability > lowest_shortlisted(probability, shortlisted, query))
    per_query = pd.Series(overtaking).groupby(query).sum()
    return {"mean_pairs_per_query": float(per_query.mean()), "share_of_queries": float((per_query > 0).mean())}


def calibration_by_identity(frame: pd.DataFrame, probability: np.ndarray) -> dict[str, dict]:
    """Per query animal: its pairs, the share that are matches, and the mean held-out probability. A gap
    between the two is what the plain ECE counts and the identity-balanced one evens out."""
    table = pd.DataFrame({"identity": frame["query_identity"].astype(str), "label": frame["label"], "probability": probability})
    grouped = table.groupby("identity").agg(pairs=("label", "size"), match_rate=("label", "mean"), mean_probability=("probability", "mean"))
    return {identity: {"pairs": int(row.pairs), "match_rate": float(row.match_rate), "mean_probability": float(row.mean_probability)}
            for identity, row in grouped.sort_values("pairs", ascending=False).iterrows()}


def describe_outcome(outcome: dict) -> str:
    return (f"photos of animals in the gallery: {outcome['known_named_right']:.1%} named right, {outcome['known_named_wrong']:.1%} "
            f"named wrong, {outcome['known_not_sure']:.1%} not sure, {outcome['known_called_new']:.1%} called new; photos of missing"
            f" animals: {outcome['new_named']:.1%} given a name, {outcome['new_called_new']:.1%} called new")


def describe_new_threshold(outcome: dict) -> str:
    if outcome.get("new_share") == 0:
        return "no photo of a missing animal in the mix (--new-share 0): none is called new"
    if outcome["new_threshold"] >= outcome["threshold"]:
        return f"every photo not named is called new (precision {outcome['new_precision']:.3f})"
    if outcome["new_threshold"] <= 0.0:
        return (f"no score calls a photo new at precision {outcome.get('target_precision', 'the target')}: every photo not named is"
                f" 'not sure', for the team to decide")
    return (f"'new individual' below {outcome['new_threshold']:.3f} (precision {outcome['new_precision']:.3f}), 'not sure' between"
            f" the two")


def format_quality(quality: dict) -> str:
    lines = calibration_rows({name: q for name, q in quality.items()
                              if name not in ("decision", "identify", "identify by rule", "by query identity", "overtaken")})
    lines += ["", "| query animal | pairs | share that match | mean held-out probability |", "|---|---:|---:|---:|"]
    lines += [f"| {identity} | {q['pairs']} | {q['match_rate']:.3f} | {q['mean_probability']:.3f} |"
              for identity, q in quality["by query identity"].items()]
    o = quality["overtaken"]
    lines += ["", f"Fused probabilities: {o['share_of_queries']:.0%} of the queries have pairs outside their shortlist scored above "
                  f"their lowest shortlisted pair, {o['mean_pairs_per_query']:.1f} such pairs per query on average "
                  f"(\"fused, shortlist first\" scales them below it)."]
    d = quality["decision"]
    lines.append("")
    if np.isnan(d["precision"]):
        lines.append(f"Pairs: no probability threshold reaches precision {d['target_precision']} over all held-out pairs.")
    else:
        lines.append(f"Pairs: p >= {d['threshold']:.3f} reaches precision {d['target_precision']} over all held-out pairs "
                     f"(precision {d['precision']:.3f}, recall {d['recall']:.3f}).")
    lines.append("")
    if "identify" not in quality:
        lines.append("`identify`: not measured. These calibrators are fit on re-ranked global similarities, for `score-pairs "
                     "--rerank`; the catalogue ranks plain cosines and refuses this file.")
        return "\n".join(lines)
    i = quality["identify"]
    lines.append(f"`identify` (the best individual per photo among its shortlisted pairs; {i['known_photos']} photos of animals in the "
                 f"gallery, and the same photos with their animal taken out, weighed {1 - i['new_share']:g} : {i['new_share']:g}; "
                 f"threshold on the {DECISION_WORDS[i['decision']]}):")
    if i["threshold"] >= NEVER:
        b = i["best"]
        lines.append(f"no threshold reaches precision {i['target_precision']}; the saved threshold, above every score, names no animal"
                     f" ({describe_new_threshold(i)}). The best precision, {b['precision']:.3f}, comes at {b['threshold']:.3f} ({describe_outcome(b)}); "
                     f"--target-precision below it sets a threshold.")
    else:
        lines.append(f"saved threshold {i['threshold']:.3f} for precision {i['target_precision']}; {describe_new_threshold(i)}"
                     f" ({describe_outcome(i)}).")
    lines += ["", "| threshold on | average precision of naming | best precision | at score >= | named right | named wrong | not sure |"
                  " called new | missing animals named | missing animals called new |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rule, r in quality["identify by rule"].items():
        b = r["best"]
        lines.append(f"| {DECISION_WORDS[rule]}{' (saved)' if rule == i['decision'] else ''} | {r['average_precision']:.3f} |"
                     f" {b['precision']:.3f} | {b['threshold']:.3f} | {b['known_named_right']:.1%} | {b['known_named_wrong']:.1%} |"
                     f" {b['known_not_sure']:.1%} | {b['known_called_new']:.1%} | {b['new_named']:.1%} | {b['new_called_new']:.1%} |")
    return "\n".join(lines)
