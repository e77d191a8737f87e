"""Explain one pair: a PNG of the inlier matches and a JSON of the matched keypoints beside it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2

from spotmatch.data.images import load_image
from spotmatch.errors import SpotmatchError
from spotmatch.io import atomic_path, write_text_atomic
from spotmatch.local_match.matchers import PairEvidence, matches_needed
from spotmatch.local_match.pipeline import PairScorer
from spotmatch.local_match.viz import ScoreLine, draw_matches


@dataclass
class PairExplanation:
    evidence: PairEvidence
    scores: ScoreLine
    png_path: Path
    json_path: Path


def explain_pair(
    query: str | Path,
    gallery: str | Path,
    scorer: PairScorer,
    out_png: str | Path,
    cosine: float | None = None,
    probability: float | None = None,
    settings: str = "",
    evidence: PairEvidence | None = None,
    probability_rank: int | None = None,
    probability_note: str | None = None,
    titles: tuple[str, str] | None = None,
) -> PairExplanation:
    """Match the pair (unless its `evidence` is given), draw it to `out_png` and write `<out_png stem>.json`
    with the inlier keypoints. `probability_rank`: the global rank the probability was computed at, shown
    beside it when the pair was scored on its own rather than as a candidate of a real list; `probability_note`:
    what the probability did not use (the drawn keypoints, past the shortlist); `titles`: above each photo (default:
    their file names)."""
    out_png = Path(out_png)  # as given: `x.PNG` made `x.png` would be a file the caller never checked (the query, say)
    query_record, gallery_record = load_image(query), load_image(gallery)
    evidence = evidence if evidence is not None else scorer.evidence(query, gallery)
    scores = ScoreLine(evidence.inliers, evidence.inlier_ratio, evidence.score, cosine, probability, evidence.stationary, probability_rank,
                       probability_note, evidence.matches, matches_needed(scorer.verification))
    mask_source = getattr(scorer, "mask_source", None)
    masks = [mask_source(r) if mask_source else r.mask for r in (query_record, gallery_record)]
    drawing = draw_matches(
        query_record.rgb, gallery_record.rgb, evidence, scores, *masks, titles=titles or (Path(query).name, Path(gallery).name)
    )
    encoded_ok, png_bytes = cv2.imencode(".png", cv2.cvtColor(drawing, cv2.COLOR_RGB2BGR))
    if not encoded_ok:
        raise SpotmatchError(f"{out_png}: OpenCV could not encode the drawing as PNG")
    with atomic_path(out_png) as tmp:
        tmp.write_bytes(png_bytes.tobytes())
    json_path = out_png.with_suffix(".json")
    payload = {
        "query": str(query),
        "gallery": str(gallery),
        "query_sha256": query_record.sha256,
        "gallery_sha256": gallery_record.sha256,
        "settings": settings,
        "global_cosine": cosine,
        "probability": probability,
        "probability_at_global_rank": probability_rank,
        "probability_note": probability_note,
        **evidence.to_dict(),
    }
    write_text_atomic(json.dumps(payload, indent=1), json_path)
    return PairExplanation(evidence, scores, out_png, json_path)
