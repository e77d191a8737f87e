"""Catalogue operations that need the model: init, add, identify, confirm a photo, explain a match.

The store (store.py) only reads and writes rows; this module embeds, matches and fuses, always
outside a transaction, then hands finished rows to the store in one write.
"""
from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd

from spotmatch.catalogue.store import (Catalogue, CatalogueSettings, Confirmed, EmptyGallery, GalleryRestriction, NewImage, folded_name,
                                      has_capture_date, reads_as_date, refuse_catalogue_folder, reviewer, station_key,
                                      unsafe_new_name)
from spotmatch.data.images import file_sha256, load_image, printable, refuse_unprintable_name
from spotmatch.data.tables import (FILENAME_ALIASES, IDENTITY_ALIASES, IMAGE_SUFFIXES, default_image_dir, find_column,
                                   on_disk_spelling, parse_side, read_csv_table, refuse_conflicting_labels)
from spotmatch.errors import SpotmatchError, one_line
from spotmatch.fusion.calibration import best_pair_per_individual, decision_score


class EmbedsImages(Protocol):
    """What `add` needs from an embedder (the benchmark passes a stand-in that reuses embeddings)."""

    model_id: str
    dim: int

    def embed(self, paths: list) -> np.ndarray: ...


@dataclass
class ImageSource:
    """An image to add, with whatever a CSV said about it."""

    path: Path
    identity: str | None = None
    station: str | None = None
    camera: str | None = None
    captured_at: str | None = None
    side: str | None = None


SIDE_ALIASES = ("side", "flank")


@dataclass
class AddConfig:
    batch_size: int = 16  # images per transaction: a kill loses at most this much work, never consistency
    who: str = "cli"
    local_features: bool = True  # extract keypoints at add time, so identify only extracts the query's

    def __post_init__(self):
        self.who = reviewer(self.who)  # before anything is added: a confirm adds its photo first


@dataclass
class AddReport:
    added: int = 0
    already_there: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line reason)


@dataclass
class IdentifyConfig:
    top_k: int = 5  # individuals reported per query
    explain_dir: Path | None = None  # where match drawings go; None: no drawings
    restriction: GalleryRestriction = field(default_factory=GalleryRestriction)  # default: every living individual
    # At most this many images of one individual in a photo's shortlist (None: no limit). At a fixed camera
    # one animal's frames share the background and can fill the whole shortlist, leaving no keypoint check
    # for any other animal (docs/catalogue.md, "Several individuals in the shortlist").
    per_individual: int | None = None


@dataclass
class Candidate:
    individual: str
    probability: float
    cosine: float
    global_rank: int
    gallery_image_id: int
    gallery_path: str
    # what a reviewer checks first: where and when the catalogue photo was taken, and which flank it shows
    gallery_filename: str = ""
    station: str | None = None
    camera: str | None = None
    captured_at: str | None = None
    side: str | None = None
    matches: float | None = None
    inliers: float | None = None
    inlier_ratio: float | None = None
    explanation_png: str | None = None


@dataclass
class QueryResult:
    query: str
    sha256: str
    candidates: list[Candidate]
    threshold: float
    known_image_id: int | None = None  # the photo is already in the catalogue under this id
    gallery: str = ""  # what it was matched against (GalleryRestriction.describe)
    decision: str = "best"  # what the threshold applies to (fusion.calibration.DECISIONS)
    decision_score: float | None = None  # that number: None without candidates
    # False without a calibration file: each candidate's `probability` is then its cosine mapped to [0, 1], a
    # similarity, and the threshold 0.5 (cosine 0) says nothing about how often a match is right.
    calibrated: bool = True
    known_individual: str | None = None  # the individual of `known_image_id`, once it has one
    # Individuals with identified photos in the catalogue but none in this photo's gallery (a station, a season,
    # the other flank, the individuals named): "new individual" is only said where none was left out.
    left_out: list[str] = field(default_factory=list)
    empty_gallery: bool = False  # the restriction keeps no catalogue photo for this photo (its flank)
    # The best individual's probability alone that names an animal at the calibration's target precision: at or
    # above it while the lead is too small, the photo shows a catalogued animal, which of two undecided.
    best_threshold: float | None = None
    runner_up: str | None = None  # the second individual of its shortlist, listed or not (None: it has one)
    # "new individual" only below this decision score; between it and `threshold` the model cannot place the photo.
    # None: as `threshold` (a calibration file older than version 6, or none).
    new_threshold: float | None = None

    @property
    def alone(self) -> bool:
        """One individual in its shortlist: no runner-up to lead, so a margin is the probability itself."""
        return bool(self.candidates) and self.runner_up is None

    @property
    def named(self) -> str | None:
        """The individual the photo is named as, or None."""
        if self.known_image_id is None and self.decision_score is not None and self.decision_score >= self.threshold:
            return self.candidates[0].individual
        return None

    @property
    def verdict(self) -> str:
        if self.known_image_id is not None:  # a decision on a photo already decided would only churn the catalogue
            return f"already catalogued as image {self.known_image_id}, " + (self.known_individual or "not identified yet")
        if self.empty_gallery:
            return "nothing to compare with: no catalogue photo in this gallery"
        if self.named is not None:
            return f"match: {self.named}"
        if (self.best_threshold is not None and self.runner_up is not None
                and self.candidates[0].probability >= self.best_threshold):
            return f"undecided: {self.candidates[0].individual} or {self.runner_up}"
        if self.left_out:
            return f"no match in this gallery; not compared: {listed_names(self.left_out)}"
        # Written so that a score that is not a number is "not sure", never the verdict that makes a team add an animal.
        if self.decision_score is not None and not self.decision_score < self.new_below:
            return f"not sure: best candidate {self.candidates[0].individual}"
        return "new individual"

    @property
    def new_below(self) -> float:
        """The decision score below which the photo is called a new individual."""
        return self.threshold if self.new_threshold is None else self.new_threshold


