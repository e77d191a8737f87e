"""Calibrators: logistic regression (default) or isotonic, saved as small JSON files that name their
features, the embedder, extractor and global re-ranking they were fit for, and a format version."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.isotonic import IsotonicRegression

from spotmatch.errors import SpotmatchError
from spotmatch.fusion.features import GLOBAL_FEATURES, LOCAL_FEATURES, MONOTONE
from spotmatch.fusion.quality import NEVER
from spotmatch.fusion.rerank import RERANKERS
from spotmatch.io import write_text_atomic

FUSION_FORMAT = "spotmatch.fusion"
# 2: `decision` (1 had none: its threshold is on the best probability); 3: `rerank` (before: plain cosines);
# 4: `shortlist_k` and `local_masks` (before: not recorded; any shortlist and the embedder's masks were used);
# 5: a threshold that names nothing is quality.NEVER (before: 1.0, which a probability of exactly 1.0 reached);
# 6: `new_threshold` (before: every photo not named was called a new individual)
FUSION_VERSION = 6
MIN_WEIGHT = 1e-3  # smallest magnitude of a sign-constrained weight (standardised feature)
# Only `calibrate` writes these files, so a malformed field was edited or damaged: no repair is safe.
REMAKE_ADVICE = "run `spotmatch calibrate` again to make a new file; do not edit it by hand"
REQUIRED = object()  # FusionFileFields.read's default: the key must be present


def is_finite_number(value: Any) -> bool:
    """A finite JSON number. JSON's `true` is a Python int, but no coefficient; json.loads accepts NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_text(value: Any) -> bool:
    return isinstance(value, str)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_isotonic_map(value: Any) -> bool:
    """[score thresholds, probabilities], equally long and finite, both non-decreasing, probabilities within
    [0, 1]: np.interp reads it as a monotone map and would extrapolate nothing else sensibly."""
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(part, list) and part and all(map(is_finite_number, part)) for part in value)):
        return False
    thresholds, probabilities = (np.array(part, dtype=float) for part in value)
    return (len(thresholds) == len(probabilities) and bool((np.diff(thresholds) >= 0).all())
            and bool((np.diff(probabilities) >= 0).all()) and probabilities.min() >= 0 and probabilities.max() <= 1)


