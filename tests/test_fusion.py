"""Fusion: calibrators, quality measures, re-ranking, and the engine chain on real images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spotmatch.errors import SpotmatchError
from spotmatch.evaluation.metrics import retrieval_metrics
from spotmatch.fusion.calibration import FusionModel, keep_shortlist_first
from spotmatch.fusion.features import GLOBAL_FEATURES, LOCAL_FEATURES, pair_features
from spotmatch.fusion.quality import expected_calibration_error, threshold_for_precision
from spotmatch.fusion.rerank import k_reciprocal_rerank, query_expansion


def synthetic_pairs(n: int = 4000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.2
    table = pd.DataFrame({
        "cosine": np.where(labels, 0.6, 0.3) + 0.15 * rng.normal(size=n),
        "global_rank": rng.integers(0, 40, n),
        "matches": rng.integers(20, 200, n),
        "inliers": np.where(labels, rng.poisson(40, n), rng.poisson(6, n)).astype(float),
    })
    table["inlier_ratio"] = table["inliers"] / table["matches"]
    table["local_score"] = table["inliers"] * rng.uniform(0.3, 0.9, n)  # each inlier's confidence in (0, 1)
    table.loc[table["global_rank"] >= 20, ["matches", "inliers", "inlier_ratio", "local_score"]] = np.nan  # outside the shortlist
    return table, labels.astype(int)


def test_missing_local_evidence_is_explicit():
    table, _ = synthetic_pairs(50)
    features = pair_features(table)
    assert (features["has_local"] == table["inliers"].notna()).all()
    assert features.loc[~features["has_local"], "log_inliers"].isna().all()  # never a silent zero


def test_fusion_is_calibrated_and_round_trips(tmp_path):
    table, labels = synthetic_pairs()
    fit_rows = np.arange(len(table)) < 3000
    model = FusionModel.new(embedder_id="emb-1", local_stage="rootsift-x", shortlist_k=20).fit(pair_features(table[fit_rows]), labels[fit_rows])
    probability = model.predict_proba(pair_features(table[~fit_rows]))
    assert expected_calibration_error(probability, labels[~fit_rows]) < 0.05
    # More verified matches on the coat mean "same cat" (inliers and their summed confidence rise together).
    shortlisted = {"cosine": 0.45, "global_rank": 3, "matches": 100}
    weak = pd.DataFrame([{**shortlisted, "inliers": 6, "inlier_ratio": 0.06, "local_score": 3.6}])
    strong = pd.DataFrame([{**shortlisted, "inliers": 40, "inlier_ratio": 0.4, "local_score": 24.0}])
    assert model.predict_proba(pair_features(strong))[0] > model.predict_proba(pair_features(weak))[0] + 0.3
    model.decision = "margin"
    path = model.save(tmp_path / "fusion.json")
    loaded = FusionModel.load(path, embedder_id="emb-1", local_stage="rootsift-x")
    np.testing.assert_allclose(loaded.predict_proba(pair_features(table)), model.predict_proba(pair_features(table)))
    with pytest.raises(SpotmatchError, match="calibrated for embedder 'emb-1', not 'emb-2'"):
        FusionModel.load(path, embedder_id="emb-2")
    assert FusionModel.load(path, shortlist_k=20).shortlist_k == 20
    with pytest.raises(SpotmatchError, match="re-scoring 20 images per query, not 100"):
        FusionModel.load(path, shortlist_k=100)
    payload = json.loads(path.read_text())
    older = {key: value for key, value in payload.items() if key not in ("decision", "shortlist_k")} | {"version": 1, "threshold": 1.0}
    (tmp_path / "older.json").write_text(json.dumps(older))
    # version 1 had no rule: its threshold is on the best probability; before version 4 no shortlist was recorded;
    # before version 5 a threshold of 1.0 meant "never name", which a probability of exactly 1.0 reached
    assert (FusionModel.load(path).decision, FusionModel.load(tmp_path / "older.json").decision) == ("margin", "best")
    assert FusionModel.load(tmp_path / "older.json").threshold > 1.0
    assert FusionModel.load(tmp_path / "older.json", shortlist_k=100).shortlist_k is None
    payload["version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(payload))
    with pytest.raises(SpotmatchError, match="known version"):
        FusionModel.load(tmp_path / "future.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(SpotmatchError, match="known version"):
        FusionModel.load(tmp_path / "list.json")
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04\x80\xff binary")  # a checkpoint passed as --fusion
    with pytest.raises(SpotmatchError, match="best.pt: not a readable calibration file"):
        FusionModel.load(tmp_path / "best.pt")
    with pytest.raises(SpotmatchError, match="is a folder; pass the fusion.json inside it"):
        FusionModel.load(tmp_path)


def test_identity_balance_weighs_every_animal_the_same():
    from spotmatch.engine.calibrate import CalibrateConfig, pair_weights

    # Query 0 shows "big" (90 gallery images of big, 10 of small); query 1 shows "small" (same gallery).
    gallery = ["big"] * 90 + ["small"] * 10
    frame = pd.DataFrame({"q": [0] * 100 + [1] * 100, "query_identity": ["big"] * 100 + ["small"] * 100,
                          "gallery_identity": gallery * 2})
    weights = pd.Series(pair_weights(frame, "identity"))
    per_query_animal = weights.groupby(frame["query_identity"]).sum()
    assert per_query_animal["big"] == pytest.approx(per_query_animal["small"])
    per_gallery_animal = weights[frame["q"] == 0].groupby(frame["gallery_identity"]).sum()
    assert per_gallery_animal["big"] == pytest.approx(per_gallery_animal["small"])
    assert weights.mean() == pytest.approx(1.0) and (pair_weights(frame, "none") == 1).all()
    # Lists of unequal make-up, as in a view or a shortlist: "big" has two queries, one with a long list.
    views = pd.DataFrame({"q": [0] * 10 + [1] * 2 + [2] * 4, "query_identity": ["big"] * 12 + ["small"] * 4,
                          "gallery_identity": ["big"] * 8 + ["small"] * 2 + ["big", "small"] + ["big", "small", "other", "other"]})
    view_weights = pd.Series(pair_weights(views, "identity"))
    assert np.ptp(view_weights.groupby(views["query_identity"]).sum()) == pytest.approx(0)
    assert view_weights[views["q"] == 0].sum() == pytest.approx(view_weights[views["q"] == 1].sum())
    assert np.ptp(view_weights[views["q"] == 2].groupby(views["gallery_identity"]).sum()) == pytest.approx(0)
    with pytest.raises(SpotmatchError, match="--balance per-photo: unknown weighting"):
        CalibrateConfig(balance="per-photo")


def test_a_photo_between_the_two_thresholds_is_not_sure_rather_than_new():
    """"new individual" makes a team `confirm --new`: a photo whose best animal leads too little to name it, but too much
    for the calibration to call it new, is said to be either, its best animal named."""
    from spotmatch.catalogue.service import Candidate, QueryResult

    best = Candidate("Cat1", 0.30, 0.8, 0, 7, "a.jpg")
    verdict = lambda score, new_threshold: QueryResult("q.jpg", "sha", [best], 0.4, decision="margin", decision_score=score,  # noqa: E731
                                                       new_threshold=new_threshold).verdict
    assert verdict(0.45, 0.1) == "match: Cat1"
    assert verdict(0.25, 0.1) == verdict(0.1, 0.1) == "not sure: best candidate Cat1"
    assert verdict(0.05, 0.1) == "new individual"
    assert verdict(0.25, 0.0) == verdict(0.0, 0.0) == "not sure: best candidate Cat1"  # nothing is called new
    assert verdict(0.25, None) == "new individual"  # a calibration file older than version 6: as it was
    assert verdict(float("nan"), 0.1) == "not sure: best candidate Cat1"  # never "new" by accident


def test_identity_balanced_ece_separates_calibration_from_photo_counts():
    # "big" owns 300 pairs (half of them matches), "small" 100 (none): 0.25 is right for an even mix of
    # the two animals, but not for the pairs as counted (3 in 8 are matches).
    labels = np.array([1, 0] * 150 + [0] * 100)
    probability = np.full(len(labels), 0.25)
    balanced_weight = np.array([1 / 3] * 300 + [1.0] * 100)
    assert expected_calibration_error(probability, labels) == pytest.approx(0.125)
    assert expected_calibration_error(probability, labels, weight=balanced_weight) == pytest.approx(0.0)


def test_identify_threshold_counts_photos_of_missing_animals():
    from spotmatch.catalogue.service import QueryResult
    from spotmatch.engine.calibrate import CalibrateConfig, identify_decision

    # best candidate per photo with its animal in the gallery (label: named right) and taken out (never right)
    known = pd.DataFrame({"probability": [0.9, 0.8, 0.7, 0.3], "label": [1, 1, 0, 1]})
    new = pd.DataFrame({"probability": [0.75, 0.2, 0.1, 0.05], "label": [0, 0, 0, 0]})
    # without missing animals, p >= 0.3 names 3 of 4 right (precision 0.75 >= 0.65) ...
    assert identify_decision(known, new, 0.65, new_share=0.0)["threshold"] == pytest.approx(0.3)
    # ... but when half the photos show missing animals, the one scored 0.75 must stay unnamed
    decision = identify_decision(known, new, 0.65, new_share=0.5)
    assert decision["threshold"] == pytest.approx(0.75)
    # Called new only below 0.7: under it 3 of the 4 photos are of missing animals (precision 0.75 >= 0.65); with the
    # known photo scored 0.7 too, 3 of 5 (0.6). That photo, between the two thresholds, is "not sure".
    assert (decision["new_threshold"], decision["new_precision"]) == pytest.approx((0.7, 0.75))
    assert (decision["known_named_right"], decision["known_named_wrong"], decision["known_not_sure"], decision["known_called_new"],
            decision["new_named"], decision["new_called_new"]) == pytest.approx((0.5, 0.0, 0.25, 0.25, 0.25, 0.75))
    assert (decision["best"]["threshold"], decision["best"]["precision"]) == pytest.approx((0.8, 1.0))  # the lowest at the top
    # Never right: never name, not even a photo whose best individual leads by a whole 1.0 (isotonic reaches it).
    never = identify_decision(known.assign(label=0, probability=[1.0, 0.8, 0.7, 0.3]), new, 0.65, new_share=0.5)
    assert never["threshold"] > 1.0 and never["known_named_wrong"] == never["new_named"] == 0.0
    result = QueryResult("q.jpg", "sha", [], never["threshold"], decision="margin", decision_score=1.0)
    assert result.verdict == "new individual"
    # No cut calls only missing animals new at 0.65 when each known photo scores below every missing one's: nothing is
    # called new, so a photo the model cannot place is left to the team rather than entered twice.
    # A target met exactly in counts is met (3 of the 4 photos under 0.9 are of missing animals: 0.75), as for naming;
    # with no missing animal in the mix, "new" is never right.
    exact_known, exact_new = pd.DataFrame({"probability": [0.3, 0.9], "label": [1, 1]}), pd.DataFrame({"probability": [0.1, 0.2, 0.4]})
    assert identify_decision(exact_known, exact_new, 0.75, new_share=0.6)["new_threshold"] == pytest.approx(0.9)
    assert identify_decision(exact_known, exact_new, 0.75, new_share=0.0)["new_threshold"] == 0.0
    unsure = identify_decision(known.assign(probability=[0.04, 0.03, 0.02, 0.01]), new, 0.65, new_share=0.5)
    assert unsure["new_threshold"] == 0.0 and unsure["known_called_new"] == unsure["new_called_new"] == 0.0
    assert unsure["known_not_sure"] + unsure["known_named_right"] + unsure["known_named_wrong"] == pytest.approx(1.0)
    with pytest.raises(SpotmatchError, match="--new-share 1.0: must be at least 0 and below 1"):
        CalibrateConfig(new_share=1.0)


def test_identify_decides_on_the_lead_over_the_next_individual():
    from spotmatch.engine.calibrate import CalibrateConfig, decision_per_query

    # query 0: two images of A (the right animal) and one of B close behind; query 1: A alone in its shortlist,
    # with a stranger C outside it (rank 2, k = 2) that the catalogue would never score
    frame = pd.DataFrame({"q": [0, 0, 0, 1, 1, 1], "gallery_identity": ["A", "A", "B", "B", "B", "C"],
                          "global_rank": [0, 1, 2, 0, 1, 2], "label": [1, 1, 0, 1, 1, 0]})
    probability = np.array([0.8, 0.7, 0.75, 0.6, 0.5, 0.9])
    margin = decision_per_query(frame, probability, shortlist_k=3, decision="margin").set_index("q")
    assert margin.loc[0, "probability"] == pytest.approx(0.05) and margin.loc[0, "label"] == 1  # A over B: 0.8 - 0.75
    best = decision_per_query(frame, probability, shortlist_k=2, decision="best").set_index("q")
    assert best["probability"].tolist() == pytest.approx([0.8, 0.6])  # C (rank 2) is outside the shortlist
    assert decision_per_query(frame, probability, shortlist_k=2, decision="margin").set_index("q").loc[1, "probability"] == \
        pytest.approx(0.6)  # no other individual shortlisted: the whole probability is the lead
    with pytest.raises(SpotmatchError, match="--decision ratio: unknown rule; use margin or best"):
        CalibrateConfig(decision="ratio")


def test_a_worse_global_rank_never_raises_the_probability():
    # Two kinds of query: of an animal with one gallery photo (its match tops the list), and of an animal
    # that owns most of the gallery (matches at every rank, and many photos alike, so high cosines far down
    # the list). Pooled, at a given cosine a worse rank goes with more matches; a free fit learns that and
    # turns the order within a list upside down.
    rng = np.random.default_rng(3)
    rank = np.tile(np.arange(200), 40)
    popular = np.repeat(np.arange(40) % 2 == 0, 200)
    cosine = np.where(popular, 0.9 - 0.001 * rank, 0.6 - 0.002 * rank) + 0.02 * rng.normal(size=len(rank))
    labels = np.where(popular, rng.random(len(rank)) < 0.7, rank == 0).astype(int)
    table = pd.DataFrame({"cosine": cosine, "global_rank": rank})
    features = pair_features(table)
    one_list = pair_features(pd.DataFrame({"cosine": 0.8 - 0.002 * np.arange(200), "global_rank": np.arange(200)}))
    free = FusionModel.new(monotone=False).fit(features, labels)
    assert free.global_all.coef[GLOBAL_FEATURES.index("log_rank")] > 0  # what the constraint is there for
    assert (np.diff(free.predict_proba(one_list, local_stage=False)) > 0).any()
    model = FusionModel.new().fit(features, labels)
    assert model.global_all.coef[GLOBAL_FEATURES.index("log_rank")] < 0
    assert (np.diff(model.predict_proba(one_list, local_stage=False)) < 0).all()  # the embedding's order, no ties


def test_unchecked_pairs_stay_below_their_querys_shortlist_in_order():
    probability = np.array([0.50, 0.05, 0.20, 0.10, 0.01, 0.90, 0.30])
    shortlisted = np.array([1, 1, 0, 0, 0, 1, 0], bool)
    query = np.array(["a", "a", "a", "a", "a", "b", "b"])
    kept = keep_shortlist_first(probability, shortlisted, query)
    assert kept[shortlisted].tolist() == probability[shortlisted].tolist()  # the checked pairs keep their probability
    assert kept[2:5].max() < 0.05 and kept[2] > kept[3] > kept[4]  # below query a's lowest checked pair, in order
    assert kept[6] == 0.30  # query b's unchecked pair was already below its shortlist

    floored = probability.copy()
    floored[1] = 0.0  # an isotonic calibrator's floor: the unchecked pairs keep their order, not one tie at 0
    kept = keep_shortlist_first(floored, shortlisted, query)
    assert kept[2] > kept[3] > kept[4] > 0 and kept[2:5].max() < 1e-8 and kept[0] == 0.50
    floored[1] = 1e-12  # tiny but not 0 (a saturated logistic): still nothing unchecked above it
    kept = keep_shortlist_first(floored, shortlisted, query)
    assert kept[2:5].max() < 1e-12 and kept[2] > kept[3] > kept[4]
    alone = keep_shortlist_first(np.array([0.3, 0.2]), np.array([False, False]), np.array(["c", "c"]))
    assert alone.tolist() == [0.3, 0.2]  # a query with no checked pair keeps its probabilities


def headroom_on_synthetic_lists(cosine_signal: float, seed: int = 0) -> dict:
    """40 queries of 8 animals against 60 gallery photos. Each query's shortlist (its 20 best cosines) holds
    its matches; within it the local score tells matches apart weakly, the cosine by `cosine_signal` only."""
    from spotmatch.engine.calibrate import local_only_order, mixing_headroom
    from spotmatch.evaluation.metrics import retrieval_metrics

    rng = np.random.default_rng(seed)
    query_ids, gallery_ids = rng.integers(0, 8, 40), np.repeat(np.arange(8), 8)[:60]
    q, g = np.nonzero(np.ones((40, 60), bool))
    label = query_ids[q] == gallery_ids[g]
    shortlisted = np.zeros(len(q), bool)
    for query in range(40):  # the 8 or fewer matches and non-matches drawn at random, 20 in all
        rows = np.flatnonzero(q == query)
        shortlisted[rows[label[rows]]] = True
        shortlisted[rng.choice(rows[~label[rows]], 20 - label[rows].sum(), replace=False)] = True
    cosine = np.where(shortlisted, 0.5 + 0.1 * rng.random(len(q)) + cosine_signal * label * rng.random(len(q)), 0.4 * rng.random(len(q)))
    plain = pd.DataFrame({"q": q, "g": g, "cosine": cosine, "local_score": rng.poisson(5 + 3 * label).astype(float)})

    def evaluate(values):
        matrix = np.full((40, 60), -np.inf)
        matrix[q, g] = values
        return {"all": retrieval_metrics(matrix, query_ids, gallery_ids)}

    return mixing_headroom(plain, shortlisted, evaluate(local_only_order(plain, shortlisted)), evaluate)["all"]


def test_headroom_finds_what_the_cosine_adds_to_the_shortlist():
    """Where the cosine orders the shortlist better than a weak local score, re-weighting lifts local only by a
    lot and puts weight on the cosine; where it only chose the shortlist, the bound stays at local only."""
    informative, uninformative = headroom_on_synthetic_lists(0.1), headroom_on_synthetic_lists(0.0)
    assert informative["gain"] > 0.05 and informative["weight"] >= 0.75
    assert 0 <= uninformative["gain"] < 0.01


def test_sample_weights_change_the_fit():
    table, labels = synthetic_pairs(seed=2)
    features = pair_features(table)
    weights = np.where(labels == 1, 5.0, 1.0)  # weighing positives up must raise the predicted rate
    plain = FusionModel.new().fit(features, labels).predict_proba(features).mean()
    weighted = FusionModel.new().fit(features, labels, weights).predict_proba(features).mean()
    assert weighted > plain + 0.05


def test_isotonic_option_and_threshold():
    table, labels = synthetic_pairs(seed=1)
    model = FusionModel.new("isotonic").fit(pair_features(table), labels)
    probability = model.predict_proba(pair_features(table))
    assert probability.min() >= 0 and probability.max() <= 1
    logistic = FusionModel.new().fit(pair_features(table), labels).predict_proba(pair_features(table))
    assert len(np.unique(probability)) < 0.1 * len(np.unique(logistic))  # a step function, not the logistic curve
    threshold = threshold_for_precision(probability, labels, 0.9)
    assert labels[probability >= threshold].mean() >= 0.9
    next_lower = probability[probability < threshold].max()  # the lowest such threshold: one step down falls short
    assert labels[probability >= next_lower].mean() < 0.9


def test_a_precision_exactly_at_the_target_reaches_it_with_weights():
    """Weighted precisions are float sums: 9 of 10 right is 0.9 in counts, and must not become "never"."""
    probability = np.r_[np.full(10, 0.9), np.full(61, 0.1)]
    labels = np.r_[np.ones(9), np.zeros(62)].astype(int)
    assert threshold_for_precision(probability, labels, 0.9) == pytest.approx(0.9)
    assert threshold_for_precision(probability, labels, 0.9, np.full(71, 0.5 / 71)) == pytest.approx(0.9)


def test_tied_individuals_are_decided_against_the_query():
    """Two individuals at one probability: the measured decision takes the wrong one, whatever the gallery's order,
    as every ranking metric here breaks ties."""
    from spotmatch.engine.calibrate import decision_per_query

    frame = pd.DataFrame({"q": [0, 0], "g": [0, 1], "global_rank": [0, 1], "gallery_identity": ["A", "B"], "label": [1, 0]})
    for order in (frame, frame.iloc[::-1].reset_index(drop=True)):
        assert decision_per_query(order, np.array([0.97, 0.97]), 20, "best")["label"].tolist() == [0]


def test_rerankers_put_same_cluster_first():
    """Noise high enough that plain cosine misplaces some of a cluster: both re-rankers exist to recover
    them from the gallery's own structure, so each must rank the clusters better than the cosine it starts from."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 16))
    gallery = np.repeat(centres, 5, axis=0) + 0.9 * rng.normal(size=(30, 16))
    queries = centres + 0.9 * rng.normal(size=(6, 16))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.repeat(np.arange(6), 5)

    def mean_ap(similarity):
        return retrieval_metrics(similarity, np.arange(6), truth)["map"]

    cosine = mean_ap(queries @ gallery.T)
    assert cosine < 0.85  # else there is nothing left to recover
    assert mean_ap(query_expansion(queries, gallery)) >= cosine + 0.02
    assert mean_ap(k_reciprocal_rerank(queries, gallery, k1=6, k2=3)) >= cosine + 0.08