def listed_names(names: list[str], shown: int = 3) -> str:
    """'Cat5', 'Cat5, Cat9 and 12 more individuals': short enough for the verdict line."""
    listed = ", ".join(names[:shown])
    return listed + (f" and {len(names) - shown} more individuals" if len(names) > shown else "")


# --- settings and the engine ----------------------------------------------------------------------------
def init_catalogue(folder: Path, checkpoint: Path, fusion: Path | None, extractor: str = "rootsift") -> Catalogue:
    from spotmatch.engine.engine import Engine, EngineConfig
    from spotmatch.global_embed.embed import EmbedConfig

    refuse_catalogue_folder(Path(folder))  # before the model loads
    check_extractor(extractor)
    # The engine `open_engine` will build, built once now: a calibration of another model or local stage is
    # refused before the catalogue exists, not at its first use. Identify ranks plain cosines (rerank none).
    engine = Engine.from_files(checkpoint, fusion, EngineConfig(use_local=fusion is not None, extractor=extractor, cache_dir=None),
                               EmbedConfig(device="cpu", progress=False, cache_dir=None))
    embedder = engine.embedder
    settings = CatalogueSettings(checkpoint=str(Path(checkpoint).resolve()),
                                 fusion=str(Path(fusion).resolve()) if fusion else None,
                                 embedder_id=embedder.model_id, embedding_dim=embedder.dim, extractor=extractor,
                                 fusion_sha256=file_sha256(Path(fusion)) if fusion else None)
    return Catalogue.create(folder, settings)


def check_extractor(name: str) -> None:
    """Unknown names are refused at init: without a calibration file nothing would use the extractor until
    one is added, and the catalogue would be stored with a name no engine can build."""
    from spotmatch.local_match import EXTRACTORS
    from spotmatch.local_match.pipeline import DENSE_MATCHERS

    known = (*EXTRACTORS, *DENSE_MATCHERS)
    if name not in known:
        raise SpotmatchError(f"--extractor {name!r}: unknown local features; choose one of {', '.join(known)}")


def open_engine(catalogue: Catalogue, shortlist_k: int | None = None, workers: int = 2, progress: bool = False):
    """The catalogue's own model, with its caches inside the catalogue folder; local matching when calibrated."""
    from spotmatch.engine.engine import Engine, EngineConfig
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    settings = catalogue.settings()
    cache_dir = str(catalogue.cache_dir) if catalogue.writable else None  # a read-only catalogue's caches cannot grow
    conf = EngineConfig(shortlist_k=shortlist_k, use_local=settings.fusion is not None, extractor=settings.extractor,
                        local_workers=workers, cache_dir=cache_dir)
    # "pass a file written by train", the loaders' advice for a missing file, would not mend a catalogue.
    for kind, path, option in (("checkpoint", settings.checkpoint, "--checkpoint"), ("calibration file", settings.fusion, "--fusion")):
        if path is not None and not Path(path).is_file():
            raise SpotmatchError(f"{path}: the catalogue's {kind} is gone; put it back, or if it moved: spotmatch catalogue relink"
                                 f" {catalogue.folder} {option} NEW_PATH")
    embedder = Embedder.from_checkpoint(settings.checkpoint, EmbedConfig(device="cpu", num_workers=0, cache_dir=cache_dir, progress=progress))
    # Before the calibration file is read: it would refuse the replaced model as "not calibrated for it", and
    # calibrating again would not fix the catalogue.
    if embedder.model_id != settings.embedder_id:  # the file at the catalogue's checkpoint path was replaced
        raise SpotmatchError(f"{settings.checkpoint}: changed since catalogue {catalogue.folder} was made (embedder"
                             f" {settings.embedder_id}, now {embedder.model_id}); put the original file back, or init"
                             f" a new catalogue with this one and add the photos again")
    # `calibrate` writes beside the checkpoint by default: a run for another purpose would move every threshold. Checked
    # after the model: a re-trained model beside its new calibration is the error above, which relink cannot mend.
    if settings.fusion_sha256 is not None and file_sha256(Path(settings.fusion)) != settings.fusion_sha256:
        raise SpotmatchError(f"{settings.fusion}: changed since catalogue {catalogue.folder} took it (calibrated again?); put the"
                             f" original back, or to decide with the new file: spotmatch catalogue relink {catalogue.folder}"
                             f" --fusion {settings.fusion}")
    return Engine.from_embedder(embedder, settings.fusion, conf)


