"""How well probabilities mean what they say: ECE, Brier, log loss, reliability diagram, threshold."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss, precision_recall_curve

from spotmatch.plotting import pyplot, save_figure

# The threshold of a decision that no threshold makes precise enough: just above 1, so that no probability
# (isotonic and saturated logistic ones reach 1.0 exactly) nor lead over the next individual reaches it.
NEVER = float(np.nextafter(1.0, 2.0))


def expected_calibration_error(probability: np.ndarray, labels: np.ndarray, bins: int = 15,
                               weight: np.ndarray | None = None) -> float:
    """Mean |accuracy - confidence| over equal-width bins, weighted by each bin's share of the pairs
    (or of the pairs' `weight`)."""
    weight = np.ones(len(labels)) if weight is None else np.asarray(weight, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            share = weight[inside].sum() / weight.sum()
            error += share * abs(np.average(labels[inside], weights=weight[inside]) - np.average(probability[inside], weights=weight[inside]))
    return float(error)


def calibration_report(probability: np.ndarray, labels: np.ndarray, balanced_weight: np.ndarray) -> dict:
    """`balanced_weight`: identity-balanced pair weights. Their ECE asks whether the probabilities hold
    for an even mix of animals; the plain ECE also counts how unevenly the photos are spread over them."""
    labels = np.asarray(labels, dtype=int)
    clipped = np.clip(probability, 1e-6, 1 - 1e-6)
    return {"pairs": int(len(labels)), "positives": int(labels.sum()),
            "ece": expected_calibration_error(probability, labels),
            "ece_balanced": expected_calibration_error(probability, labels, weight=balanced_weight),
            "brier": float(brier_score_loss(labels, probability)), "log_loss": float(log_loss(labels, clipped, labels=[0, 1]))}


def threshold_for_precision(probability: np.ndarray, labels: np.ndarray, precision: float,
                            sample_weight: np.ndarray | None = None) -> float:
    """The lowest probability threshold whose "same individual" calls reach `precision` (NEVER if none)."""
    precisions, _, thresholds = precision_recall_curve(labels, probability, sample_weight=sample_weight)
    # Weighted precisions are ratios of float sums: one that is the target exactly in counts can come out a few
    # units in the last place below it, and must still count as reaching it.
    reaching = np.flatnonzero(precisions[:-1] >= precision - 1e-12)
    return float(thresholds[reaching[0]]) if reaching.size else NEVER


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], out_png: str | Path, bins: int = 10) -> Path:
    """One line per named (probability, labels) set against the diagonal, with pair counts per bin."""
    plt = pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for name, (probability, labels) in curves.items():
        which = np.clip(np.digitize(probability, edges[1:-1]), 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        confidence = [probability[which == b].mean() for b in filled]
        accuracy = [labels[which == b].mean() for b in filled]
        ece = expected_calibration_error(probability, labels)
        top.plot(confidence, accuracy, marker="o", label=f"{name} (ECE {ece:.3f})")
        bottom.bar(edges[:-1] + 0.05, np.bincount(which, minlength=bins), width=0.09, alpha=0.5, label=name)
    top.set_ylabel("fraction same individual")
    top.set_title("Reliability of fused probabilities")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("pairs")
    figure.tight_layout()
    return save_figure(figure, out_png, dpi=120)