def shown(value: Any) -> str:
    """A field's value for a one-line message: JSON (escapes newlines), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class FusionFileFields:
    """Reads the fields of one calibration file, refusing the first malformed one in one line that names
    the file, the key and what it must hold: checked once, when loading, so that nothing downstream meets
    a NaN coefficient or a probability above 1."""

    path: Path

    def refuse(self, key: str, problem: str) -> NoReturn:
        raise SpotmatchError(f"{self.path}: `{key}` {problem}; {REMAKE_ADVICE}")

    def read(self, table: dict, key: str, expected: str, accepts: Callable[[Any], bool], section: str = "",
             default: Any = REQUIRED) -> Any:
        """table[key] where `accepts` takes it; `default` where the key is absent (an older version's file)."""
        name = f"{section}.{key}" if section else key
        if key not in table:
            if default is REQUIRED:
                self.refuse(name, f"is missing (it must be {expected})")
            return default
        if not accepts(table[key]):
            self.refuse(name, f"must be {expected}, not {shown(table[key])}")
        return table[key]

    def numbers(self, table: dict, key: str, section: str, length: int, positive: bool = False) -> np.ndarray:
        """A list of `length` finite numbers (one per feature), each above 0 if `positive`."""
        expected = f"a list of {length} finite numbers, one per feature" + (", each above 0" if positive else "")
        values = self.read(table, key, expected, lambda value: isinstance(value, list) and len(value) == length
                           and all(map(is_finite_number, value)) and (not positive or all(v > 0 for v in value)), section)
        return np.array(values, dtype=float)


@dataclass(frozen=True)
class FitPairs:
    """The pairs a calibrator is fit on, told in the one-line error when they hold only one kind (a fit needs
    same- and different-individual pairs): the labels CSV they come from, which of its pairs they are, and what
    adds each kind."""

    labels_csv: str
    which_pairs: str
    add_same: str
    add_different: str

    def refuse(self, labels: np.ndarray) -> NoReturn:
        missing, fix = ("same-individual", self.add_same) if not labels.any() else ("different-individual", self.add_different)
        raise SpotmatchError(f"{self.labels_csv}: no {missing} pair among {self.which_pairs}, and calibration needs both kinds; {fix}")


LABELLED_PAIRS = FitPairs("calibration", "the labelled pairs", "add labelled data", "add labelled data")


class Calibrator:
    """Probability of "same individual" from a few features. Logistic regression on standardised
    features, each weight named in `signs` kept to its sign; with method="isotonic", a monotone map of the
    logistic score (fits curved reliability)."""

    def __init__(self, feature_names: tuple[str, ...], method: str = "logistic", regularisation: float = 1.0,
                 signs: dict[str, int] | None = None):
        if method not in ("logistic", "isotonic"):
            raise SpotmatchError(f"unknown calibration method '{method}'; use logistic or isotonic")
        self.feature_names, self.method, self.regularisation = tuple(feature_names), method, regularisation
        self.signs = {name: sign for name, sign in (signs or {}).items() if name in self.feature_names}
        self.mean = self.scale = self.coef = None
        self.intercept = 0.0
        self.isotonic: tuple[list[float], list[float]] | None = None

    def _matrix(self, X: pd.DataFrame) -> np.ndarray:
        return X[list(self.feature_names)].to_numpy(dtype=float)

    def _score(self, X: pd.DataFrame) -> np.ndarray:
        return ((self._matrix(X) - self.mean) / self.scale) @ self.coef + self.intercept

    def fit(self, X: pd.DataFrame, y: np.ndarray, sample_weight: np.ndarray | None = None,
            pairs: FitPairs | None = None) -> "Calibrator":
        """`pairs`: what X's pairs are, for the error when they lack a kind (default: labelled pairs)."""
        y = np.asarray(y, dtype=int)
        if len(np.unique(y)) < 2:
            (pairs or LABELLED_PAIRS).refuse(y)
        matrix = self._matrix(X)
        self.mean, self.scale = matrix.mean(axis=0), matrix.std(axis=0) + 1e-9
        weight = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        self.coef, self.intercept = _monotone_logistic((matrix - self.mean) / self.scale, y, weight, self.regularisation,
                                                       [self.signs.get(name, 0) for name in self.feature_names])
        if self.method == "isotonic":
            iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(self._score(X), y, sample_weight=sample_weight)
            self.isotonic = (iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist())
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        if self.coef is None:
            raise SpotmatchError("calibrator is not fitted; run `spotmatch calibrate` first")
        score = self._score(X)
        if self.isotonic is not None:
            return np.interp(score, *self.isotonic)
        return expit(score)

    def to_dict(self) -> dict:
        return {"features": list(self.feature_names), "method": self.method, "regularisation": self.regularisation, "signs": self.signs,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept, "isotonic": self.isotonic}

    @classmethod
    def from_dict(cls, values: dict, fields: FusionFileFields, section: str, known_features: tuple[str, ...]) -> "Calibrator":
        """`section`: the file's key holding `values`; `known_features`: the features its pairs have (no local
        evidence outside the shortlist). A file's feature list may be shorter than today's (older versions)."""
        names = fields.read(values, "features", "a list of distinct feature names", lambda value: isinstance(value, list)
                            and len(value) > 0 and all(map(is_text, value)) and len(set(value)) == len(value), section)
        unknown = [name for name in names if name not in known_features]
        if unknown:  # named apart: cut short, the whole list might not show them
            fields.refuse(f"{section}.features", f"names {', '.join(map(repr, unknown))}, which this calibrator's pairs do not have "
                          f"(known: {', '.join(known_features)})")
        method = fields.read(values, "method", "logistic or isotonic", lambda value: value in ("logistic", "isotonic"), section)
        regularisation = fields.read(values, "regularisation", "a finite number", is_finite_number, section)
        signs = fields.read(values, "signs", "an object of feature name: -1, 0 or 1", lambda value: value is None or (
            isinstance(value, dict) and all(isinstance(sign, int) and not isinstance(sign, bool) and sign in (-1, 0, 1)
                                            for sign in value.values())), section, default=None)
        calibrator = cls(tuple(names), method, regularisation, signs)
        calibrator.mean = fields.numbers(values, "mean", section, len(names))
        calibrator.scale = fields.numbers(values, "scale", section, len(names), positive=True)  # a divisor
        calibrator.coef = fields.numbers(values, "coef", section, len(names))
        calibrator.intercept = float(fields.read(values, "intercept", "a finite number", is_finite_number, section))
        # fit() sets the map for method isotonic only, and predict_proba uses any map it finds.
        if method == "isotonic":
            isotonic = fields.read(values, "isotonic", "[score thresholds, probabilities in [0, 1]]: two equally long lists of "
                                   "finite numbers, each non-decreasing", is_isotonic_map, section)
            calibrator.isotonic = (isotonic[0], isotonic[1])
        else:
            fields.read(values, "isotonic", "null for method logistic", lambda value: value is None, section)
        return calibrator


def _monotone_logistic(features: np.ndarray, labels: np.ndarray, weight: np.ndarray, regularisation: float,
                       signs: list[int]) -> tuple[np.ndarray, float]:
    """L2-regularised weighted logistic regression (scikit-learn's objective: |w|^2 / 2 + C * weighted log
    loss, intercept free) whose coefficient j has the sign signs[j] (0: free). scikit-learn's
    LogisticRegression has no bounds, hence L-BFGS-B."""
    n_features, sign = features.shape[1], np.asarray(signs)
    target = 2 * labels - 1

    def objective(params):
        coef, intercept = params[:n_features], params[n_features]
        margin = target * (features @ coef + intercept)
        slope = -regularisation * weight * target * expit(-margin)
        loss = 0.5 * coef @ coef - regularisation * weight @ log_expit(margin)
        return loss, np.append(coef + features.T @ slope, slope.sum())

    # Bounded a little away from 0: where the data would zero a weight, the order within a query stays the
    # embedding's instead of becoming one long tie, which a consumer of the scores would break arbitrarily.
    bounds = [(MIN_WEIGHT, None) if s > 0 else (None, -MIN_WEIGHT) if s < 0 else (None, None) for s in sign] + [(None, None)]
    result = minimize(objective, np.zeros(n_features + 1), jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": 1000})
    return result.x[:n_features], float(result.x[n_features])


# What `identify`'s threshold applies to. "best": the best individual's probability. "margin": its lead over
# the next individual's (0 when no other is shortlisted): a photo two animals match about equally well is
# not named, since at most one of them is right (docs/fusion.md, "The threshold `identify` uses").
DECISIONS = ("margin", "best")


def best_pair_per_individual(pairs: pd.DataFrame, per: list[str], wrong_first: str | None = None) -> pd.DataFrame:
    """Each individual's best pair (column `probability`), best first, within each group of the columns `per`
    (a query): what `identify` ranks and decides on. Tied probabilities keep the input order, or, where
    `wrong_first` names a 0/1 label column, put the wrong individual first, as the metrics break ties against
    the query."""
    by, ascending = ["probability"], [False]
    if wrong_first is not None:
        by, ascending = [*by, wrong_first], [*ascending, True]
    return pairs.sort_values(by, ascending=ascending, kind="stable").drop_duplicates([*per, "individual"])


def decision_score(best: float, runner_up: float | None, decision: str) -> float:
    """The number `identify` compares with its threshold, from the best and the next individual's probability."""
    return best - (runner_up or 0.0) if decision == "margin" else best


UNCHECKED_FLOOR = 1e-9  # where `keep_shortlist_first` puts the unchecked pairs of a query with a checked pair at 0


def keep_shortlist_first(probability: np.ndarray, shortlisted: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Per query, scale the probabilities of its pairs outside the shortlist so that none reaches its
    lowest shortlisted one, keeping their order. The two calibrators are fit on pairs pooled over queries,
    and pooled, a pair that failed verification is rarer a match than an unchecked one further down (many
    of those belong to an animal that owns half the gallery); within one query that lets hundreds of
    unchecked pairs overtake the checked ones (docs/fusion.md, "Shortlist first").

    A checked pair at exactly 0 (an isotonic calibrator's floor) is the one exception: below it every
    unchecked pair would be 0, one long tie, so they keep their order just above it instead."""
    shortlisted = np.asarray(shortlisted, bool)
    unchecked = pd.Series(np.where(shortlisted, np.nan, probability))
    highest_unchecked = unchecked.groupby(np.asarray(query)).transform("max").to_numpy()
    # Just below the lowest checked pair, so that no unchecked pair ties with it (NaN: no checked pair).
    lowest = lowest_shortlisted(probability, shortlisted, query)
    ceiling = np.where(lowest == 0, UNCHECKED_FLOOR, lowest) * (1 - 1e-6)
    scale = np.nan_to_num(np.minimum(ceiling / highest_unchecked, 1.0), nan=1.0)
    return np.where(shortlisted, probability, probability * scale)


def lowest_shortlisted(probability: np.ndarray, shortlisted: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Per pair, the lowest probability among its query's shortlisted pairs (NaN for a query without any)."""
    checked = pd.Series(np.where(shortlisted, probability, np.nan))
    return checked.groupby(np.asarray(query)).transform("min").to_numpy()


@dataclass
class FusionModel:
    """Three calibrators: pairs with local evidence (in a query's shortlist), pairs outside the
    shortlist (global evidence only, mostly far down the ranking), and every pair by global evidence
    alone, for when the local stage is switched off."""

    with_local: Calibrator
    global_only: Calibrator
    global_all: Calibrator
    embedder_id: str = ""
    local_stage: str = ""  # the local stage's settings name (extractor, matcher, verification, masks); "extractor" in the file
    threshold: float = 0.5  # "same individual" when the decision score (below) reaches it
    # "new individual" only below this decision score (at most `threshold`); between the two `identify` is not sure.
    # None: a file older than version 6, which called every photo below `threshold` new.
    new_threshold: float | None = None
    target_precision: float | None = None
    decision: str = "best"  # DECISIONS; "best" reads files of version 1 as they were calibrated
    # The global similarity the calibrators were fit on: plain cosine ("none") or re-ranked (fusion.rerank).
    rerank: str = "none"
    # Images per query the local stage re-scored when the calibrators were fit. The probabilities, and the
    # threshold set on them, hold for that shortlist only: a longer one puts pairs of other ranks in front of
    # each calibrator. None: a file older than version 4, which did not record it.
    shortlist_k: int | None = None
    # The mask source the local stage matched inside (segmentation MaskConfig.source, a U-Net's path made
    # absolute): the engine uses the same unless told otherwise. None: a file older than version 4.
    local_masks: str | None = None
    quality: dict = field(default_factory=dict)

    @classmethod
    def new(cls, method: str = "logistic", monotone: bool = True, **kwargs) -> "FusionModel":
        """`monotone`: each feature named in MONOTONE moves the probability only its way (free fit: False)."""
        signs = MONOTONE if monotone else None
        return cls(Calibrator(LOCAL_FEATURES, method, signs=signs), Calibrator(GLOBAL_FEATURES, method, signs=signs),
                   Calibrator(GLOBAL_FEATURES, method, signs=signs), **kwargs)

    def fit(self, features: pd.DataFrame, labels: np.ndarray, sample_weight: np.ndarray | None = None,
            labels_csv: str | Path = "calibration", queries: str = "the held-out queries") -> "FusionModel":
        """`labels_csv` (the table the pairs come from) and `queries` (whose pairs these are) name the data in
        the error raised when a calibrator's pairs hold only one kind."""
        labels = np.asarray(labels)
        weight = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        has_local = features["has_local"].to_numpy(bool)
        # A shortlist too short to reach a query's own animal (or any other one) is cured by a longer one;
        # pairs without a match at all only by other held-out photos.
        shortlisted = FitPairs(
            str(labels_csv), f"the pairs of {queries} shortlisted for local matching (each query's top-k by global similarity)",
            add_same="pass a larger --top-k, so that shortlists reach photos of the query's own animal, or hold out more photos per animal",
            add_different="pass a larger --top-k, so that shortlists reach other animals, or hold out more animals")
        every = FitPairs(str(labels_csv), f"the pairs of {queries}",
                         add_same="hold out more photos per animal: a query pairs only with other photos of its own animal",
                         add_different="hold out more animals")
        # The global-only model serves pairs outside the shortlist; when those hold no same-individual
        # pair at all, it learns from every pair instead (both classes are needed to fit).
        outside = ~has_local if len(np.unique(labels[~has_local])) == 2 else np.ones_like(has_local)
        self.global_only.fit(features[outside], labels[outside], weight[outside], every)
        self.global_all.fit(features, labels, weight, every)
        if has_local.any():
            self.with_local.fit(features[has_local], labels[has_local], weight[has_local], shortlisted)
        return self

    def predict_proba(self, features: pd.DataFrame, local_stage: bool = True) -> np.ndarray:
        """`local_stage=False`: the local stage was switched off, so no pair was shortlisted for it."""
        if not local_stage:
            return self.global_all.predict_proba(features)
        has_local = features["has_local"].to_numpy(bool)
        probability = np.empty(len(features))
        if (~has_local).any():
            probability[~has_local] = self.global_only.predict_proba(features[~has_local])
        if has_local.any():
            probability[has_local] = self.with_local.predict_proba(features[has_local])
        return probability

    def save(self, path: str | Path) -> Path:
        payload = {"format": FUSION_FORMAT, "version": FUSION_VERSION, "embedder_id": self.embedder_id,
                   "extractor": self.local_stage, "threshold": self.threshold, "new_threshold": self.new_threshold,
                   "target_precision": self.target_precision,
                   "decision": self.decision, "rerank": self.rerank, "shortlist_k": self.shortlist_k, "local_masks": self.local_masks,
                   "quality": self.quality, "with_local": self.with_local.to_dict(), "global_only": self.global_only.to_dict(),
                   "global_all": self.global_all.to_dict()}
        write_text_atomic(json.dumps(payload, indent=1), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, embedder_id: str | None = None, local_stage: str | None = None,
             rerank: str | None = None, shortlist_k: int | None = None) -> "FusionModel":
        """Refuse a file fit for another embedder, extractor, global re-ranking or shortlist length: its
        probabilities would mean nothing. None: not checked. A malformed field (edited by hand, damaged) is refused
        first, in one line naming its key (from_payload)."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise SpotmatchError(f"{path}: calibration file not found; run `spotmatch calibrate` to make one") from None
        except IsADirectoryError:
            raise SpotmatchError(f"{path}: is a folder; pass the fusion.json inside it that `spotmatch calibrate` wrote") from None
        except PermissionError:
            raise SpotmatchError(f"{path}: cannot be read by this user; fix its permissions or pass a copy") from None
        except (json.JSONDecodeError, UnicodeDecodeError):  # damaged, or another kind of file (a checkpoint)
            raise SpotmatchError(f"{path}: not a readable calibration file; pass the fusion.json `spotmatch calibrate` wrote") from None
        version = payload.get("version", 0) if isinstance(payload, dict) else None  # 0: written before versions were
        if not isinstance(payload, dict) or payload.get("format") != FUSION_FORMAT or not (
                isinstance(version, int) and not isinstance(version, bool) and 0 <= version <= FUSION_VERSION):
            raise SpotmatchError(f"{path}: not a spotmatch calibration file of a known version; run `spotmatch calibrate` again")
        model = cls.from_payload(payload, version, FusionFileFields(path))
        if embedder_id is not None and embedder_id != model.embedder_id:
            raise SpotmatchError(
                f"{path}: calibrated for embedder '{model.embedder_id}', not '{embedder_id}'; run `spotmatch calibrate` for this model"
            )
        if rerank is not None and rerank != model.rerank:
            raise SpotmatchError(
                f"{path}: calibrated on global similarities re-ranked by '{model.rerank}', but this command re-ranks by '{rerank}'; pass --rerank "
                f"{model.rerank} to score-pairs, or make a file for this use with `spotmatch calibrate --rerank {rerank}`"
            )
        saved_shortlist = model.shortlist_k
        if shortlist_k is not None and saved_shortlist is not None and shortlist_k != saved_shortlist:
            raise SpotmatchError(
                f"{path}: calibrated with the local stage re-scoring {saved_shortlist} images per query, not {shortlist_k}; leave out "
                f"--top-k / --shortlist-k (or pass {saved_shortlist}), or make a file for {shortlist_k} with `spotmatch calibrate --top-k {shortlist_k}`"
            )
        if local_stage is not None:
            model.refuse_other_local_stage(local_stage, path)
        return model

    @classmethod
    def from_payload(cls, payload: dict, version: int, fields: FusionFileFields) -> "FusionModel":
        """The model a parsed file of format version `version` holds, every field checked (`fields` refuses
        the first malformed one). Keys that older versions lack take the meaning those versions had."""
        calibrators = []
        for section, known_features in (("with_local", LOCAL_FEATURES), ("global_only", GLOBAL_FEATURES), ("global_all", GLOBAL_FEATURES)):
            values = fields.read(payload, section, "an object of calibrator settings", lambda value: isinstance(value, dict))
            calibrators.append(Calibrator.from_dict(values, fields, section, known_features))
        # Version 5 writes at most quality.NEVER (just above 1: names nothing); older versions wrote 1.0 for that.
        threshold = fields.read(payload, "threshold", "a probability threshold from 0 to 1",
                                lambda value: is_finite_number(value) and 0 <= value and (version < 5 or value <= NEVER))
        return cls(*calibrators, embedder_id=fields.read(payload, "embedder_id", "a string: the embedder's id", is_text),
                   local_stage=fields.read(payload, "extractor", "a string: the local stage's settings name", is_text),
                   threshold=NEVER if version < 5 and threshold >= 1.0 else float(threshold),
                   new_threshold=fields.read(payload, "new_threshold", "a decision score from 0 to the threshold, or null",
                                             lambda value: value is None or (is_finite_number(value) and 0 <= value <= threshold),
                                             default=None),
                   target_precision=fields.read(payload, "target_precision", "a finite number or null",
                                                lambda value: value is None or is_finite_number(value)),
                   decision=fields.read(payload, "decision", f"one of {', '.join(DECISIONS)}", lambda value: value in DECISIONS, default="best"),
                   rerank=fields.read(payload, "rerank", f"one of {', '.join(RERANKERS)}", lambda value: value in RERANKERS, default="none"),
                   shortlist_k=fields.read(payload, "shortlist_k", "a whole number above 0, or null",
                                           lambda value: value is None or is_count(value), default=None),
                   local_masks=fields.read(payload, "local_masks", "a mask source (a string) or null",
                                           lambda value: value is None or is_text(value), default=None),
                   quality=fields.read(payload, "quality", "an object", lambda value: isinstance(value, dict), default={}))

    def refuse_other_local_stage(self, settings_name: str, path: str | Path) -> None:
        """`settings_name`: the local stage's conf_name (extractor, matcher, verification, masks)."""
        if settings_name != self.local_stage:
            raise SpotmatchError(
                f"{path}: calibrated for local stage '{self.local_stage}', not '{settings_name}'; run `spotmatch calibrate` with "
                f"these local settings, or drop the option that changed them (--extractor, --local-masks, --weights)"
            )