def relink_model(catalogue: Catalogue, checkpoint: Path | None, fusion: Path | None, who: str) -> None:
    """The catalogue's checkpoint and calibration file moved, or the calibration was made again: accepted only when
    they are the model it was made with (the same embedder id) and a calibration fit for it and its local stage, so
    no photo is compared with embeddings of another model."""
    from spotmatch.engine.engine import Engine, EngineConfig
    from spotmatch.global_embed.embed import EmbedConfig, Embedder

    settings = catalogue.settings()
    if fusion is not None and settings.fusion is None:
        raise SpotmatchError(f"{catalogue.folder}: was made without a calibration file, so {fusion} is no moved one of it; init a"
                             f" catalogue with it to re-score with keypoints")
    embedder = Embedder.from_checkpoint(checkpoint or settings.checkpoint, EmbedConfig(device="cpu", num_workers=0, cache_dir=None,
                                                                                       progress=False))
    if embedder.model_id != settings.embedder_id:
        raise SpotmatchError(f"{checkpoint or settings.checkpoint}: another model than the catalogue's (embedder {embedder.model_id},"
                             f" the catalogue's {settings.embedder_id}); name the file the catalogue was made with, as moved")
    if settings.fusion is not None:  # the calibration, moved or not, must still be the one for this model and local stage
        Engine.from_embedder(embedder, fusion or settings.fusion, EngineConfig(extractor=settings.extractor, cache_dir=None))
    catalogue.relink_files(str(checkpoint.resolve()) if checkpoint else None, str(fusion.resolve()) if fusion else None, who,
                           fusion_sha256=file_sha256(fusion) if fusion else None)


# --- add ------------------------------------------------------------------------------------------------
def sources_from_path(source: Path, image_dir: Path | None = None) -> list[ImageSource]:
    """What `add` was given: a folder of photos, one photo, or a CSV."""
    if source.is_dir():
        return sources_from_folder(source)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return [ImageSource(path=photo_path(source))]
    return sources_from_csv(source, image_dir)


def photo_path(path: Path) -> Path:
    """Absolute, through its links where they lead to a file; a dangling or looping link keeps its own name,
    so that the error `add` reports for it names the file the user gave."""
    return path.resolve() if path.exists() else path.absolute()


def sources_from_folder(folder: Path) -> list[ImageSource]:
    # Links that lead nowhere are listed too: add reports them as skipped rather than passing over them.
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink()))
    if not paths:
        raise SpotmatchError(f"{folder}: no images (jpg, png, ...) in this folder; check the path")
    return [ImageSource(path=photo_path(p)) for p in paths]


def sources_from_csv(csv_path: Path, image_dir: Path | None = None) -> list[ImageSource]:
    """A table `filename[, identity, station, camera, date, time, side]`; files missing on disk are reported by add."""
    table = read_csv_table(csv_path, fix="pass a CSV of photos, a folder of photos, or one photo (jpg, png, ...)")
    filename_col = find_column(table, FILENAME_ALIASES)
    if filename_col is None:
        raise SpotmatchError(f"{csv_path}: no filename column (expected one of {', '.join(FILENAME_ALIASES)}); rename the column")
    if table.empty:
        raise SpotmatchError(f"{csv_path}: no photos under the header; list one photo per row")
    identity_col, side_col = find_column(table, IDENTITY_ALIASES), find_column(table, SIDE_ALIASES)
    # A `catalogue export` names each photo by its full path as well: without --images that path is used, so an
    # export of photos from several folders (uploads beside a data set) adds back whole. Only a full path: a
    # relative one in another table means something else (it may already hold the images/ folder).
    path_col = find_column(table, ("path",)) if image_dir is None else None
    # Spaces around a cell (a "name, label" file) would name another file, as load_dataset knows.
    table[filename_col] = table[filename_col].str.strip()
    if path_col not in (None, filename_col):
        full = table[path_col].map(lambda value: Path(value.strip()).is_absolute() if value.strip() else False)
        table[filename_col] = table[path_col].str.strip().where(full, table[filename_col])
    image_dir = image_dir or default_image_dir(csv_path)
    if identity_col is not None:
        refuse_conflicting_labels(table, filename_col, identity_col, csv_path)
    # Any case, as the filename and identity columns: a "Station" column read as no station would leave its photos
    # out of every --station search without a word.
    station_col, camera_col, time_col = (find_column(table, (name,)) for name in ("station", "camera", "time"))
    date_col = find_column(table, ("date", "captured_at"))  # captured_at: an export's date and time in one column
    exported = {"sha256", "added_at", "captured_at"} <= {c.strip().lower() for c in table.columns}  # `catalogue export`'s
    sources = []
    for line, row in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        sources.append(ImageSource(path=photo_path(on_disk_spelling(image_dir / row[filename_col])),
                                   identity=(row[identity_col].strip() or None) if identity_col else None,
                                   station=(row[station_col].strip() or None) if station_col else None,
                                   camera=(row[camera_col].strip() or None) if camera_col else None,
                                   captured_at=_capture_time(row, date_col, time_col, f"{csv_path} line {line}", exported),
                                   side=parse_side(row[side_col], f"{csv_path} line {line}") if side_col else None))
    return sources


