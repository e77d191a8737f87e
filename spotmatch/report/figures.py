"""Static matplotlib figures, each written atomically as one PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from spotmatch.plotting import pyplot, save_figure

CORRECT_COLOUR, WRONG_COLOUR, QUERY_COLOUR = "#1a9850", "#d73027", "#4575b4"


def training_curves(history: list[dict], out_png: Path) -> Path:
    """Loss per epoch (left axis) and validation IB-mAP where it was measured (right axis)."""
    plt = pyplot()
    epochs = np.array([row["epoch"] for row in history], dtype=float)
    loss = np.array([row["loss"] for row in history], dtype=float)
    val_map = np.array([row.get("val_ib_map", np.nan) for row in history], dtype=float)
    figure, loss_axis = plt.subplots(figsize=(7, 3.6))
    loss_axis.plot(epochs, loss, marker="o", color="#4575b4", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="#4575b4")
    map_axis = loss_axis.twinx()
    measured = ~np.isnan(val_map)  # validation runs only every few epochs
    map_axis.plot(epochs[measured], val_map[measured], marker="s", color="#d73027", label="validation IB-mAP")
    map_axis.set_ylabel("validation IB-mAP", color="#d73027")
    map_axis.set_ylim(0, 1)
    loss_axis.set_title("Training history")
    figure.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    return save_figure(figure, out_png)


def similarity_histograms(same: np.ndarray, different: np.ndarray, out_png: Path) -> Path:
    """Density of cosine similarity for same- and different-individual pairs (counts differ a lot)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.6))
    edges = np.linspace(-1, 1, 81)
    if different.size:
        axis.hist(different, bins=edges, density=True, alpha=0.55, color=WRONG_COLOUR, label=f"different individual ({different.size} pairs)")
    if same.size:
        axis.hist(same, bins=edges, density=True, alpha=0.55, color=CORRECT_COLOUR, label=f"same individual ({same.size} pairs)")
    low = min(float(np.min(same)) if same.size else 1.0, float(np.min(different)) if different.size else 1.0)
    axis.set_xlim(max(-1.0, low - 0.05), 1.0)
    axis.set_xlabel("cosine similarity (query vs gallery)")
    axis.set_ylabel("density")
    axis.set_title("Same vs different individual")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, out_png)


def similarity_heatmap(embeddings: np.ndarray, identities: np.ndarray, out_png: Path) -> Path:
    """All-pairs similarity of the given images, rows ordered by identity, with identity blocks outlined."""
    plt = pyplot()
    order = np.argsort(identities, kind="stable")
    ordered_ids = identities[order]
    similarity = embeddings[order] @ embeddings[order].T
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    shown = axis.imshow(similarity, cmap="viridis", vmin=-1 if similarity.min() < 0 else 0, vmax=1, interpolation="nearest")
    starts = np.flatnonzero(np.r_[True, ordered_ids[1:] != ordered_ids[:-1]])
    ends = np.r_[starts[1:], len(ordered_ids)]
    for start in starts[1:]:
        axis.axhline(start - 0.5, color="white", linewidth=0.4)
        axis.axvline(start - 0.5, color="white", linewidth=0.4)
    if len(starts) <= 60:  # beyond that the labels overlap into noise
        centres = (starts + ends - 1) / 2
        # identities are the data's own names: "$" in one must print as "$", not start mathtext (or fail the report)
        axis.set_xticks(centres, ordered_ids[starts], rotation=90, fontsize=6, parse_math=False)
        axis.set_yticks(centres, ordered_ids[starts], fontsize=6, parse_math=False)
    else:
        axis.set_xticks([])
        axis.set_yticks([])
    axis.set_title(f"Cosine similarity, {len(order)} images ordered by identity")
    figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    return save_figure(figure, out_png)


def neighbour_grid(rows: list[dict], top_k: int, out_png: Path) -> Path:
    """One row per query: the query (blue frame) then its top-k gallery images, green frame when the
    same individual, red when not. Each row dict: query (Image), query_label, neighbours
    [(Image, label, similarity, correct)]."""
    plt = pyplot()
    cell = 1.55
    figure, axes = plt.subplots(len(rows), top_k + 1, figsize=(cell * (top_k + 1), cell * 0.95 * len(rows)), squeeze=False)
    for axes_row, row in zip(axes, rows):
        cells = [(row["query"], f"query\n{row['query_label']}", QUERY_COLOUR)]
        cells += [(image, f"{label}\n{score:.3f}", CORRECT_COLOUR if correct else WRONG_COLOUR)
                  for image, label, score, correct in row["neighbours"]]
        for axis, (image, title, colour) in zip(axes_row, cells):
            axis.imshow(np.asarray(image))
            axis.set_title(title, fontsize=7.5, color=colour, pad=2, parse_math=False)
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
        for axis in axes_row[len(cells):]:
            axis.axis("off")
    figure.suptitle(f"Top-{top_k} neighbours (green: same individual, red: different)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, out_png, dpi=80)  # photos make this the heaviest PNG

