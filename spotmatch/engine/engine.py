"""The Engine runs the chain: (mask) → global embedding → shortlist → local re-score → fusion.

    engine = Engine.from_files("runs/x/best.pt", fusion_path="runs/x/fusion.json")
    scored = engine.score_pairs(pairs)          # row_id, cosine, global_rank, matches, inliers, ..., similarity

Identification against a catalogue (its persisted FAISS index, per-individual verdicts) lives in
spotmatch.catalogue.service and uses the same Engine stages.

Every stage keeps its own cache (embeddings and local features by image content hash + config), so
re-running with a stage switched on or off recomputes only what changed.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from spotmatch.config import DEFAULT_CACHE
from spotmatch.engine.scoring import cosine_to_similarity, global_pair_scores, one_pair_scores
from spotmatch.errors import SpotmatchError
from spotmatch.fusion.calibration import FusionModel, keep_shortlist_first
from spotmatch.fusion.features import global_similarity, pair_features
from spotmatch.fusion.rerank import check_reranker
from spotmatch.global_embed.embed import EmbedConfig, Embedder, mask_provider


DEFAULT_SHORTLIST_K = 20


@dataclass
class EngineConfig:
    # Local matching runs on each query's K best gallery images by cosine. None: the K the calibration file
    # was fit with (its probabilities hold for that K only), else DEFAULT_SHORTLIST_K.
    shortlist_k: int | None = None
    use_local: bool = True
    extractor: str = "rootsift"
    masks: str | None = None  # keypoints only inside these masks; None: the embedder's mask source
    local_weights: str | None = None  # a learned extractor's or LoFTR's weights file; None: the shipped ones
    local_device: str = "auto"  # where the local stage's networks run (RootSIFT runs on OpenCV, on the CPU)
    local_workers: int = 2
    cache_dir: str | None = DEFAULT_CACHE
    # Keep each pair's local evidence in the cache as well (local_match.features.PairEvidenceCache).
    cache_pairs: bool = True
    # With fusion, scale each query's pairs outside its shortlist below its shortlisted ones, so unchecked
    # pairs never overtake checked ones: better order within a query, worse calibration (docs/fusion.md).
    shortlist_first: bool = False
    # Global similarity re-ranked over each query's rows before the shortlist and fusion (fusion.rerank:
    # "qe" or "k-reciprocal", as the Kaggle entries do); the calibration file must be fit on the same.
    rerank: str = "none"

    def __post_init__(self):
        check_reranker(self.rerank)
        if self.shortlist_k is not None and self.shortlist_k < 1:
            raise SpotmatchError(f"shortlist of {self.shortlist_k} images per query: pass a --top-k / --shortlist-k of 1 or more")


def shortlist_length(requested: int | None, fusion: FusionModel | None) -> int:
    """As requested, else the length the calibration was fit with, else the default."""
    if requested is not None:
        return requested
    return fusion.shortlist_k if fusion is not None and fusion.shortlist_k else DEFAULT_SHORTLIST_K


def settle_config(conf: EngineConfig, fusion_path: str | Path | None) -> EngineConfig:
    """`conf` with its shortlist length settled against the calibration file (refused if it was fit for
    another): for callers that must know it before an Engine exists, such as a Ray job."""
    checked = conf.shortlist_k if conf.use_local else None
    fusion = FusionModel.load(fusion_path, shortlist_k=checked) if fusion_path is not None else None
    return replace(conf, shortlist_k=shortlist_length(conf.shortlist_k, fusion))


class Engine:
    def __init__(self, embedder: Embedder, local=None, fusion: FusionModel | None = None, conf: EngineConfig | None = None):
        conf = conf or EngineConfig()
        self.embedder, self.local, self.fusion = embedder, local, fusion
        self.conf = replace(conf, shortlist_k=shortlist_length(conf.shortlist_k, fusion))
        if self.local is not None and self.fusion is None:
            raise SpotmatchError("local evidence needs a calibration file to become a probability; pass --fusion FILE"
                                 " (made by `spotmatch calibrate`) or switch the local stage off with --no-local")

    @classmethod
    def from_files(cls, checkpoint: str | Path, fusion_path: str | Path | None = None, conf: EngineConfig | None = None,
                   run: EmbedConfig | None = None) -> "Engine":
        """The local stage matches inside the masks `conf` names, else those the calibration file was fit
        with, else the embedder's; a file fit for other local settings is refused."""
        return cls.from_embedder(Embedder.from_checkpoint(checkpoint, run), fusion_path, conf)

    @classmethod
    def from_embedder(cls, embedder: Embedder, fusion_path: str | Path | None = None, conf: EngineConfig | None = None) -> "Engine":
        """`from_files` for an embedder already loaded (and checked by its caller)."""
        conf = conf or EngineConfig()
        fusion = None
        if fusion_path is not None:
            fusion = FusionModel.load(fusion_path, embedder_id=embedder.model_id, rerank=conf.rerank,
                                      shortlist_k=conf.shortlist_k if conf.use_local else None)
        local = None
        if conf.use_local:
            calibrated_masks = fusion.local_masks if fusion is not None else None
            conf = replace(conf, masks=conf.masks or calibrated_masks or embedder.conf.masks)
            local = build_local(conf, embedder.conf.masks)
            if fusion is not None:
                fusion.refuse_other_local_stage(local.conf_name, fusion_path)
        return cls(embedder, local, fusion, conf)

    def pair_table(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """Global columns for every row; local evidence for rows within each query's top-K (NaN elsewhere)."""
        table = global_pair_scores(pairs, self.embedder, self.conf.rerank)
        if self.local is None:
            return table
        shortlisted = table["global_rank"] < self.conf.shortlist_k
        evidence = self.local.score_pairs_shown(pairs[shortlisted])
        return table.join(evidence)

    def similarity(self, table: pd.DataFrame) -> np.ndarray:
        if self.fusion is not None:
            return self.fusion.predict_proba(pair_features(table), local_stage=self.local is not None)
        return cosine_to_similarity(global_similarity(table).to_numpy())

    def score_pairs(self, pairs: pd.DataFrame) -> pd.DataFrame:
        table = self.pair_table(pairs)
        similarity = self.similarity(table)
        if self.conf.shortlist_first and self.fusion is not None and self.local is not None:
            shortlisted = (table["global_rank"] < self.conf.shortlist_k).to_numpy()
            similarity = keep_shortlist_first(similarity, shortlisted, pairs["query_image_path"].to_numpy())
        table["similarity"] = similarity
        return table


def build_local(conf: EngineConfig, embedder_masks: str = "alpha"):
    """The local stage, restricted to the masks named in `conf` (else the embedder's)."""
    from spotmatch.device import resolve_device
    from spotmatch.local_match.pipeline import LocalMatcher, stage_overrides

    cache = conf.cache_dir if conf.cache_dir else None
    masks = mask_provider(conf.masks or embedder_masks, cache, resolve_device(conf.local_device))  # a U-Net's too
    return LocalMatcher.from_name(conf.extractor, cache_dir=cache, workers=conf.local_workers,
                                  mask_source=masks.mask_for if masks else None, mask_name=masks.name if masks else None,
                                  cache_pairs=conf.cache_pairs, **stage_overrides(conf.extractor, conf.local_weights, conf.local_device))


def explain(engine: Engine, query: str | Path, gallery: str | Path, out_png: str | Path, global_rank: int = 0):
    """Draw why two photos match: inlier lines, mask outlines, cosine, inliers and the fused probability.
    That probability depends on the gallery photo's place in the query's global list (`global_rank`, 0: its
    best), which two photos alone do not give; past the shortlist it comes from global evidence only, as
    `score-pairs` gives it."""
    from spotmatch.local_match.explain import explain_pair
    from spotmatch.local_match.pipeline import EVIDENCE_COLUMNS, evidence_row

    if engine.local is None:
        raise SpotmatchError("explaining a match needs the local stage; drop --no-local")
    if global_rank < 0:
        raise SpotmatchError(f"--global-rank {global_rank}: a place in the query's list counts from 0 (its best candidate)")
    table = one_pair_scores(engine.embedder, query, gallery).assign(global_rank=global_rank)
    evidence = engine.local.evidence(query, gallery)
    shortlisted = global_rank < engine.conf.shortlist_k
    table[list(EVIDENCE_COLUMNS)] = [evidence_row(evidence) if shortlisted else [np.nan] * len(EVIDENCE_COLUMNS)]
    probability = float(engine.similarity(table)[0]) if engine.fusion is not None else None
    return explain_pair(query, gallery, engine.local, out_png, cosine=float(table["cosine"].iloc[0]),
                        probability=probability, settings=engine.local.conf_name, evidence=evidence,
                        probability_rank=global_rank if probability is not None else None,
                        probability_note=None if shortlisted or probability is None else
                        f"global evidence only: the local stage re-scores the top {engine.conf.shortlist_k}")