def _capture_time(row: dict, date_col: str | None, time_col: str | None, where: str, exported: bool = False) -> str | None:
    """The row's date and time as written; a date that does not read as year, month, day is refused, since it would
    keep its photo out of every --since/--until search. An `exported` table's dates are taken as the catalogue stored
    them (an EXIF time it could not read included), so that an export adds back."""
    date = row[date_col].strip() if date_col else ""
    when = " ".join(v for v in (date, row[time_col].strip() if time_col else "") if v) or None
    if date and not exported and not reads_as_date(date):
        raise SpotmatchError(f"{where}: date {date!r} does not read as year-month-day; write it as 2012-07-22")
    return when


def _merged_capture_time(written: str | None, exif_time: str | None) -> str | None:
    """The CSV's date and time, unless they hold no date and the photo's EXIF does: a time alone ("16-13-56", with
    the date cell empty) or an export's unreadable text would replace the real date and keep the photo out of every
    --since/--until search. Without an EXIF date the text is kept, so nothing the user wrote is lost."""
    if written is None or (not has_capture_date(written) and has_capture_date(exif_time)):
        return exif_time
    return written


def _decodable(source: ImageSource) -> tuple[str, str | None]:
    """(sha256, EXIF capture time) after a full decode: a corrupt file raises here, before anything is written."""
    record = load_image(source.path)
    return record.sha256, record.captured_at


def fresh_sources(catalogue: Catalogue, sources: list[ImageSource], report: AddReport) -> list[tuple[ImageSource, str, str | None]]:
    """(source, sha256, EXIF time) of the sources to add: not in the catalogue, not repeated, decodable.
    Missing and corrupt files go to `report.failed`, known ones count as already there."""
    hashes = {}
    for source in sources:
        try:
            refuse_unprintable_name(source.path, "the catalogue")
            hashes[id(source)] = file_sha256(source.path)
        except SpotmatchError as exc:
            report.failed.append((printable(source.path), str(exc)))
    known = catalogue.known_images(list(hashes.values()))
    fresh: list[tuple[ImageSource, str, str | None]] = []
    seen: dict[str, ImageSource] = {}  # sha256 -> the first source of this input that holds it
    for source in sources:
        sha = hashes.get(id(source))
        if sha is None:
            continue
        # The table it was first added with, added again after a reviewer's rename or merge, is no relabelling.
        if sha in known and source.identity is not None and source.identity not in known[sha][1:]:
            report.failed.append((str(source.path), _relabel_refusal(catalogue.folder, source, *known[sha][:2])))
            continue
        if sha in seen and seen[sha].identity != source.identity:  # one photo under two names, labelled twice
            first = seen[sha]
            report.failed.append((str(source.path), f"{source.path}: the same photo as {first.path} (same content), which this"
                                                    f" input labels {first.identity or 'no individual'} and this row"
                                                    f" {source.identity or 'no individual'}; fix the CSV"))
            continue
        if sha in known or sha in seen:
            report.already_there += 1
            continue
        try:
            sha, captured_at = _decodable(source)
        except SpotmatchError as exc:
            report.failed.append((str(source.path), str(exc)))
            continue
        seen[sha] = source
        fresh.append((source, sha, captured_at))
    return fresh


def _relabel_refusal(folder: Path, source: ImageSource, image_id: int, individual: str | None) -> str:
    """Adding never changes a stored label: that is a reviewed decision, recorded by its own command."""
    return (f"{source.path}: already in the catalogue as image {image_id} of {individual or 'no individual'}, but the CSV says"
            f" {source.identity}; fix the CSV, or relabel it with `spotmatch catalogue confirm {folder} --image-id {image_id} --individual NAME`")


def insert_fresh(catalogue: Catalogue, fresh: list[tuple[ImageSource, str, str | None]], embeddings: np.ndarray,
                 embedder_id: str, feature_key: str | None, who: str, report: AddReport) -> None:
    """One transaction for these images (computed beforehand, outside it)."""
    rows = [NewImage(path=str(s.path), sha256=sha, embedding=e, embedder_id=embedder_id, feature_key=feature_key,
                     identity=s.identity, station=s.station, camera=s.camera, side=s.side,
                     captured_at=_merged_capture_time(s.captured_at, exif_time))
            for (s, sha, exif_time), e in zip(fresh, embeddings)]
    new_ids = catalogue.insert_images(rows, who)
    report.added += len(new_ids)
    if len(new_ids) == len(rows):
        return
    # Another process added some meanwhile, perhaps under another label: checked as `fresh_sources` checks.
    known = catalogue.known_images([sha for _, sha, _ in fresh])
    for source, sha, _ in fresh:
        image_id, *names = known[sha]
        if image_id in new_ids:
            continue
        if source.identity is not None and source.identity not in names:
            report.failed.append((str(source.path), _relabel_refusal(catalogue.folder, source, image_id, names[0])))
        else:
            report.already_there += 1


