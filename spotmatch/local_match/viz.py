"""Drawing of match evidence (the one place match drawings are made; OpenCV only, no matplotlib).

`draw_matches` puts both images side by side, each fitted into the same box, outlines their masks (fading
what lies outside), draws one line per inlier (the most confident MAX_LINES) coloured by match confidence
(dark blue = doubtful, yellow = confident; viridis), and writes the scores above the images.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import cv2
import numpy as np

from spotmatch.local_match.matchers import PairEvidence

PANEL_HEIGHT, PANEL_MAX_WIDTH = 480, 800  # the box each image is fitted into
MAX_ENLARGEMENT = 4.0  # a thumbnail blown up further shows only its pixels
MIN_WIDTH = 480  # the header's scores need this much room, however narrow the two images
MIN_TITLE_WIDTH = 160  # a panel narrower than this gets its name on a line of its own
MAX_LINES = 150  # more lines hide the coat they join: the most confident are drawn, and the count says so
OUTSIDE_MASK_FADE = 0.6  # how far pixels outside the mask are faded to white: the matcher never saw them
MASK_COLOUR = (255, 0, 255)  # magenta in RGB: seldom a coat or background colour
FONT = cv2.FONT_HERSHEY_SIMPLEX
SCORE_SCALE, TITLE_SCALE = 0.6, 0.45
LINE_HEIGHT = 24  # pixels per header line
MARGIN = 8


@dataclass
class ScoreLine:
    """Numbers shown above the drawing; None means 'not computed' and is left out."""

    inliers: int
    inlier_ratio: float
    score: float
    cosine: float | None = None  # global embedding similarity, when a checkpoint was given
    probability: float | None = None  # fused same-individual probability: the fusion stage fills this in
    stationary: int = 0  # matches dropped as static scene; shown so a reader knows why a busy pair scored 0
    # The global rank the probability assumed, for a pair scored outside a real list (explain): it changes the number.
    probability_rank: int | None = None
    # What the probability did not use, when the drawn keypoints did not count (past the re-scored shortlist).
    probability_note: str | None = None
    matches: int | None = None  # tentative matches verified (after the static scene was dropped)
    matches_needed: int | None = None  # the fewest verification fits a model to

    def parts(self) -> list[str]:
        parts = [f"inliers {self.inliers}", f"inlier ratio {self.inlier_ratio:.2f}", f"local score {self.score:.1f}"]
        if self.inliers == 0 and self.matches is not None:  # why nothing was drawn: too few to verify, or none agreed
            parts.append(f"no verified match: {self.matches} tentative, {self.matches_needed} needed"
                         if self.matches_needed is not None and self.matches < self.matches_needed
                         else f"no geometric model fits the {self.matches} tentative matches")
        if self.stationary:
            parts.append(f"static-scene matches dropped {self.stationary}")
        if self.cosine is not None:
            parts.append(f"global cosine {self.cosine:.3f}")
        if self.probability is not None:
            at_rank = f" at global rank {self.probability_rank}" if self.probability_rank is not None else ""
            note = f" ({self.probability_note})" if self.probability_note else ""
            parts.append(f"P(same) {self.probability:.2f}{at_rank}{note}")
        return parts

    def text(self) -> str:
        return "   ".join(self.parts())


def drawable(text: str) -> str:
    """`text` as OpenCV's Hershey fonts can draw it: ASCII, letters whose accents Unicode can take off without them
    (ü as u, é as e), every other character as "?" (ß, ø, 北). A file name that is not valid UTF-8 (its bytes kept as surrogates) crashes
    cv2.getTextSize with a segmentation fault."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).encode("ascii", "replace").decode("ascii")


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def _wrapped(parts: list[str], width: int, scale: float) -> list[str]:
    """The parts joined into as few lines as fit `width` pixels (a portrait pair is narrow); a part wider than
    that is broken between words, and only a single word wider than that is cut."""
    pieces = [line for part in parts
              for line in ([part] if _text_width(part, scale) <= width else _greedy(part.split(" "), " ", width, scale))]
    return [_fitted(line, width, scale) for line in _greedy(pieces, "   ", width, scale)]


def _greedy(pieces: list[str], separator: str, width: int, scale: float) -> list[str]:
    lines: list[str] = []
    for piece in pieces:
        joined = f"{lines[-1]}{separator}{piece}" if lines else piece
        if lines and _text_width(joined, scale) <= width:
            lines[-1] = joined
        else:
            lines.append(piece)
    return lines


def _fitted(text: str, width: int, scale: float) -> str:
    """`text`, its start replaced by "..." where it is wider than `width` pixels: the end of a camera-trap file
    name (time, burst number, extension) is what tells two frames apart."""
    if _text_width(text, scale) <= width:
        return text
    for start in range(1, len(text)):
        if _text_width("..." + text[start:], scale) <= width:
            return "..." + text[start:]
    return ""


def panel_scale(shape: tuple[int, ...]) -> float:
    """How much an image of `shape` (h, w, ...) is scaled to fit the panel box: a wide strip is not blown up to the
    box's height, and a thumbnail is enlarged at most MAX_ENLARGEMENT times."""
    return min(PANEL_HEIGHT / shape[0], PANEL_MAX_WIDTH / shape[1], MAX_ENLARGEMENT)


