"""Pair re-scoring: features once per image (cached), then matching streamed over pairs.

    local = LocalMatcher.from_name("rootsift", cache_dir="cache")
    evidence = local.evidence(path0, path1)                  # one pair, PairEvidence
    table = local.score_pairs(pairs_df)                      # row_id, matches, inliers, inlier_ratio, local_score

Memory stays bounded whatever the number of pairs: pairs are processed in chunks, features live in a
bounded LRU (and on disk), and only four numbers per pair are kept.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from spotmatch.data.images import ImageRecord, file_sha256, load_image
from spotmatch.errors import SpotmatchError
from spotmatch.local_match.extractors import EXTRACTORS, Extractor, create_extractor
from spotmatch.local_match.features import FeatureCache, Features, PairEvidenceCache
from spotmatch.local_match.matchers import Matcher, MutualNNMatcher, PairEvidence, VerificationConf, create_matcher

# A later segmentation stage supplies masks for JPEGs through this hook; None uses the alpha mask only.
MaskSource = Callable[[ImageRecord], "np.ndarray | None"]
EVIDENCE_COLUMNS = ("matches", "inliers", "inlier_ratio", "local_score")
DENSE_MATCHERS = ("loftr",)


def evidence_row(evidence: PairEvidence) -> tuple[int, int, float, float]:
    return evidence.matches, evidence.inliers, evidence.inlier_ratio, evidence.score


def stage_overrides(name: str, weights: str | None = None, device: str = "auto") -> dict[str, dict]:
    """`LocalMatcher.from_name`'s extractor_conf and matcher_conf for a weights file and a device: the weights
    go to LoFTR or to a learned extractor (LightGlue reads its own shipped head), the device to every network
    the stage runs. RootSIFT runs on OpenCV and takes neither."""
    if name in DENSE_MATCHERS:
        return {"matcher_conf": {"weights": weights, "device": device}}
    if name not in EXTRACTORS:  # refused by from_name, with the names it knows
        return {}
    if EXTRACTORS[name].matcher != "lightglue":
        if weights is not None:
            raise SpotmatchError(f"--weights {weights}: {name} has no network to load weights into; drop --weights")
        return {}
    return {"extractor_conf": {"device": device, **({"weights": weights} if weights is not None else {})},
            "matcher_conf": {"device": device}}


class PairScorer(ABC):
    """Anything that turns image pairs into PairEvidence; `score_pairs` streams a pairs table through it."""

    chunk_size: int = 256
    # Names the mask source behind `mask_source` (segmentation MaskProvider.name); None: the images' own
    # alpha masks only. Masks change the evidence, so they are part of `conf_name`.
    mask_name: str | None = None

    @property
    def conf_name(self) -> str:
        """Names every setting that changes the evidence; a calibration file records it and refuses another."""
        return self.with_masks(type(self).__name__)

    @property
    @abstractmethod
    def verification(self) -> VerificationConf:
        """How tentative matches are verified (what `explain` needs to say why a pair has no inliers)."""

    def with_masks(self, settings: str) -> str:
        return f"{settings}+masks-{self.mask_name}" if self.mask_name else settings

    @abstractmethod
    def evidence_many(self, path_pairs: Sequence[tuple[str, str]]) -> list[PairEvidence]:
        """Evidence for each (path0, path1), in order."""

    def evidence(self, path0: str | Path, path1: str | Path) -> PairEvidence:
        return self.evidence_many([(str(path0), str(path1))])[0]

    def score_pairs(self, pairs: pd.DataFrame, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        """Evidence columns for each row of `pairs` (needs query_image_path, gallery_image_path), in row order.
        A pair listed on several rows is matched once; `progress` counts rows."""
        path_pairs = list(zip(pairs["query_image_path"].to_numpy(), pairs["gallery_image_path"].to_numpy()))
        rows_of = Counter(path_pairs)
        # Pairs sharing a query run together, so its features stay in the memory cache.
        distinct = sorted(rows_of, key=lambda pair: pair[0])
        row_of: dict[tuple, tuple] = {}
        for start in range(0, len(distinct), self.chunk_size):
            chunk = distinct[start:start + self.chunk_size]
            row_of.update(zip(chunk, self.evidence_rows(chunk)))
            if progress is not None:
                progress(sum(rows_of[pair] for pair in chunk))
        table = pd.DataFrame([row_of[pair] for pair in path_pairs], columns=list(EVIDENCE_COLUMNS), index=pairs.index)
        return table.astype({"matches": "int64", "inliers": "int64"})

    def evidence_rows(self, path_pairs: Sequence[tuple[str, str]]) -> list[tuple]:
        """`evidence_row` of each pair: what `score_pairs` keeps."""
        return [evidence_row(evidence) for evidence in self.evidence_many(path_pairs)]

    def score_pairs_shown(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """`score_pairs` with a progress bar on a terminal (none in logs or tests): a learned matcher on
        CPU takes tens of minutes over a few thousand pairs."""
        with tqdm(total=len(pairs), desc="local evidence", unit="pair", disable=None) as bar:
            return self.score_pairs(pairs, progress=bar.update)


class LocalMatcher(PairScorer):
    """A keypoint extractor (with its feature cache) and a matcher, run over a thread pool on CPU."""

    def __init__(
        self,
        extractor: Extractor,
        matcher: Matcher,
        cache_dir: str | Path | None = None,
        workers: int = 2,
        max_in_memory: int = 256,
        mask_source: MaskSource | None = None,
        cache_pairs: bool = False,
        mask_name: str | None = None,
    ):
        """`cache_pairs`: keep each pair's evidence under `cache_dir` too (the engine does; off here so that
        a benchmark of matching measures matching). `mask_name`: see PairScorer."""
        self.extractor = extractor
        self.matcher = matcher
        self.cache = FeatureCache(extractor, cache_dir, max_in_memory=max_in_memory)
        self.workers = max(1, workers)
        self.mask_source, self.mask_name = mask_source, mask_name
        self.pair_cache = PairEvidenceCache(cache_dir, self.conf_name) if cache_pairs and cache_dir is not None else None
        # Content hashes known without reading the file (path -> sha256): a catalogue's photos, which may have been
        # archived or moved since they were added; their cached features are found all the same.
        self.known_hashes: dict[str, str] = {}

    @classmethod
    def from_name(
        cls,
        name: str = "rootsift",
        cache_dir: str | Path | None = None,
        workers: int = 2,
        matcher: str | None = None,
        extractor_conf: dict[str, Any] | None = None,
        matcher_conf: dict[str, Any] | None = None,
        mask_source: MaskSource | None = None,
        cache_pairs: bool = False,
        mask_name: str | None = None,
    ) -> "LocalMatcher | PairScorer":
        """The extractor registered as `name` with its usual matcher; `loftr` gives the detector-free matcher."""
        if name in DENSE_MATCHERS:
            from spotmatch.local_match.loftr import LoFTRMatcher

            return LoFTRMatcher(mask_source=mask_source, mask_name=mask_name, **(matcher_conf or {}))
        extractor = create_extractor(name, **(extractor_conf or {}))
        chosen = matcher or EXTRACTORS[name].matcher
        return cls(extractor, create_matcher(name, chosen, **(matcher_conf or {})), cache_dir, workers, mask_source=mask_source,
                   cache_pairs=cache_pairs, mask_name=mask_name)

    @property
    def conf_name(self) -> str:
        return self.with_masks(f"{self.extractor.conf_name}+{self.matcher.conf_name}")

    @property
    def verification(self) -> VerificationConf:
        return self.matcher.conf.verification

    def feature_key(self, path: str | Path) -> str:
        """The feature cache's key of one image file: its content hash, plus the mask source's name when
        masks are on. A named source (a segmentation MaskProvider) gives each image one mask, so the name
        stands for it and cached features are found without decoding the image; an unnamed one is keyed
        by the mask's own hash, which needs the image decoded and its mask made."""
        sha = self.known_hashes.get(str(path)) or file_sha256(path)
        if self.mask_source is None:
            return sha
        if self.mask_name is not None:
            return f"{sha}-{self.mask_name}"
        record = load_image(path)
        return self.cache.key(record, self.mask_source(record))

    def evidence_rows(self, path_pairs: Sequence[tuple[str, str]]) -> list[tuple]:
        """Rows from the pair cache where it has them; the other pairs matched, then stored."""
        if self.pair_cache is None:
            return super().evidence_rows(path_pairs)
        keys = {path: self.feature_key(path) for path in dict.fromkeys(p for pair in path_pairs for p in pair)}
        pair_keys = [(keys[a], keys[b]) for a, b in path_pairs]
        known = self.pair_cache.get_many(pair_keys)
        missing = [i for i, key in enumerate(pair_keys) if key not in known]
        computed = dict(zip((pair_keys[i] for i in missing), super().evidence_rows([path_pairs[i] for i in missing])))
        self.pair_cache.put_many(computed)
        return [known[key] if key in known else computed[key] for key in pair_keys]

    def features(self, path: str | Path) -> Features:
        """Cached features of one image file; decodes the image only when they must be computed (or when
        an unnamed mask source must make the mask to find them)."""
        if self.mask_source is not None and self.mask_name is None:
            record = load_image(path)
            return self.cache.get(record, self.mask_source(record))
        key = self.feature_key(path)  # hashing bytes is far cheaper than decoding
        cached = self.cache.cached(key)
        if cached is not None:
            return cached
        record = load_image(path)
        return self.cache.get(record, self.mask_source(record) if self.mask_source else None, key=key)

    def features_many(self, paths: Iterable[str]) -> dict[str, Features]:
        unique = list(dict.fromkeys(paths))
        with self._pool(parallel=self.extractor.scales_with_threads) as pool:
            return dict(zip(unique, pool.map(self.features, unique)))

    def evidence_many(self, path_pairs: Sequence[tuple[str, str]]) -> list[PairEvidence]:
        features = self.features_many(p for pair in path_pairs for p in pair)
        feature_pairs = [(features[a], features[b]) for a, b in path_pairs]
        if not isinstance(self.matcher, MutualNNMatcher):
            return self.matcher.match_many(feature_pairs)  # batches on its own device
        with self._pool(parallel=True) as pool:
            return list(pool.map(lambda pair: self.matcher.match(*pair), feature_pairs))

    def _pool(self, parallel: bool) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.workers if parallel else 1)