def refuse_misleading_labels(catalogue: Catalogue, sources: list[ImageSource]) -> None:
    """Before any work: a label like an individual's name but for case, spaces or punctuation ("cat21" beside
    Cat21), in the catalogue or in this input, is a typo far more often than a new animal; a name an individual
    gave up (renamed, merged away) is a table written before that decision, for any photo of it not yet added (the
    same table added again, after an interrupted run, finds its photos there under the name they have now)."""
    first_with: dict[str, ImageSource] = {}  # folded label -> the first source labelled like that
    fate_of: dict = {}  # label -> its FormerName, or None
    for source in sources:
        if source.identity is None:
            continue
        key = folded_name(source.identity)
        if key not in first_with:
            twin = catalogue.near_namesake(source.identity)
            if twin is not None:
                raise SpotmatchError(f"{source.path}: labelled {source.identity!r}, too like the catalogue's {twin!r} (only case,"
                                     f" spaces or punctuation differ); fix the label (a new animal needs a name that differs more)")
            first_with[key] = source
        elif first_with[key].identity != source.identity:
            other = first_with[key]
            raise SpotmatchError(f"{source.path}: labelled {source.identity!r}, and {other.path} {other.identity!r} (only case,"
                                 f" spaces or punctuation differ); write one animal's name one way")
        if source.identity not in fate_of:
            fate_of[source.identity] = catalogue.former_name(source.identity)
            unsafe = unsafe_new_name(source.identity)
            if unsafe is not None and not catalogue.has_individual(source.identity):
                raise SpotmatchError(f"{source.path}: labelled {source.identity!r}, which {unsafe}; relabel those rows")
        if fate_of[source.identity] is not None and not _already_added(catalogue, source.path):
            raise SpotmatchError(f"{source.path}: labelled {source.identity!r}, but {fate_of[source.identity]}; relabel those"
                                 f" rows with its name now (a new animal needs a name never used)")


def refuse_station_spellings(catalogue: Catalogue, sources: list[ImageSource]) -> None:
    """Before any work: a station written like another but for case or spaces ("s26" beside S26), in the catalogue
    or in this input, would split one site in two, and `identify --station S26` would leave the other spelling's
    photos out unseen. A spelling the catalogue already holds is always accepted."""
    known = set(catalogue.stations())
    spelling_of = {station_key(station): station for station in sorted(known)}
    for source in sources:
        if source.station is None or source.station in known:
            continue
        other = spelling_of.setdefault(station_key(source.station), source.station)
        if other != source.station:
            raise SpotmatchError(f"{source.path}: station {source.station!r}, but {other!r} is written another way (only case"
                                 f" or spaces differ); write one station's name one way")


def _already_added(catalogue: Catalogue, path: Path) -> bool:
    """Whether this photo's content is in the catalogue; a photo that cannot be read is left for `add` to report."""
    try:
        return catalogue.image_by_sha(file_sha256(path)) is not None
    except SpotmatchError:
        return True


def add_images(catalogue: Catalogue, embedder: EmbedsImages, local, sources: list[ImageSource],
               conf: AddConfig | None = None, progress: Callable[[int], None] | None = None) -> AddReport:
    """Add new images by content hash (already-present ones are skipped), one transaction per batch."""
    conf = conf or AddConfig()
    catalogue.check_embedder(embedder.model_id, embedder.dim)
    refuse_misleading_labels(catalogue, sources)
    refuse_station_spellings(catalogue, sources)
    report = AddReport()
    for start in range(0, len(sources), conf.batch_size):
        batch = sources[start:start + conf.batch_size]
        fresh = fresh_sources(catalogue, batch, report)
        if fresh:
            embeddings = embedder.embed([s.path for s, _, _ in fresh])
            feature_key = None
            if local is not None and conf.local_features:
                local.features_many([str(s.path) for s, _, _ in fresh])  # fills the on-disk feature cache
                feature_key = local.extractor.conf_name
            insert_fresh(catalogue, fresh, embeddings, embedder.model_id, feature_key, conf.who, report)
        if progress is not None:
            progress(len(batch))
    return report


# --- identify -------------------------------------------------------------------------------------------
def restrictions_by_side(restriction: GalleryRestriction, sides: list[str | None]) -> dict[str | None, GalleryRestriction]:
    """The gallery of each flank among the photos (a round's own flank, else the restriction's)."""
    return {side: replace(restriction, side=side) for side in dict.fromkeys(side or restriction.side for side in sides)}