def test_query_expansion_scores_a_query_the_same_in_any_file():
    """A file split by query, or Ray's shards of whole queries, must give each row the same score to the last bit."""
    from spotmatch.fusion.rerank import rerank_pairs

    rng = np.random.default_rng(5)
    embeddings = rng.normal(size=(40, 64)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    query_pos = np.repeat(np.arange(8), 12)
    gallery_pos = np.concatenate([rng.choice(np.arange(8, 40), 12, replace=False) for _ in range(8)])
    whole = rerank_pairs("qe", embeddings, query_pos, gallery_pos)
    for half in (query_pos < 3, query_pos >= 3):
        np.testing.assert_array_equal(rerank_pairs("qe", embeddings, query_pos[half], gallery_pos[half]), whole[half])


def test_k_reciprocal_keeps_each_querys_distance_order():
    # With lambda 1 the re-ranked distance is the original one, scaled per query (Zhong et al. scale each
    # row by its own largest distance): every query's order must stay the cosine's.
    rng = np.random.default_rng(2)
    queries, gallery = rng.normal(size=(8, 16)), rng.normal(size=(40, 16))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    reranked = k_reciprocal_rerank(queries, gallery, lambda_value=1.0)
    np.testing.assert_array_equal(np.argsort(-reranked, axis=1), np.argsort(-(queries @ gallery.T), axis=1))


def test_k_reciprocal_counts_each_image_once_where_the_gallery_holds_the_queries():
    """In an open set the gallery is the queries themselves: each image must enter the neighbour graph once, as
    it does when each query is re-ranked against the others alone, not twice (its own copy its closest
    neighbour, every neighbour filling two of k1's places)."""
    rng = np.random.default_rng(7)
    animal = rng.integers(0, 12, 80)
    photos = rng.normal(size=(12, 16))[animal] + 0.9 * rng.normal(size=(80, 16))
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    open_set = k_reciprocal_rerank(photos, photos)
    for query in (0, 41, 79):
        others = np.delete(np.arange(80), query)
        np.testing.assert_allclose(open_set[query, others], k_reciprocal_rerank(photos[[query]], photos[others])[0], atol=1e-9)


def test_query_expansion_uses_only_allowed_neighbours():
    # A query with one allowed gallery image is expanded by that image alone, as in a file of its own rows.
    rng = np.random.default_rng(3)
    photos = rng.normal(size=(6, 8))
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    allowed = ~np.eye(6, dtype=bool)
    allowed[0] = False
    allowed[0, 3] = True
    expanded = query_expansion(photos, photos, allowed=allowed)
    np.testing.assert_allclose(expanded[0, 3], query_expansion(photos[:1], photos[3:4])[0, 0], rtol=1e-6)


def test_query_expansion_leaves_the_query_out_of_its_own_neighbours():
    # Open set: the gallery is the queries themselves. Expanding a query with itself would only count it
    # twice; with the pair disallowed, its expansion is the one against the gallery without it.
    rng = np.random.default_rng(1)
    photos = rng.normal(size=(12, 8))
    photos /= np.linalg.norm(photos, axis=1, keepdims=True)
    not_self = ~np.eye(12, dtype=bool)
    expanded = query_expansion(photos, photos, allowed=not_self)
    for i in (0, 5):
        others = np.delete(np.arange(12), i)
        np.testing.assert_allclose(expanded[i, others], query_expansion(photos[i:i + 1], photos[others])[0], rtol=1e-5)
    assert not np.allclose(expanded[0, 1:], query_expansion(photos, photos)[0, 1:])


def test_calibrate_then_score_pairs_through_the_engine(tmp_path, snow_subset_csv, tiny_checkpoint):
    """The whole chain on real frames: calibrate on held-out encounters, then score pairs with it."""
    from test_cli import run_cli

    out_dir = tmp_path / "calibration"
    result = run_cli("calibrate", "--data", snow_subset_csv, "--checkpoint", tiny_checkpoint, "--out-dir", out_dir,
                     "--top-k", "5", "--no-compare-rerankers", "--cache-dir", tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert (out_dir / "reliability.png").stat().st_size > 1000
    report = (out_dir / "calibration.md").read_text()
    assert "| fused | all |" in report and "| fused | global only | all |" in report  # fused minus global, with its interval
    assert "| fused, shortlist first | local only (top-5 re-ranked) | all |" in report
    assert "| fused | local only (top-5 re-ranked) | cross-station, searched within |" in report
    assert "| cross-station, searched within, top-5 pairs |" in report  # the restricted search's calibration
    assert "| whose animal the cross-station view holds | whole gallery |" in report  # identify searched both ways
    assert "| query animal |" in report
    assert "Headroom within the shortlist" in report and "| all | " in report.split("Headroom within the shortlist")[1]
    fusion = FusionModel.load(out_dir / "fusion.json")
    # 12 queries of 3 cats fit no meaningful weights; the direction of the evidence is checked on synthetic
    # pairs above. Here: the file names the features it was fit on.
    assert fusion.with_local.feature_names == LOCAL_FEATURES and fusion.global_only.feature_names == GLOBAL_FEATURES

    table = pd.read_csv(snow_subset_csv)
    pairs = pd.DataFrame({"row_id": range(len(table)), "query_image": table["filename"].iloc[0],
                          "gallery_image": table["filename"]})
    (tmp_path / "images").symlink_to(snow_subset_csv.parent / "images")
    pairs.to_csv(tmp_path / "test.csv", index=False)
    scored = run_cli("score-pairs", tmp_path / "test.csv", "--checkpoint", tiny_checkpoint, "--fusion", out_dir / "fusion.json",
                     "--top-k", "5", "--out", tmp_path / "submission.csv", "--evidence-out", tmp_path / "evidence.csv",
                     "--cache-dir", tmp_path / "cache")
    assert scored.returncode == 0, scored.stderr
    evidence = pd.read_csv(tmp_path / "evidence.csv")
    assert evidence["inliers"].notna().sum() == 5  # only the query's top-5 were matched
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert submission["similarity"].between(0, 1).all()
    checked = evidence["inliers"].notna().to_numpy()
    assert np.allclose(submission["similarity"], fusion.predict_proba(pair_features(evidence)))  # by default, the calibrated probability

    # `explain` at a pair's global rank draws the probability score-pairs gave it, inside the shortlist and past it.
    from spotmatch.engine.engine import Engine, EngineConfig, explain
    from spotmatch.global_embed.embed import EmbedConfig

    engine = Engine.from_files(tiny_checkpoint, out_dir / "fusion.json", EngineConfig(cache_dir=str(tmp_path / "cache")),
                               EmbedConfig(device="cpu", num_workers=0, cache_dir=str(tmp_path / "cache"), progress=False))
    images = snow_subset_csv.parent / "images"
    for row in (np.flatnonzero(checked & (evidence["global_rank"] > 0))[0], np.flatnonzero(~checked)[0]):
        drawn = explain(engine, images / pairs["query_image"].iloc[row], images / pairs["gallery_image"].iloc[row],
                        tmp_path / f"explain-{row}.png", global_rank=int(evidence["global_rank"].iloc[row]))
        assert drawn.scores.probability == pytest.approx(submission["similarity"].iloc[row], abs=1e-6)
        assert f"at global rank {evidence['global_rank'].iloc[row]}" in drawn.scores.text()
        # past the shortlist the drawn keypoints did not count, and the drawing says so
        assert ("global evidence only" in drawn.scores.text()) == (not checked[row])

    # A calibration whose pairs outside the shortlist all score above the shortlisted ones, as pooled fits
    # do on the snow leopards: --shortlist-first puts them back below, in their order.
    overtaking = json.loads((out_dir / "fusion.json").read_text())
    overtaking["global_only"]["intercept"] = 10.0
    (tmp_path / "overtaking.json").write_text(json.dumps(overtaking))
    reordered = run_cli("score-pairs", tmp_path / "test.csv", "--checkpoint", tiny_checkpoint, "--fusion", tmp_path / "overtaking.json",
                        "--top-k", "5", "--out", tmp_path / "reordered.csv", "--cache-dir", tmp_path / "cache", "--shortlist-first")
    assert reordered.returncode == 0, reordered.stderr
    similarity = pd.read_csv(tmp_path / "reordered.csv")["similarity"].to_numpy()
    calibrated = FusionModel.load(tmp_path / "overtaking.json").predict_proba(pair_features(evidence))
    assert calibrated[~checked].min() > calibrated[checked].min()
    assert similarity[checked].tolist() == pytest.approx(calibrated[checked].tolist(), abs=1e-4)  # evidence.csv is rounded
    assert similarity[~checked].max() < similarity[checked].min()
    cosine = evidence["cosine"].to_numpy()
    assert (np.argsort(-similarity[~checked]) == np.argsort(-cosine[~checked])).all()  # the embedding's order kept

    refused = run_cli("score-pairs", tmp_path / "test.csv", "--checkpoint", tiny_checkpoint, "--local",
                      "--out", tmp_path / "other.csv")
    assert refused.returncode == 2 and "needs a calibration file" in refused.stderr


def test_identify_threshold_is_set_on_photos_whose_animal_the_gallery_holds(tmp_path, snow_subset_csv, tiny_checkpoint):
    """Open set: an animal with one held-out photo has no match in the gallery. Its photo cannot be named
    right, so it must not count among the photos with their animal in the gallery."""
    from spotmatch.data.tables import load_dataset
    from spotmatch.engine import calibrate as calibration
    from spotmatch.engine.engine import EngineConfig
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    dataset = load_dataset(snow_subset_csv)
    identity = dataset.table["identity"]
    lone = identity.index[identity == "Cat21"][0]
    split = pd.Series(np.where((identity != "Cat21") | (identity.index == lone), "val", "train"), index=identity.index)
    cache = str(tmp_path / "cache")
    embedder = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(device="cpu", num_workers=0, cache_dir=cache, progress=False))
    result = calibration.main(dataset, split, "identity", embedder, EngineConfig(shortlist_k=3, cache_dir=cache),
                              calibration.CalibrateConfig(rerankers=(), folds=2), tmp_path)
    with_match = int((identity != "Cat21").sum())
    assert result["quality"]["identify"]["known_photos"] == with_match == result["quality"]["identify"]["new_photos"]


def test_score_pairs_with_query_expansion_uses_a_calibration_fit_on_it(tmp_path, snow_subset_csv, tiny_checkpoint):
    """`calibrate --rerank qe` fits on query-expanded similarities; the engine expands each query of a pair
    file over its own rows (so shards of whole queries, as on Ray, score alike) and refuses to mix a file
    fit on one global similarity with another."""
    from spotmatch.catalogue.service import init_catalogue
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.engine import calibrate as calibration
    from spotmatch.engine.engine import Engine, EngineConfig
    from spotmatch.evaluation.run import split_for
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    cache = str(tmp_path / "cache")
    run = EmbedConfig(device="cpu", num_workers=0, cache_dir=cache, progress=False)
    dataset = load_dataset(snow_subset_csv)
    split, split_by, _ = split_for(dataset, SplitConfig(by="identity"), tiny_checkpoint)
    result = calibration.main(dataset, split, split_by, Embedder.from_checkpoint(tiny_checkpoint, run),
                              EngineConfig(shortlist_k=5, cache_dir=cache), calibration.CalibrateConfig(rerankers=(), rerank="qe"), tmp_path)
    fusion = FusionModel.load(result["fusion_path"])
    assert fusion.shortlist_k == 5
    assert fusion.rerank == "qe" and "identify" not in fusion.quality  # the catalogue never uses such a file
    assert "`identify`: not measured" in calibration.format_quality(fusion.quality)

    paths = [str(p) for p in dataset.paths]
    # Every other frame, and for two queries a row with themselves, which must not expand their own query.
    rows = [(q, g) for q in paths for g in paths if q != g] + [(q, q) for q in paths[:2]]
    pairs = pd.DataFrame(rows, columns=["query_image_path", "gallery_image_path"])
    pairs.insert(0, "row_id", np.arange(len(pairs)))
    engine = Engine.from_files(tiny_checkpoint, result["fusion_path"], EngineConfig(shortlist_k=5, rerank="qe", cache_dir=cache), run)
    whole = engine.score_pairs(pairs)
    assert not np.allclose(whole["reranked_similarity"], whole["cosine"])
    np.testing.assert_allclose(whole["similarity"], fusion.predict_proba(pair_features(whole)))

    embeddings = dict(zip(paths, engine.embedder.embed(paths)))
    for query in paths[:3]:
        mine = whole[(pairs["query_image_path"] == query) & (pairs["gallery_image_path"] != query)]
        gallery = np.stack([embeddings[g] for g in pairs.loc[mine.index, "gallery_image_path"]])
        np.testing.assert_allclose(mine["reranked_similarity"], query_expansion(embeddings[query][None], gallery)[0], rtol=1e-5)
        listed = whole[pairs["query_image_path"] == query]
        assert set(listed.nlargest(5, "reranked_similarity").index) == set(listed.index[listed["global_rank"] < 5])  # the shortlist

    first_half = pairs["query_image_path"].isin(paths[: len(paths) // 2])
    by_shard = pd.concat([engine.score_pairs(pairs[first_half]), engine.score_pairs(pairs[~first_half])]).loc[whole.index]
    np.testing.assert_allclose(by_shard["similarity"], whole["similarity"])

    from test_cli import run_cli

    (tmp_path / "images").symlink_to(snow_subset_csv.parent / "images")
    pairs.assign(query_image=[Path(p).name for p in pairs["query_image_path"]], gallery_image=[Path(p).name for p in pairs["gallery_image_path"]])[
        ["row_id", "query_image", "gallery_image"]].to_csv(tmp_path / "test.csv", index=False)
    # No --top-k: the shortlist of 5 the file was fit with, as the engine above used.
    scored = run_cli("score-pairs", tmp_path / "test.csv", "--checkpoint", tiny_checkpoint, "--fusion", result["fusion_path"], "--rerank", "qe",
                     "--out", tmp_path / "submission.csv", "--cache-dir", cache)
    assert scored.returncode == 0, scored.stderr
    assert "local top-5" in scored.stdout
    np.testing.assert_allclose(pd.read_csv(tmp_path / "submission.csv")["similarity"], whole["similarity"], rtol=1e-6)
    longer = run_cli("score-pairs", tmp_path / "test.csv", "--checkpoint", tiny_checkpoint, "--fusion", result["fusion_path"], "--rerank", "qe",
                     "--top-k", "6", "--out", tmp_path / "longer.csv", "--cache-dir", cache)
    assert longer.returncode == 2 and longer.stderr.count("\n") == 1 and "re-scoring 5 images per query, not 6" in longer.stderr
    assert not (tmp_path / "longer.csv").exists()

    with pytest.raises(SpotmatchError, match="re-ranked by 'qe', but this command re-ranks by 'none'"):
        Engine.from_files(tiny_checkpoint, result["fusion_path"], EngineConfig(shortlist_k=5, cache_dir=cache), run)
    with pytest.raises(SpotmatchError, match="re-ranked by 'qe'"):
        init_catalogue(tmp_path / "catalogue", tiny_checkpoint, result["fusion_path"])
    with pytest.raises(SpotmatchError, match="--rerank foo: unknown"):
        EngineConfig(rerank="foo")


def test_k_reciprocal_refuses_what_it_cannot_hold_or_shard(monkeypatch):
    from spotmatch.engine.engine import EngineConfig
    from spotmatch.engine.ray_backend import check_pair_scoring
    from spotmatch.fusion import rerank

    embeddings = np.eye(6, dtype=np.float32)
    query_pos, gallery_pos = np.array([0, 0, 1, 1]), np.array([2, 3, 4, 5])
    assert rerank.rerank_pairs("k-reciprocal", embeddings, query_pos, gallery_pos).shape == (4,)
    monkeypatch.setattr(rerank, "K_RECIPROCAL_MAX_IMAGES", 5)  # 2 queries + 4 gallery images
    with pytest.raises(SpotmatchError, match="the 6 distinct query and gallery images are over 5; use --rerank qe"):
        rerank.rerank_pairs("k-reciprocal", embeddings, query_pos, gallery_pos)
    check_pair_scoring(EngineConfig(rerank="qe"))  # shards of whole queries hold all that query expansion reads
    with pytest.raises(SpotmatchError, match="k-reciprocal needs every image of the file at once"):
        check_pair_scoring(EngineConfig(rerank="k-reciprocal"))


def test_a_view_searched_on_its_own_verifies_its_own_candidates():
    """Every query's best cosines are photos of its own station, whoever they show (a shared background); its
    animal's photos elsewhere rank below them. Filtering the whole gallery's ranking to the cross-station
    view leaves local only no checked pair there; searching that view on its own checks its own top-k."""
    from spotmatch.engine.calibrate import (CalibrateConfig, PairSource, as_matrix, local_only_order, pair_frame, ranks_within,
                                            searched_within_views)
    from spotmatch.evaluation.metrics import retrieval_metrics

    rng = np.random.default_rng(0)
    query_ids, gallery_ids = np.repeat(np.arange(4), 3), np.tile(np.arange(4), 10)
    gallery_elsewhere = np.arange(40) >= 20  # the queries' station holds the first 20 gallery photos
    same = query_ids[:, None] == gallery_ids[None, :]
    cosine = np.where(gallery_elsewhere[None, :], 0.3 + 0.03 * same, 0.8) + 0.1 * rng.random(same.shape)
    evidence = {(q, g): (50.0, 30.0 if same[q, g] else 4.0, 0.5, 30.0 if same[q, g] else 4.0) for q in range(12) for g in range(40)}
    allowed = np.ones(same.shape, bool)
    plain = pair_frame(cosine, ranks_within(cosine, allowed), allowed, 10, evidence, query_ids, gallery_ids)
    cross_station = np.repeat(gallery_elsewhere[None, :], 12, axis=0)

    searched = searched_within_views(plain, PairSource(cosine, evidence, query_ids, gallery_ids, 10),
                                     {"cross-station": (ranks_within(cosine, cross_station), cross_station)}, CalibrateConfig(folds=4))
    view = "cross-station, searched within"
    whole_gallery_local = as_matrix(plain, local_only_order(plain, plain["global_rank"].to_numpy() < 10), same.shape)
    filtered_local = retrieval_metrics(whole_gallery_local, query_ids, gallery_ids, cross_station)["ib_map"]
    searched_local = searched["retrieval"]["local only (top-10 re-ranked)"][view]["ib_map"]
    global_only = searched["retrieval"]["global only"][view]["ib_map"]
    assert filtered_local == pytest.approx(global_only)  # no pair of the view was checked: the cosine's order
    assert searched_local > filtered_local + 0.1
    assert searched["retrieval"]["fused"][view]["ib_map"] > global_only
    assert set(searched["comparisons"]) == {("fused", "global only"), ("fused", "local only (top-10 re-ranked)")}
    assert searched["calibration"][f"{view}, top-10 pairs"]["pairs"] == 12 * 10  # each query's ten best in the view


def test_free_signs_fit_is_scikit_learns_logistic_regression():
    """The calibrators are fit by L-BFGS-B (scikit-learn's LogisticRegression takes no sign bounds) on
    scikit-learn's objective; with every sign free the weights must be scikit-learn's own."""
    from sklearn.linear_model import LogisticRegression

    from spotmatch.fusion.calibration import Calibrator

    table, labels = synthetic_pairs(seed=3)
    shortlisted = table["inliers"].notna().to_numpy()
    features, labels = pair_features(table)[shortlisted], labels[shortlisted]
    weights = np.random.default_rng(3).uniform(0.2, 3.0, len(labels))
    ours = Calibrator(LOCAL_FEATURES).fit(features, labels, weights)
    standardised = (features[list(LOCAL_FEATURES)].to_numpy() - ours.mean) / ours.scale
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(standardised, labels, sample_weight=weights)
    assert ours.coef == pytest.approx(reference.coef_[0], abs=1e-3)
    assert ours.intercept == pytest.approx(reference.intercept_[0], abs=1e-3)


def test_the_engine_matches_inside_the_masks_the_calibration_was_fit_with(tmp_path, snow_subset_csv, tiny_checkpoint):
    """A calibration fit with `--local-masks teacher` records them: the engine (score-pairs, explain, the
    catalogue) matches inside the same masks without being told, and refuses a file fit on other masks."""
    from spotmatch.data.images import load_image
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.engine import calibrate as calibration
    from spotmatch.engine.engine import Engine, EngineConfig
    from spotmatch.evaluation.run import split_for
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    cache = str(tmp_path / "cache")
    run = EmbedConfig(device="cpu", num_workers=0, cache_dir=cache, progress=False)
    dataset = load_dataset(snow_subset_csv)
    split, split_by, _ = split_for(dataset, SplitConfig(by="identity"), tiny_checkpoint)
    embedder = Embedder.from_checkpoint(tiny_checkpoint, run)
    assert embedder.conf.masks != "teacher"
    result = calibration.main(dataset, split, split_by, embedder, EngineConfig(shortlist_k=5, masks="teacher", cache_dir=cache),
                              calibration.CalibrateConfig(rerankers=()), tmp_path)
    fusion = FusionModel.load(result["fusion_path"])
    assert fusion.local_masks == "teacher" and "+masks-teacher-" in fusion.local_stage

    engine = Engine.from_files(tiny_checkpoint, result["fusion_path"], EngineConfig(cache_dir=cache), run)
    assert engine.conf.masks == "teacher" and engine.local.conf_name == fusion.local_stage
    assert any(engine.local.mask_source(load_image(path)) is not None for path in dataset.paths)  # the teacher's, on JPEG frames
    with pytest.raises(SpotmatchError, match="calibrated for local stage .*masks-teacher.*, not 'rootsift-[^']*'; run `spotmatch calibrate`"):
        Engine.from_files(tiny_checkpoint, result["fusion_path"], EngineConfig(masks="alpha", cache_dir=cache), run)

    # `explain` and `match` build the local stage from the same options: the same masks give the same evidence.
    from test_cli import run_cli

    query, gallery = dataset.paths[:2]
    pair = pd.DataFrame({"query_image_path": [str(query)], "gallery_image_path": [str(gallery)]})
    pd.DataFrame({"row_id": ["r"], "query_image": [str(query)], "gallery_image": [str(gallery)]}).to_csv(tmp_path / "pair.csv", index=False)
    explained = run_cli("explain", query, gallery, "--out", tmp_path / "x.png", "--local-masks", "teacher", "--cache-dir", cache)
    matched = run_cli("match", tmp_path / "pair.csv", "--top-k", "0", "--out", tmp_path / "m.csv", "--local-masks", "teacher", "--cache-dir", cache)
    assert explained.returncode == 0 and matched.returncode == 0, explained.stderr + matched.stderr
    assert json.loads((tmp_path / "x.json").read_text())["settings"] == fusion.local_stage
    expected = engine.local.score_pairs(pair).iloc[0]
    assert pd.read_csv(tmp_path / "m.csv")[["matches", "inliers"]].iloc[0].tolist() == expected[["matches", "inliers"]].tolist()


def test_a_damaged_calibration_file_is_refused_in_one_line_naming_its_key(tmp_path):
    """Each hand edit a tester made to a calibration file once loaded and wrote NaN or 5.0 similarities, or
    stopped with a traceback; each is refused when loading instead, and the submission writer refuses
    such similarities should anything else produce them."""
    from spotmatch.engine.scoring import write_submission

    table, labels = synthetic_pairs()
    valid = {}
    for method in ("logistic", "isotonic"):
        model = FusionModel.new(method, embedder_id="emb-1", local_stage="rootsift-x", shortlist_k=20, decision="margin")
        valid[method] = json.loads(model.fit(pair_features(table), labels).save(tmp_path / f"{method}.json").read_text())
    missing = object()
    cases = [  # (the valid file it edits, section or None for the top level, key, value; missing: the key deleted)
        ("logistic", "with_local", "coef", [float("nan")] + valid["logistic"]["with_local"]["coef"][1:]),
        ("logistic", "global_all", "scale", [0.0, 0.0]),
        ("logistic", "global_only", "isotonic", [[0, 1], [5, 7]]),
        ("isotonic", "global_only", "isotonic", [[0, 1], [5, 7]]),
        ("isotonic", "with_local", "isotonic", [[0, 1], [0.9, 0.2]]),
        ("isotonic", "global_all", "isotonic", [[0, float("inf")], [0.1, 0.2]]),
        ("logistic", None, "embedder_id", missing),
        ("logistic", None, "threshold", missing),
        ("logistic", None, "global_all", missing),
        ("logistic", None, "threshold", "0.4"),
        ("logistic", "with_local", "coef", [1.0, 2.0]),
        ("logistic", "global_only", "coef", "1.0, 2.0"),
        ("logistic", "global_only", "mean", [True, 0.5]),
        ("logistic", "global_all", "intercept", None),
        ("logistic", "global_only", "features", ["cosine", "log_typo"]),
        ("logistic", "global_all", "features", ["cosine", "log_inliers"]),  # no local evidence outside the shortlist
        ("logistic", "with_local", "method", "forest"),
        ("logistic", None, "shortlist_k", "20"),
        ("logistic", None, "shortlist_k", 0),
        ("logistic", None, "rerank", "bogus"),
        ("logistic", None, "new_threshold", 0.9),  # above the threshold (0.5): a photo both named and called new
        ("logistic", None, "new_threshold", -0.1),
        ("logistic", None, "decision", "ratio"),
    ]
    for method, section, key, value in cases:
        payload = json.loads(json.dumps(valid[method]))
        edited = payload if section is None else payload[section]
        if value is missing:
            del edited[key]
        else:
            edited[key] = value
        name = key if section is None else f"{section}.{key}"
        path = tmp_path / f"{method}-{name}.json"
        path.write_text(json.dumps(payload))
        with pytest.raises(SpotmatchError) as refused:
            FusionModel.load(path, embedder_id="emb-1", rerank="none", shortlist_k=20)  # what score-pairs passes
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{path}: `{name}` ") and "spotmatch calibrate" in message, message
    assert "--rerank bogus" not in message  # the last case: no advice to pass the edited value
    for method in valid:
        loaded = FusionModel.load(tmp_path / f"{method}.json", embedder_id="emb-1", rerank="none", shortlist_k=20)
        probability = loaded.predict_proba(pair_features(table))
        assert np.isfinite(probability).all() and probability.min() >= 0 and probability.max() <= 1
    # As the first version wrote it: no decision, re-ranking, shortlist, masks or signs, one local feature fewer.
    first_version = {key: value for key, value in valid["logistic"].items()
                     if key not in ("decision", "rerank", "shortlist_k", "local_masks", "new_threshold")}
    first_version["version"] = 1
    for section in ("with_local", "global_only", "global_all"):
        calibrator = {key: value for key, value in first_version[section].items() if key != "signs"}
        if section == "with_local":
            calibrator = {**calibrator, **{key: calibrator[key][:-1] for key in ("features", "mean", "scale", "coef")}}
        first_version[section] = calibrator
    (tmp_path / "first.json").write_text(json.dumps(first_version))
    old = FusionModel.load(tmp_path / "first.json", embedder_id="emb-1", rerank="none", shortlist_k=20)
    assert (old.decision, old.rerank, old.shortlist_k, old.with_local.feature_names[-1]) == ("best", "none", None, "log_matches")
    assert old.new_threshold is None  # every photo not named is new, as files before version 6 meant

    row_ids = pd.Series(["a", "b"])
    for similarity in ([0.5, float("nan")], [0.5, 5.0], [-0.1, 0.5]):
        with pytest.raises(SpotmatchError, match=r"submission.csv: not written: .* not a number in \[0, 1\]") as refused:
            write_submission(row_ids, np.array(similarity), tmp_path / "submission.csv")
        assert "\n" not in str(refused.value) and not (tmp_path / "submission.csv").exists()
    write_submission(row_ids, np.array([0.0, 1.0]), tmp_path / "submission.csv")
    assert pd.read_csv(tmp_path / "submission.csv")["similarity"].tolist() == [0.0, 1.0]


def calibration_inputs(tmp_path, snow_subset_csv, tiny_checkpoint):
    """The subset, the tiny model's stored split and the model, as `spotmatch calibrate` reads them; caching in tmp_path."""
    from spotmatch.data.splits import SplitConfig
    from spotmatch.data.tables import load_dataset
    from spotmatch.evaluation.run import split_for
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    dataset = load_dataset(snow_subset_csv)
    split, split_by, _ = split_for(dataset, SplitConfig(by="identity"), tiny_checkpoint)
    embedder = Embedder.from_checkpoint(tiny_checkpoint, EmbedConfig(device="cpu", num_workers=0, cache_dir=str(tmp_path / "cache"), progress=False))
    return dataset, split, split_by, embedder


def test_calibrate_refuses_a_folder_in_an_outputs_place_before_any_work(tmp_path, snow_subset_csv, tiny_checkpoint):
    """`mkdir OUT/calibration.md` once failed with IsADirectoryError after all the work, fusion.json already replaced."""
    from test_cli import assert_one_line_error, run_cli

    out_dir = tmp_path / "calibration"
    (out_dir / "calibration.md").mkdir(parents=True)
    result = run_cli("calibrate", "--data", snow_subset_csv, "--checkpoint", tiny_checkpoint, "--out-dir", out_dir,
                     "--top-k", "5", "--no-compare-rerankers", "--cache-dir", tmp_path / "cache")
    assert_one_line_error(result, f"{out_dir / 'calibration.md'}: a folder stands where calibrate writes", "--out-dir")
    assert [path.name for path in out_dir.iterdir()] == ["calibration.md"]  # nothing written beside it
    assert not (tmp_path / "cache").exists()  # refused before a photo was embedded


def test_an_interrupted_calibration_leaves_the_previous_outputs_as_they_were(tmp_path, monkeypatch, snow_subset_csv, tiny_checkpoint):
    """Ctrl-C once left a new fusion.json beside the last run's calibration.md. The three outputs are renamed into
    place together once all are written, fusion.json (what other commands read) last."""
    import os

    from spotmatch.engine import calibrate as calibration
    from spotmatch.engine.engine import EngineConfig

    inputs = calibration_inputs(tmp_path, snow_subset_csv, tiny_checkpoint)
    engine_conf, conf = EngineConfig(shortlist_k=5, cache_dir=str(tmp_path / "cache")), calibration.CalibrateConfig(rerankers=())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = {name: f"the previous run's {name}" for name in calibration.OUTPUTS}
    for name, text in previous.items():
        (out_dir / name).write_text(text)

    def interrupted(curves, out_png):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(calibration, "reliability_diagram", interrupted)  # drawn after the fusion file is fit
        with pytest.raises(KeyboardInterrupt):
            calibration.main(*inputs, engine_conf, conf, out_dir)
    assert {path.name: path.read_text() for path in out_dir.iterdir()} == previous  # no temporary file left either

    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (renamed.append(Path(target)), replace(source, target))[1])
    result = calibration.main(*inputs, engine_conf, conf, out_dir, split_origin="the tiny model's split")
    # (each writer stages its own file too, under a temporary name)
    assert [target.name for target in renamed if target.name in calibration.OUTPUTS] == ["calibration.md", "reliability.png", "fusion.json"]
    assert sorted(path.name for path in out_dir.iterdir()) == sorted(calibration.OUTPUTS)
    assert (out_dir / "calibration.md").read_text().startswith(f"data: {snow_subset_csv} ({len(inputs[0])} images); the tiny model's split;")
    assert result["report_path"] == out_dir / "calibration.md" and FusionModel.load(result["fusion_path"]).shortlist_k == 5


def test_a_calibration_fold_without_a_match_is_refused_naming_the_table_and_the_animal(tmp_path, snow_subset_csv, tiny_checkpoint):
    """Two held-out animals, one with a single photo: cross-validation fits one calibrator on that photo's pairs
    alone, none a match. The error once named neither the table nor the cause."""
    from spotmatch.engine import calibrate as calibration
    from spotmatch.engine.engine import EngineConfig

    dataset, _, _, embedder = calibration_inputs(tmp_path, snow_subset_csv, tiny_checkpoint)
    identity = dataset.table["identity"]
    lone = identity.index[identity == "Cat21"][0]
    split = pd.Series(np.where((identity == "Cat5") | (identity.index == lone), "val", "train"), index=identity.index)
    out_dir = tmp_path / "out"
    # Every pair shortlisted: the fold fit on Cat5 has both kinds whatever the untrained model ranks first.
    with pytest.raises(SpotmatchError) as refused:
        calibration.main(dataset, split, "identity", embedder, EngineConfig(shortlist_k=20, cache_dir=str(tmp_path / "cache")),
                         calibration.CalibrateConfig(rerankers=()), out_dir)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{snow_subset_csv}: no same-individual pair among the pairs of query animal Cat21 (one cross-validation fold)"), message
    assert message.endswith("hold out more photos per animal: a query pairs only with other photos of its own animal"), message
    assert not out_dir.exists()


def test_a_shortlist_holding_one_kind_of_pair_asks_for_a_larger_top_k():
    """Each query's top-k, all of other animals (or all of its own): only a longer shortlist, or other held-out
    photos, gives the local calibrator both kinds of pair."""
    table, labels = synthetic_pairs(400)
    features = pair_features(table)
    shortlisted = features["has_local"].to_numpy(bool)
    for kind, labels_in_shortlists in (("same-individual", 0), ("different-individual", 1)):
        with pytest.raises(SpotmatchError) as refused:
            FusionModel.new().fit(features, np.where(shortlisted, labels_in_shortlists, labels), labels_csv="snow/labels.csv")
        message = str(refused.value)
        assert message.startswith(f"snow/labels.csv: no {kind} pair among the pairs of the held-out queries shortlisted for local matching"), message
        assert "; pass a larger --top-k" in message and "\n" not in message


def test_a_pair_listed_twice_takes_one_place_in_its_querys_list():
    """Both rows of a repeated pair get the same global rank (so the same local evidence and score, never one
    inside the shortlist and one outside), and the next gallery image the next place."""
    from spotmatch.engine.scoring import global_pair_scores

    class StandIn:  # the embedder's one method global_pair_scores uses
        def embed(self, paths):
            vectors = {"q": [1.0, 0.0], "a": [0.9, 0.1], "b": [0.5, 0.5], "c": [0.0, 1.0]}
            return np.array([vectors[path] for path in paths], np.float32)

    pairs = pd.DataFrame({"row_id": range(5), "query_image_path": ["q"] * 5, "gallery_image_path": ["b", "a", "b", "c", "a"]})
    assert global_pair_scores(pairs, StandIn())["global_rank"].tolist() == [1, 0, 1, 2, 0]


def test_one_photo_under_two_names_shares_its_place_whichever_row_comes_first():
    """A copy's cosine equals its original's: ranked by row order, one would sit inside the shortlist and the
    other outside it, their scores apart by whatever the local evidence adds (0.17 in a check)."""
    from spotmatch.engine.calibrate import ranks_within
    from spotmatch.engine.scoring import global_pair_scores

    class StandIn:
        def embed(self, paths):
            vectors = {"q": [1.0, 0.0], "a": [0.9, 0.1], "copy-of-a": [0.9, 0.1], "b": [0.5, 0.5]}
            return np.array([vectors[path] for path in paths], np.float32)

    for order in (["a", "copy-of-a", "b"], ["copy-of-a", "b", "a"]):
        pairs = pd.DataFrame({"row_id": range(3), "query_image_path": ["q"] * 3, "gallery_image_path": order})
        rank_of = dict(zip(order, global_pair_scores(pairs, StandIn())["global_rank"]))
        assert rank_of == {"a": 0, "copy-of-a": 0, "b": 2}
    # calibrate ranks its protocol the same way
    assert ranks_within(np.array([[0.9, 0.9, 0.5]]), np.ones((1, 3), bool)).tolist() == [[0, 0, 2]]