def _panel(rgb: np.ndarray, mask: np.ndarray | None, scale: float) -> np.ndarray:
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    panel = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    if mask is not None:
        small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        outside = small == 0
        panel[outside] = (panel[outside] * (1 - OUTSIDE_MASK_FADE) + 255 * OUTSIDE_MASK_FADE).astype(np.uint8)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(panel, contours, -1, MASK_COLOUR, 2, cv2.LINE_AA)
    return panel


def confidence_colours(confidence: np.ndarray) -> np.ndarray:
    """(k, 3) RGB uint8 from the viridis map; the pair's confidences are stretched linearly from its lowest to its
    highest, so that one drawing's lines differ in colour whatever range its matcher's confidences take."""
    if len(confidence) == 0:
        return np.zeros((0, 3), np.uint8)
    span = np.ptp(confidence)
    levels = ((confidence - confidence.min()) / span * 255 if span > 0 else np.full(len(confidence), 255.0)).astype(np.uint8)
    bgr = cv2.applyColorMap(levels.reshape(-1, 1), cv2.COLORMAP_VIRIDIS).reshape(-1, 3)
    return bgr[:, ::-1]


def header_parts(scores: ScoreLine, evidence: PairEvidence, masked: bool) -> list[str]:
    """The scores, then what a reader needs to read the lines: how many are drawn, what their colour says, and
    whether the background was matched too."""
    parts = scores.parts() + ([f"lines: the {MAX_LINES} most confident of {evidence.inliers}"] if evidence.inliers > MAX_LINES else [])
    if evidence.inliers > 1:  # the colours are stretched within this pair: yellow is its best, not a level of confidence
        parts.append("colour: purple = this pair's least confident inlier, yellow = its most")
    if not masked:  # matches on rock and grass count as much as on the coat
        parts.append("no animal mask: whole frames matched, background included")
    return parts


def draw_matches(
    rgb0: np.ndarray,
    rgb1: np.ndarray,
    evidence: PairEvidence,
    scores: ScoreLine,
    mask0: np.ndarray | None = None,
    mask1: np.ndarray | None = None,
    titles: tuple[str, str] = ("query", "gallery"),
) -> np.ndarray:
    """RGB image of the two pictures, their inlier matches and the scores."""
    titles = (drawable(titles[0]), drawable(titles[1]))
    scale0, scale1 = panel_scale(rgb0.shape), panel_scale(rgb1.shape)
    left, right = _panel(rgb0, mask0, scale0), _panel(rgb1, mask1, scale1)
    gap = 8
    width = max(left.shape[1] + gap + right.shape[1], MIN_WIDTH)
    parts = header_parts(scores, evidence, masked=mask0 is not None or mask1 is not None)
    score_lines = _wrapped(parts, width - 2 * MARGIN, SCORE_SCALE)
    # Each name above its own image, unless one image is too narrow to hold it: then one line each, full width.
    beside = min(left.shape[1], right.shape[1]) >= MIN_TITLE_WIDTH
    title_lines = [titles] if beside else [(f"query: {titles[0]}",), (f"gallery: {titles[1]}",)]
    header = (len(score_lines) + len(title_lines)) * LINE_HEIGHT + MARGIN
    canvas = np.full((header + max(left.shape[0], right.shape[0]), width, 3), 255, np.uint8)
    canvas[header:header + left.shape[0], : left.shape[1]] = left
    canvas[header:header + right.shape[0], left.shape[1] + gap: left.shape[1] + gap + right.shape[1]] = right
    offset1 = np.array([left.shape[1] + gap, header], np.float32)
    points0 = evidence.points0 * scale0 + np.array([0, header], np.float32)
    points1 = evidence.points1 * scale1 + offset1
    colours = confidence_colours(evidence.confidence)
    # Least confident first, so the confident lines are drawn on top; past MAX_LINES only the most confident.
    for i in np.argsort(evidence.confidence, kind="stable")[-MAX_LINES:]:
        colour = tuple(int(c) for c in colours[i])
        a, b = tuple(int(v) for v in np.round(points0[i])), tuple(int(v) for v in np.round(points1[i]))
        cv2.line(canvas, a, b, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 3, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 3, colour, -1, cv2.LINE_AA)
    for row, line in enumerate(score_lines, start=1):
        cv2.putText(canvas, line, (MARGIN, row * LINE_HEIGHT - 2), FONT, SCORE_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    first_title_y = (len(score_lines) + 1) * LINE_HEIGHT - 2
    if beside:  # each within its own panel, so two long names never run into each other
        for x, room, title in ((MARGIN, left.shape[1] - MARGIN, titles[0]), (int(offset1[0]), right.shape[1] - MARGIN, titles[1])):
            cv2.putText(canvas, _fitted(title, room, TITLE_SCALE), (x, first_title_y), FONT, TITLE_SCALE, (60, 60, 60), 1,
                        cv2.LINE_AA)
    else:
        for row, (title,) in enumerate(title_lines):
            cv2.putText(canvas, _fitted(title, width - 2 * MARGIN, TITLE_SCALE), (MARGIN, first_title_y + row * LINE_HEIGHT),
                        FONT, TITLE_SCALE, (60, 60, 60), 1, cv2.LINE_AA)
    return canvas