def kept_image_ids(catalogue: Catalogue, restrictions: dict) -> dict:
    """Per flank: the image ids its restriction keeps, or None where it keeps nothing (those photos are told so,
    the others still searched); a restriction that keeps nothing for any photo is the error naming it."""
    kept, refusals = {}, []
    for side, restriction in restrictions.items():
        try:
            kept[side] = catalogue.restricted_image_ids(restriction)
        except EmptyGallery as refusal:
            kept[side], refusals = None, [*refusals, refusal]
    if len(refusals) == len(restrictions):
        raise refusals[0]
    return kept


def gallery_index(catalogue: Catalogue, image_ids: np.ndarray):
    """(FAISS index, image ids in index order) over `image_ids`: the saved index when they are all its images,
    else an exact index over them. A site or a season is a small gallery, and an exact search over it returns
    k candidates where filtering an approximate index (HNSW) can return fewer."""
    from spotmatch.global_embed.index import IndexConfig, build_index

    index, all_ids = catalogue.search_index()
    if len(image_ids) == len(all_ids):
        return index, all_ids
    return build_index(catalogue.embeddings(image_ids), IndexConfig(kind="flat")), image_ids


# With a per-individual limit, how far down the cosine list (in shortlists) the shortlist is looked for.
LIMITED_SEARCH_DEPTH = 10


def _shortlist(gallery: pd.DataFrame, index, image_ids: np.ndarray, query_paths: list[Path], query_embeddings: np.ndarray,
               query_hashes: list[str], shortlist_k: int, per_individual: int | None = None) -> pd.DataFrame:
    """Global candidates per query from `index` (over `image_ids`), at most `per_individual` images of one
    individual; a query never matches its own file. `global_rank` counts every catalogue image above it, as
    in calibration; `query_position`: the query's place in `query_paths`."""
    from spotmatch.global_embed.index import search

    depth = shortlist_k if per_individual is None else shortlist_k * LIMITED_SEARCH_DEPTH
    scores, neighbours = search(index, query_embeddings, depth + 1)  # +1: room for the query itself
    rows = []
    for q, query in enumerate(query_paths):
        rank, taken = 0, Counter()
        for position, cosine in zip(neighbours[q], scores[q]):
            if position < 0:
                continue
            image = gallery.loc[int(image_ids[position])]
            if image["sha256"] == query_hashes[q]:
                continue
            if taken.total() < shortlist_k and (per_individual is None or taken[image["individual"]] < per_individual):
                rows.append({"query_position": q, "query_image_path": str(query), "gallery_image_path": image["path"],
                             "gallery_image_id": int(image_ids[position]), "individual": image["individual"],
                             "cosine": float(cosine), "global_rank": rank,
                             **{column: image[column] for column in CANDIDATE_METADATA}})
                taken[image["individual"]] += 1
            rank += 1
    return pd.DataFrame(rows)


CANDIDATE_METADATA = ("filename", "station", "camera", "captured_at", "side")


def identify(catalogue: Catalogue, engine, query_paths: list[Path], conf: IdentifyConfig | None = None,
             sides: list[str | None] | None = None) -> list[QueryResult]:
    """Per photo: the top-K individuals by calibrated probability, with the evidence behind each. `sides`:
    each photo's flank where known (a round's CSV), which then replaces the restriction's side for it."""
    conf = conf or IdentifyConfig()
    query_paths = [Path(p) for p in query_paths]
    if not query_paths:
        raise SpotmatchError(f"{catalogue.folder}: no photos to identify; pass one or more")
    sides = [side or conf.restriction.side for side in (sides or [None] * len(query_paths))]  # restrictions_by_side's keys
    for path in query_paths:
        refuse_unprintable_name(path, "the catalogue")  # its candidates table and explanation files name it
    query_hashes = [file_sha256(p) for p in query_paths]  # one-line error for a missing photo
    for path in query_paths:
        load_image(path)  # and for a corrupt one, before any work
    restrictions = restrictions_by_side(conf.restriction, sides)
    kept_ids = kept_image_ids(catalogue, restrictions)  # before any embedding: a gallery of nothing is said at once
    galleries = {side: None if ids is None else gallery_index(catalogue, ids) for side, ids in kept_ids.items()}
    gallery = catalogue.images_table().set_index("image_id")  # read once for every flank's shortlist
    # Every individual the restriction could leave out: the living ones, or all where retired ones are searched too.
    unrestricted = catalogue.restricted_image_ids(GalleryRestriction(include_retired=conf.restriction.include_retired))
    everyone = set(gallery.loc[unrestricted, "individual"])
    left_out = {side: sorted(everyone - set(gallery.loc[[] if ids is None else ids, "individual"])) for side, ids in kept_ids.items()}
    candidates = _scored_candidates(catalogue, engine, gallery, query_paths, query_hashes, sides, galleries, conf.per_individual)
    threshold = float(engine.fusion.threshold) if engine.fusion is not None else 0.5
    new_threshold = engine.fusion.new_threshold if engine.fusion is not None else None
    decision = engine.fusion.decision if engine.fusion is not None else "best"
    best_threshold = (engine.fusion.quality.get("identify by rule", {}).get("best", {}).get("threshold")
                      if engine.fusion is not None and decision == "margin" else None)
    names = catalogue.individual_names()
    results = []
    for position, (path, sha, side) in enumerate(zip(query_paths, query_hashes, sides)):
        mine = candidates[candidates["query_position"] == position] if len(candidates) else candidates
        # each individual by its best image, best first (ties: the image added first); the runner-up is whoever
        # comes next, listed or not
        ranked = best_pair_per_individual(mine.sort_values("gallery_image_id", kind="stable"), []) if len(mine) else mine
        probabilities = ranked["probability"].tolist() if len(ranked) else []
        score = decision_score(probabilities[0], probabilities[1] if len(probabilities) > 1 else None, decision) if probabilities else None
        known = catalogue.image_by_sha(sha)
        result = QueryResult(str(path), sha, [_candidate(row) for row in ranked.head(conf.top_k).to_dict("records")], threshold,
                             int(known["id"]) if known is not None else None, restrictions[side].describe(), decision, score,
                             engine.fusion is not None,
                             known_individual=names.get(known["individual_id"]) if known is not None else None,
                             left_out=left_out[side], empty_gallery=galleries[side] is None, best_threshold=best_threshold,
                             runner_up=ranked["individual"].iloc[1] if len(ranked) > 1 else None, new_threshold=new_threshold)
        if conf.explain_dir is not None and engine.local is not None:
            for candidate in result.candidates:
                # A catalogue photo moved since it was added is scored from its cached keypoints, but cannot be drawn:
                # its candidate is listed without a drawing rather than losing the whole round.
                if Path(candidate.gallery_path).is_file():
                    candidate.explanation_png = str(explain_candidate(engine, path, sha, candidate, conf.explain_dir))
        results.append(result)
    return results


def _scored_candidates(catalogue: Catalogue, engine, gallery: pd.DataFrame, query_paths: list[Path], query_hashes: list[str],
                       sides: list[str | None], galleries: dict, per_individual: int | None) -> pd.DataFrame:
    """Every photo's shortlist from the gallery of its flank (`galleries`: flank -> (index, image ids) from
    gallery_index, or None where it keeps nothing), re-scored by the local stage and fused."""
    query_embeddings = engine.embedder.embed(query_paths)
    dim = next(searched for searched in galleries.values() if searched is not None)[0].d
    if query_embeddings.shape[1] != dim:
        raise SpotmatchError(f"{catalogue.folder}: the catalogue index has {dim} dimensions, the query embeddings"
                             f" {query_embeddings.shape[1]}; identify with the catalogue's checkpoint")
    shortlists = []
    for side, searched in galleries.items():
        mine = [n for n, s in enumerate(sides) if s == side]
        if searched is None:
            continue
        index, image_ids = searched
        shortlist = _shortlist(gallery, index, image_ids, [query_paths[n] for n in mine], query_embeddings[mine],
                               [query_hashes[n] for n in mine], engine.conf.shortlist_k, per_individual)
        if len(shortlist):  # positions among all photos: the same file may come twice, with two flanks
            shortlist["query_position"] = np.asarray(mine)[shortlist["query_position"].to_numpy()]
        shortlists.append(shortlist)
    candidates = pd.concat(shortlists, ignore_index=True)
    candidates.insert(0, "row_id", np.arange(len(candidates)))
    if engine.local is not None and len(candidates):
        if hasattr(engine.local, "known_hashes"):  # catalogue photos moved since they were added keep their cached features
            engine.local.known_hashes.update(zip(gallery["path"], gallery["sha256"]))
        candidates = candidates.join(engine.local.score_pairs(candidates))
    if len(candidates):
        candidates["probability"] = engine.similarity(candidates)
    return candidates


def _candidate(row: dict) -> Candidate:
    optional = lambda key: (None if pd.isna(row.get(key, np.nan)) else float(row[key]))  # noqa: E731
    text = lambda key: (None if pd.isna(row[key]) else str(row[key]))  # noqa: E731
    return Candidate(individual=row["individual"], probability=float(row["probability"]), cosine=row["cosine"],
                     global_rank=int(row["global_rank"]), gallery_image_id=int(row["gallery_image_id"]),
                     gallery_path=row["gallery_image_path"], gallery_filename=row["filename"], station=text("station"),
                     camera=text("camera"), captured_at=text("captured_at"), side=text("side"), matches=optional("matches"),
                     inliers=optional("inliers"), inlier_ratio=optional("inlier_ratio"))


def explain_candidate(engine, query: Path, query_sha: str, candidate: Candidate, out_dir: Path) -> Path:
    """The drawing of the inlier matches, named and titled with the photo and the candidate individual, so that it
    is understood away from the terminal. Drawn once per pair and scores: a drawing made with another calibration
    (or before a rename) is not shown as this one."""
    from spotmatch.io import portable_file_name
    from spotmatch.local_match.explain import explain_pair

    drawn = hashlib.sha256(f"{query_sha} {candidate.individual} {candidate.probability:.6f} {candidate.cosine:.6f}".encode()).hexdigest()
    name = f"{Path(query).stem[:40]}-{candidate.individual[:40]}-image{candidate.gallery_image_id}-{drawn[:12]}.png"
    out_png = Path(out_dir) / portable_file_name(name)
    if not out_png.is_file():
        explain_pair(query, candidate.gallery_path, engine.local, out_png, cosine=candidate.cosine, probability=candidate.probability,
                     titles=(Path(query).name, f"{candidate.individual}: {candidate.gallery_filename or Path(candidate.gallery_path).name}"))
    return out_png


@dataclass
class PhotoFacts:
    """Where, when and which flank, for a photo `confirm` adds: without them a new animal's first photo would never
    be found by a station, season or flank search."""
    station: str | None = None
    camera: str | None = None
    captured_at: str | None = None  # as written; read as a date like a CSV's (the EXIF date where this is empty)
    side: str | None = None

    def __post_init__(self):
        self.station, self.camera = (value.strip() or None if value else None for value in (self.station, self.camera))
        self.side = parse_side(self.side, "--side")
        if self.captured_at and not reads_as_date(self.captured_at):
            raise SpotmatchError(f"--date {self.captured_at!r} does not read as year-month-day; write it as 2012-07-22")

    def given(self) -> bool:
        return any(value is not None for value in (self.station, self.camera, self.captured_at, self.side))


def confirm_photo(catalogue: Catalogue, engine, photo: Path, individual: str | None, who: str,
                  facts: PhotoFacts | None = None) -> Confirmed:
    """Add the photo if it is not in the catalogue yet (with `facts`), then assign it (None: a new individual). A
    name `confirm` would refuse is refused before the photo is added: a refused command writes nothing, and so
    are facts for a photo already in the catalogue (they would be dropped unseen)."""
    facts = facts or PhotoFacts()
    if individual is not None:
        catalogue.confirmable_name(individual)
    sha = file_sha256(photo)
    known = catalogue.image_by_sha(sha)
    if known is not None and facts.given():
        raise SpotmatchError(f"{photo}: already in the catalogue as image {known['id']}, with the station, date and flank it was"
                             f" added with; confirm it without a station, camera, date or flank (--station/--camera/--date/--side)")
    if known is None:
        source = ImageSource(photo_path(Path(photo)), station=facts.station, camera=facts.camera,
                             captured_at=facts.captured_at, side=facts.side)
        report = add_images(catalogue, engine.embedder, engine.local, [source], AddConfig(who=who))
        if report.failed:
            raise SpotmatchError(report.failed[0][1])
        known = catalogue.image_by_sha(sha)
    return catalogue.confirm(int(known["id"]), individual, who)


def results_table(results: list[QueryResult]) -> pd.DataFrame:
    """One row per (photo, candidate), best first, with the verdict and the evidence; a photo without any
    candidate keeps one row, so every photo of a round is accounted for."""
    rows = []
    for result in results:
        photo = {"photo": result.query, "verdict": result.verdict, "named": result.named, "decision": result.decision,
                 "decision_score": result.decision_score, "threshold": result.threshold, "new_threshold": result.new_below,
                 "known_image_id": result.known_image_id,
                 "gallery": result.gallery, "left_out": "; ".join(result.left_out), "calibrated": result.calibrated}
        rows += [{**photo, "rank": rank, **candidate_columns(c)} for rank, c in enumerate(result.candidates, 1)] or [photo]
    # Counts as counts: a column with empty cells (no keypoint evidence) would be written 14.0.
    return pd.DataFrame(rows).astype({column: "Int64" for column in ("global_rank", "matches", "inliers") if any(column in r for r in rows)})


# A candidate's photo facts, named as the gallery photo's in a flat table: beside the query's columns, a bare
# "station" would read as where the query was taken.
GALLERY_FACTS = ("station", "camera", "captured_at", "side")


def candidate_columns(candidate: Candidate) -> dict:
    from dataclasses import asdict

    return {f"gallery_{key}" if key in GALLERY_FACTS else key: value for key, value in asdict(candidate).items()}


def export_table(catalogue: Catalogue, competition: bool) -> pd.DataFrame:
    """All images; or, in the competition's train.csv format, `filename, ground_truth` of identified ones."""
    table = catalogue.images_table()
    if not competition:
        return table
    identified = table[table["individual"].notna()]
    # The competition's train.csv names photos of one folder: two photos of one name (from two folders) would read
    # back as one photo, under one label or, where they differ, two.
    shared = identified[identified["filename"].duplicated(keep=False)].sort_values("filename")
    if not shared.empty:
        first = shared[shared["filename"] == shared["filename"].iloc[0]]
        raise SpotmatchError(f"{catalogue.folder}: {shared['filename'].nunique()} file name(s) belong to more than one photo"
                             f" (e.g. {first['filename'].iloc[0]}: {', '.join(first['path'])}); the competition format holds one"
                             f" folder of unique names: rename the files, or export without --competition")
    return pd.DataFrame({"filename": identified["filename"], "ground_truth": identified["individual"]})


def print_failures(report: AddReport) -> None:
    for path, reason in report.failed:
        print(f"skipped: {one_line(reason)}", file=sys.stderr)
