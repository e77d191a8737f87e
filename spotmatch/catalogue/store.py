"""The catalogue on disk: one SQLite database (WAL) plus a FAISS index file beside it.

    <folder>/catalogue.db    individuals, images (with float32 embedding blobs), confirmations, settings
    <folder>/index.faiss     FAISS index over the identified images; a cache, rebuilt from the blobs
    <folder>/cache/          embedding and local-feature caches (by image content hash)

Every write is one `BEGIN IMMEDIATE ... COMMIT` transaction, so a process killed at any point leaves
the database as it was before or after that write, never in between. An image row and its embedding
are one INSERT: there is no image without its embedding.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sqlite3
import unicodedata
import zipfile
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from spotmatch.data.images import unset_capture_time
from spotmatch.data.tables import SIDES, parse_side
from spotmatch.errors import SpotmatchError
from spotmatch.io import write_cache_entry

DB_NAME = "catalogue.db"
INDEX_NAME = "index.faiss"
BUSY_TIMEOUT_S = 60.0  # another process's write transaction is waited for, not reported as "locked"


@contextlib.contextmanager
def _init_lock(folder: Path) -> Iterator[None]:
    """One `init` at a time per folder: a second waits, then finds the first one's catalogue and is refused,
    instead of deleting its half-built file or replacing its catalogue. The kernel drops the lock of a killed
    init; the small lock file stays (removing it would let a waiting init lock a file no one else sees)."""
    import fcntl

    with open(folder / f".{DB_NAME}.init-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def refuse_catalogue_folder(folder: Path) -> None:
    """A new catalogue never goes over an existing one, nor where a file is."""
    if (folder / DB_NAME).exists():
        raise SpotmatchError(f"{folder / DB_NAME}: a catalogue already exists here; use it, or init another folder")
    if folder.exists() and not folder.is_dir():
        raise SpotmatchError(f"{folder}: a file, not a folder; name a new or empty folder for the catalogue")


@dataclass
class CatalogueSettings:
    """What the catalogue was built with (set at init): its embeddings only mean something for this model."""

    checkpoint: str
    fusion: str | None
    embedder_id: str
    embedding_dim: int
    extractor: str = "rootsift"
    # The calibration file's content when the catalogue took it (init, relink): its thresholds decide every verdict,
    # so a `calibrate` run that rewrote it in place must not change them unseen. None: made before 2026-12-08.
    fusion_sha256: str | None = None


@dataclass(frozen=True)
class Confirmed:
    """A reviewer's decision as carried out: which individual the image is now filed under, and which one it
    was filed under before (None: it was unidentified), so that a mistaken confirm can be seen and undone."""

    image_id: int
    individual: str
    previous: str | None
    previous_removed: bool = False  # `previous` had no other image: it is gone, as an individual without images would be

    def text(self, who: str) -> str:
        was = "unidentified" if self.previous is None else self.previous
        change = f"was {was}" if self.previous != self.individual else "unchanged"
        if self.previous_removed:
            change += ", which had no other image and is removed"
        return f"image {self.image_id} is {self.individual} ({change}; confirmed by {who})"


@dataclass
class NewImage:
    """One image ready to insert: decoded and embedded already, outside any transaction."""

    path: str
    sha256: str
    embedding: np.ndarray
    embedder_id: str
    feature_key: str | None = None
    identity: str | None = None
    station: str | None = None
    camera: str | None = None
    captured_at: str | None = None
    side: str | None = None  # the flank shown: "left", "right", or None (not known)


# Year, month, day and optionally hour, minute, second and AM/PM, with any of the separators that EXIF
# ("2012:07:22 01:53:20"), ISO, camera-trap CSVs ("2012-7-22 1-53-20") and 12-hour clocks ("2012-8-25 4:16 PM") use.
_CAPTURE_DATE = r"(\d{4})[-:/.](\d{1,2})[-:/.](\d{1,2})"
_CAPTURE_TIME = re.compile(_CAPTURE_DATE + r"(?:[ T_](\d{1,2})[-:.](\d{1,2})(?:[-:.](\d{1,2}))?(?:\s*([AaPp])\.?[Mm]\.?)?)?")
_LEADING_DATE = re.compile(_CAPTURE_DATE + r"(?!\d)")  # "2012-7-14 dusk": a date, then something else


class EmptyGallery(SpotmatchError):
    """A gallery restriction that keeps no identified image."""


def folded_name(name: str) -> str:
    """A name as compared for near-namesakes: case folded, letters and digits only, in any script ("Ирбис" and
    "Барс" stay two names); a name of punctuation alone is kept whole, so that two of them stay apart too."""
    letters = "".join(character for character in name.casefold() if character.isalnum())
    return letters or name.casefold()


def individual_name(name: str) -> str:
    """A name as stored and looked up: surrounding spaces dropped (" Cat21 " is Cat21), an empty one refused,
    since a blank label would be exported as an animal without identity."""
    cleaned = name.strip()
    if not cleaned:
        raise SpotmatchError(f"individual name {name!r} is empty; give the animal a name (or `confirm --new` for a fresh one)")
    return cleaned


def reviewer(who: str) -> str:
    """Who made a decision, as recorded in the history: a blank one is refused, since a decision nobody
    made cannot be asked about later, and so is one with a control character (a terminal escape in it would
    rewrite the lines `history` prints)."""
    cleaned = who.strip()
    if not cleaned:
        raise SpotmatchError(f"--who {who!r} is blank; give the name of the person making this decision")
    if has_control_character(cleaned):
        raise SpotmatchError(f"--who {who!r} holds a control character (a line break, tab or terminal escape); write the name alone")
    return cleaned


def has_control_character(text: str) -> bool:
    return any(unicodedata.category(character) == "Cc" for character in text)


def unsafe_new_name(name: str) -> str | None:
    """Why `name` may not be given to a new individual, or None. A control character would rewrite the lines
    `identify` prints; a leading =, +, @ or - (other than a negative number) would run as a formula in the
    spreadsheet a team opens an export in. Names already in a catalogue stay usable."""
    if has_control_character(name):
        return "holds a control character (a line break, tab or terminal escape)"
    if name[:1] in ("=", "+", "@") or (name.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", name)):
        return f"starts with {name[0]!r}, which a spreadsheet opening an export would run as a formula"
    return None


def iso_capture_time(text: str | None) -> str | None:
    """ISO 8601 ("2012-07-22T01:53:20", or "2012-07-22" for a date alone) when `text` reads as year, month,
    day[, time]; a text that starts with such a date and goes on in words ("2012-7-14 dusk") gets its date as ISO
    and keeps the rest as written, so date restrictions (which compare the first ten characters) still find it;
    any other text is kept unchanged, so nothing a user wrote is lost (date restrictions skip it). EXIF's "not set"
    (zeros or blanks) is None: date unknown."""
    if text is None or unset_capture_time(text.strip()):
        return None
    read = _read_capture_time(text)
    if read is not None:
        moment, with_time = read
        return moment.isoformat() if with_time else moment.date().isoformat()
    leading = _LEADING_DATE.match(text.strip())
    if leading is not None:
        try:
            return date(*map(int, leading.groups())).isoformat() + text.strip()[leading.end():]
        except ValueError:  # month 13, 30 February, ...
            pass
    return text


def has_capture_date(text: str | None) -> bool:
    """Whether `text`, as `iso_capture_time` stores it, starts with a real date that --since/--until can compare."""
    stored = iso_capture_time(text)
    try:
        return stored is not None and date.fromisoformat(stored[:10]) is not None
    except ValueError:  # not a date at all, or 30 February kept as written
        return False


def reads_as_date(text: str) -> bool:
    """Whether `text` is year, month, day[, time] in a form `iso_capture_time` reads."""
    return _read_capture_time(text) is not None


def _read_capture_time(text: str) -> tuple[datetime, bool] | None:
    found = _CAPTURE_TIME.fullmatch(text.strip())
    if found is None:
        return None
    *parts, half_of_day = found.groups()
    numbers = [int(part) for part in parts if part is not None]
    if half_of_day is not None:  # a 12-hour clock: 12:05 AM is 00:05, 12:05 PM 12:05, 4:16 PM 16:16
        if not 1 <= numbers[3] <= 12:
            return None
        numbers[3] = numbers[3] % 12 + (12 if half_of_day in "Pp" else 0)
    try:
        return datetime(*numbers), len(numbers) > 3
    except ValueError:  # month 13, 30 February, ...
        return None


def station_key(station: str) -> str:
    """A station as compared for two spellings of one: case folded, spaces dropped ("s 26" is S26; "A1-2" and "A12"
    stay two codes)."""
    return "".join(station.casefold().split())


@dataclass(frozen=True)
class GalleryRestriction:
    """Which catalogue images a photo is matched against: a site, a season, the query's flank, some
    individuals, living ones only. Each field left at its default restricts nothing."""

    stations: tuple[str, ...] = ()
    since: date | None = None  # capture date at or after; images without a readable date are left out
    until: date | None = None  # capture date at or before
    side: str | None = None  # the query's flank: images of the other flank are left out, unknown ones kept
    individuals: tuple[str, ...] = ()
    include_retired: bool = False  # retired individuals (dead, gone) are left out unless this is set

    def __post_init__(self):
        if self.side is not None and self.side not in SIDES:
            raise SpotmatchError(f"--side {self.side}: use left or right")
        if self.since and self.until and self.since > self.until:
            # Most often a season across New Year (December to February) with both dates in one year.
            next_year = self.since.year + 1
            try:
                until = self.until.replace(year=next_year)
            except ValueError:  # 29 February, in a year without one
                until = date(next_year, 2, 28)
            raise SpotmatchError(f"--since {self.since} is after --until {self.until}; for a season across New Year give --until"
                                 f" in the next year ({until}), else swap them")

    @classmethod
    def from_text(cls, stations=(), since: str | None = None, until: str | None = None, side: str | None = None,
                  individuals=(), include_retired: bool = False) -> "GalleryRestriction":
        """From command-line or web-form text: dates as YYYY-MM-DD, side as a CSV's side column reads (left, right,
        l, r, any case); empty text means unset."""
        def day(value: str | None, flag: str) -> date | None:
            try:
                return date.fromisoformat(value) if value else None
            except ValueError:
                raise SpotmatchError(f"{flag} {value}: not a date; write it as YYYY-MM-DD") from None
        def names(values, flag: str) -> tuple[str, ...]:
            # " S04" is S04; an empty one (an unset shell variable) would search everything unseen
            stripped = tuple(value.strip() for value in values)
            if "" in stripped:
                raise SpotmatchError(f"{flag} '': empty; name one, or leave the option out to search them all")
            return stripped
        return cls(names(stations, "--station"), day(since, "--since"), day(until, "--until"), parse_side(side, "--side"),
                   names(individuals, "--individual"), include_retired)

    def describe(self) -> str:
        who = f"individual {' or '.join(self.individuals)}" if self.individuals else "every individual"
        parts = [who + ("" if self.include_retired else " not retired"),
                 f"station {' or '.join(self.stations)}" if self.stations else "",
                 f"captured {self.since or '...'} to {self.until or '...'}" if self.since or self.until else "",
                 f"{self.side} flank or unknown" if self.side else ""]
        return ", ".join(p for p in parts if p)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(db_path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S, read_only: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode; `read_only` for a catalogue this user cannot write (see `_read_only_uri`)."""
    # isolation_level=None: no implicit transactions; `transaction` below opens and closes each one.
    target = _read_only_uri(db_path, busy_timeout_s) if read_only else db_path
    db = sqlite3.connect(target, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False, uri=read_only)
    db.row_factory = sqlite3.Row
    if not read_only:  # switching to WAL is a write; a read-only catalogue is read in the mode it was left in
        db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def _read_only_uri(db_path: Path, busy_timeout_s: float) -> str:
    """SQLite's read-only mode, which still needs to create catalogue.db-shm beside the database; where the
    folder cannot be written either, the file is read as it is on disk (immutable), unless a -wal file holds
    changes not yet in it, which only a process that can write the folder may read."""
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=busy_timeout_s)) as probe:
            probe.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # opening is lazy: read to find out
        return uri
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorname not in ("SQLITE_CANTOPEN", "SQLITE_READONLY_DIRECTORY"):
            raise
    wal = db_path.with_name(f"{db_path.name}-wal")
    if wal.is_file() and wal.stat().st_size > 0:
        raise SpotmatchError(f"{db_path}: recent changes are in {wal.name}, which only a user who can write {db_path.parent}"
                             f" can read; run this as such a user (or ask the catalogue's owner to open it once)")
    return f"{uri}&immutable=1"


def refuse_other_database(db: sqlite3.Connection, db_path: Path) -> None:
    """A SQLite file that is not a catalogue (another tool's, named catalogue.db) is left exactly as it is, and a
    catalogue of a newer spotmatch is not written by this one."""
    from spotmatch.catalogue.migrations import SCHEMA_VERSION, schema_version

    version = schema_version(db)
    tables = sorted(row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    if version == 0 or "meta" not in tables:
        raise SpotmatchError(f"{db_path}: a SQLite database, but no spotmatch catalogue (tables: {', '.join(tables) or 'none'});"
                             f" left as it is: name a catalogue's folder, or init the catalogue in another folder")
    if version > SCHEMA_VERSION:
        raise SpotmatchError(f"{db_path}: made by a newer spotmatch (schema version {version}, this one knows up to"
                             f" {SCHEMA_VERSION}); upgrade spotmatch to use it")


def _cannot_write(db: sqlite3.Connection, exc: sqlite3.OperationalError) -> SpotmatchError:
    path = Path(db.execute("PRAGMA database_list").fetchone()[2])
    # SQLite's -wal and -shm files belong to whoever opened the catalogue first, with the database's mode: after a
    # teammate without write access read it, the owner of a catalogue.db that is not group-writable cannot write them.
    companions = [path.with_name(f"{path.name}-{suffix}") for suffix in ("wal", "shm")]
    blocking = [companion for companion in companions if companion.exists() and not os.access(companion, os.W_OK)]
    if blocking and os.access(path, os.W_OK):
        owner = _owner_name(blocking[0])
        return SpotmatchError(f"{blocking[0]}: made by {owner} (SQLite's file beside the catalogue) and this user cannot write it;"
                              f" ask {owner} or root to make {' and '.join(c.name for c in blocking)} writable for this user"
                              f" (chmod g+w, or chown), and make {path.name} group-writable so that such files are")
    return SpotmatchError(f"{path}: the catalogue cannot be written by this user (permissions: {exc}); run the command as"
                          f" a user who can write the file and its folder, or ask the catalogue's owner to")


def _owner_name(path: Path) -> str:
    import pwd

    uid = path.stat().st_uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no name on this machine (a container, a shared disk)
        return f"user {uid}"


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic write. IMMEDIATE takes the write lock up front, so two writers queue (busy timeout)
    instead of one failing half-way on a lock upgrade."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:  # SQLite has already rolled back after some errors
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if not (exc.sqlite_errorname or "").startswith("SQLITE_READONLY"):
            raise
        raise _cannot_write(db, exc) from None


def embedding_to_blob(embedding: np.ndarray) -> bytes:
    return np.ascontiguousarray(embedding, dtype="<f4").tobytes()


def blob_to_embedding(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


@dataclass(frozen=True)
class FormerName:
    """A name an individual gave up: `spelling` as it was written, then `fate` ("renamed to", "merged into") the
    individual called `successor` now."""

    spelling: str
    fate: str
    successor: str

    def __str__(self) -> str:
        return f"{self.spelling!r} was {self.fate} {self.successor!r}"


@dataclass(frozen=True)
class MovedPhotos:
    """Photos found moved from folder `old` to `new`: (new path, image id) each, of `stored` under `old`."""

    old: Path
    new: Path
    found: list[tuple[str, int]]
    stored: int


class Catalogue:
    """A catalogue folder: open with `Catalogue.open(folder)`, make with `Catalogue.create(folder, settings)`."""

    def __init__(self, folder: Path, db: sqlite3.Connection, writable: bool = True):
        self.folder, self.db = folder, db
        self.writable = writable  # False: opened read-only, because this user cannot write the database or its folder

    # --- opening -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str | Path, settings: CatalogueSettings) -> "Catalogue":
        from spotmatch.catalogue.migrations import migrate

        folder = Path(folder)
        refuse_catalogue_folder(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpotmatchError(f"{folder}: cannot make the catalogue folder ({exc.strerror}); choose a writable place") from None
        with _init_lock(folder):
            refuse_catalogue_folder(folder)  # again: an init that held the lock may have made it meanwhile
            # Built under a temporary name and renamed into place once its settings are in: an init killed half
            # way leaves no catalogue.db without settings, which no command could open and init would refuse.
            partial = folder / f"{DB_NAME}.part"
            for leftover in (partial, partial.with_name(f"{partial.name}-wal"), partial.with_name(f"{partial.name}-shm")):
                leftover.unlink(missing_ok=True)
            with contextlib.closing(connect(partial)) as db:
                migrate(db)
                with transaction(db):
                    for key, value in settings.__dict__.items():
                        if value is not None:
                            db.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, str(value)))
                    db.execute("INSERT INTO meta(key, value) VALUES ('created_at', ?)", (now_utc(),))
                db.execute("PRAGMA journal_mode=DELETE")  # folds the WAL into the file, which alone is renamed
            os.replace(partial, folder / DB_NAME)
        return cls.open(folder)

    @classmethod
    def open(cls, folder: str | Path) -> "Catalogue":
        from spotmatch.catalogue.migrations import SCHEMA_VERSION, migrate, schema_version

        folder = Path(folder)
        db_path = folder / DB_NAME
        if folder.is_file():
            raise SpotmatchError(f"{folder}: a file, not a catalogue folder; name the folder that holds {DB_NAME}")
        if not db_path.is_file():
            raise SpotmatchError(f"{folder}: no catalogue here; run `spotmatch catalogue init {folder} --checkpoint CKPT` first")
        # Opening read-write as a user who cannot write would fail even to read (WAL setup is a write).
        writable = os.access(db_path, os.W_OK) and os.access(folder, os.W_OK)
        try:
            with contextlib.closing(connect(db_path, read_only=True)) as probe:
                refuse_other_database(probe, db_path)  # before WAL mode or a migration writes to it
            catalogue = cls(folder, connect(db_path, read_only=not writable), writable)
            if writable:
                migrate(catalogue.db)  # older catalogues upgrade on open
            elif schema_version(catalogue.db) < SCHEMA_VERSION:
                raise SpotmatchError(f"{db_path}: made by an older spotmatch (schema version {schema_version(catalogue.db)},"
                                     f" now {SCHEMA_VERSION}); open it once as a user who can write it, so it is upgraded")
        except sqlite3.DatabaseError as exc:
            if exc.sqlite_errorname in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                raise SpotmatchError(f"{db_path}: not a readable catalogue database ({exc}); restore it from a backup"
                                     f" (the folder `catalogue backup` made is a catalogue: use it)") from None
            raise SpotmatchError(f"{db_path}: cannot open the catalogue ({exc}); check that this user can read the file"
                                 f" and write its folder") from None
        return catalogue

    def close(self) -> None:
        self.db.close()

    @property
    def cache_dir(self) -> Path:
        return self.folder / "cache"

    @property
    def index_path(self) -> Path:
        return self.folder / INDEX_NAME

    def settings(self) -> CatalogueSettings:
        meta = {row["key"]: row["value"] for row in self.db.execute("SELECT key, value FROM meta")}
        if "checkpoint" not in meta:  # only a catalogue whose init was killed before 2026-12-07 lacks its settings
            raise SpotmatchError(f"{self.folder / DB_NAME}: its `catalogue init` never finished (no settings recorded);"
                                 f" delete {self.folder / DB_NAME} and run init again")
        return CatalogueSettings(checkpoint=meta["checkpoint"], fusion=meta.get("fusion"), embedder_id=meta["embedder_id"],
                                 embedding_dim=int(meta["embedding_dim"]), extractor=meta.get("extractor", "rootsift"),
                                 fusion_sha256=meta.get("fusion_sha256"))

    def check_embedder(self, embedder_id: str, dim: int) -> None:
        """Refuse embeddings from another model: cosines across two models are meaningless."""
        settings = self.settings()
        if dim != settings.embedding_dim:
            raise SpotmatchError(
                f"{self.folder / DB_NAME}: catalogue embeddings have {settings.embedding_dim} dimensions but this model gives {dim};"
                f" use the catalogue's checkpoint {settings.checkpoint} or init a new catalogue")
        if embedder_id != settings.embedder_id:
            raise SpotmatchError(
                f"{self.folder / DB_NAME}: catalogue was built with embedder {settings.embedder_id}, not {embedder_id};"
                f" use the catalogue's checkpoint {settings.checkpoint} or init a new catalogue")

    # --- reads ---------------------------------------------------------------------------------------
    def known_images(self, hashes: list[str]) -> dict[str, tuple[int, str | None, str | None]]:
        """sha256 → (image id, individual or None, the identity its adding table gave or None) of the hashes
        already in the catalogue. The two names differ once a reviewer renamed, merged or relabelled it."""
        known: dict[str, tuple[int, str | None, str | None]] = {}
        for start in range(0, len(hashes), 500):  # SQLite caps the number of bound parameters
            chunk = hashes[start:start + 500]
            marks = ",".join("?" * len(chunk))
            known.update((sha, (image_id, name, imported_as)) for sha, image_id, name, imported_as in self.db.execute(
                "SELECT images.sha256, images.id, individuals.name, imports.individual_name FROM images"
                " LEFT JOIN individuals ON individuals.id = images.individual_id"
                " LEFT JOIN confirmations AS imports ON imports.image_id = images.id AND imports.action = 'import'"
                f" WHERE images.sha256 IN ({marks})", chunk))
        return known

    def image_by_sha(self, sha256: str) -> sqlite3.Row | None:
        return self.db.execute("SELECT * FROM images WHERE sha256 = ?", (sha256,)).fetchone()

    def image(self, image_id: int) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise SpotmatchError(f"{self.folder}: no image with id {image_id} in the catalogue; see `spotmatch catalogue export`")
        return row

    def individual_id(self, name: str) -> int:
        row = self.db.execute("SELECT id FROM individuals WHERE name = ?", (individual_name(name),)).fetchone()
        if row is None:
            raise SpotmatchError(f"{self.folder}: no individual named {name!r}; the names are in `spotmatch catalogue export`")
        return int(row[0])

    def individual_names(self) -> dict[int, str]:
        return {int(r[0]): r[1] for r in self.db.execute("SELECT id, name FROM individuals")}

    def identified_images(self) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, individual ids) of every image assigned to an individual, by image id."""
        rows = self.db.execute("SELECT id, individual_id FROM images WHERE individual_id IS NOT NULL ORDER BY id").fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.int64)

    def restricted_image_ids(self, restriction: GalleryRestriction) -> np.ndarray:
        """Ids, ascending, of the identified images that `restriction` keeps; none is an error naming it, and so
        is a station or individual the catalogue does not have (a typo would otherwise narrow the search unseen)."""
        self._refuse_unknown(restriction)
        clauses, values = ["images.individual_id IS NOT NULL"], []
        if not restriction.include_retired:
            clauses.append("individuals.retired_at IS NULL")
        # Every spelling of a wanted station: `add` refuses a second one ("s26" beside S26), but a catalogue written
        # before it did may hold both, and either half left out would go unseen.
        wanted_keys = {station_key(station) for station in restriction.stations}
        spellings = [station for station in self.stations() if station_key(station) in wanted_keys]
        for column, wanted, asked in (("images.station", spellings, restriction.stations),
                                      ("individuals.name", restriction.individuals, restriction.individuals)):
            if asked:  # a station asked for but spelt nowhere keeps nothing (IN ()), never the whole catalogue
                clauses.append(f"{column} IN ({','.join('?' * len(wanted))})")
                values += list(wanted)
        if restriction.side:
            clauses.append("(images.side IS NULL OR images.side = ?)")
            values.append(restriction.side)
        if restriction.since or restriction.until:
            # ISO text compares as dates; a capture time that could not be read as one is never in range.
            clauses.append("images.captured_at GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*'")
            clauses.append("substr(images.captured_at, 1, 10) BETWEEN ? AND ?")
            values += [(restriction.since or date.min).isoformat(), (restriction.until or date.max).isoformat()]
        rows = self.db.execute("SELECT images.id FROM images JOIN individuals ON individuals.id = images.individual_id"
                               f" WHERE {' AND '.join(clauses)} ORDER BY images.id", values).fetchall()
        if not rows:
            raise EmptyGallery(f"{self.folder}: no identified image matches the restriction ({restriction.describe()});"
                                 f" widen it (`spotmatch catalogue export` lists stations, dates and sides)")
        return np.array([r[0] for r in rows], dtype=np.int64)

    def _refuse_unknown(self, restriction: GalleryRestriction) -> None:
        for what, wanted, known_names, key in (("station", restriction.stations, self.stations(), station_key),
                                               ("individual", restriction.individuals, self.individual_names().values(), str)):
            known = {key(name) for name in known_names}
            unknown = [name for name in wanted if key(name) not in known]
            if unknown:
                raise SpotmatchError(f"{self.folder}: no {what} named {', '.join(map(repr, unknown))} in the catalogue; check the"
                                     f" spelling (`spotmatch catalogue export` lists them)")
        retired = [name for name in restriction.individuals if not restriction.include_retired and self._retired(self.individual_id(name))]
        if retired:  # named, so wanted: searching the others alone would drop it without a word
            raise SpotmatchError(f"{self.folder}: {', '.join(map(repr, retired))} retired; add --include-retired to search"
                                 f" {'it' if len(retired) == 1 else 'them'}, or leave {'it' if len(retired) == 1 else 'them'} out")

    def embeddings(self, image_ids: np.ndarray) -> np.ndarray:
        dim = self.settings().embedding_dim
        out = np.empty((len(image_ids), dim), dtype=np.float32)
        position = {int(i): n for n, i in enumerate(image_ids)}
        for image_id, blob in self.db.execute("SELECT id, embedding FROM images WHERE individual_id IS NOT NULL"):
            if image_id in position:
                out[position[image_id]] = blob_to_embedding(blob)
        return out

    def images_table(self):
        import pandas as pd

        return pd.read_sql_query(
            "SELECT images.id AS image_id, images.filename, images.path, images.sha256, individuals.name AS individual,"
            " images.station, images.camera, images.captured_at, images.side, images.added_at"
            " FROM images LEFT JOIN individuals ON individuals.id = images.individual_id ORDER BY images.id", self.db)

    def history(self, image_id: int | None = None, individual: str | None = None):
        """The decisions recorded about one image and/or one individual (every one when neither), oldest first.
        An individual's rows include those recorded under a name it had before a rename, and those of an
        individual merged into another under its own name."""
        import pandas as pd

        where, values = [], []
        if image_id is not None:
            self.image(image_id)
            where.append("confirmations.image_id = ?")
            values.append(image_id)
        if individual is not None:
            name = individual_name(individual)
            current = self.db.execute("SELECT id FROM individuals WHERE name = ?", (name,)).fetchone()
            known = current is not None or self.db.execute(
                "SELECT 1 FROM confirmations WHERE individual_name = ? LIMIT 1", (name,)).fetchone() is not None
            if not known:
                raise SpotmatchError(f"{self.folder}: no individual named {individual!r} now or in the history;"
                                     " the names are in `spotmatch catalogue export`")
            if current is None:  # merged away or renamed since: its rows only by the name they were recorded under
                where.append("confirmations.individual_name = ?")
                values.append(name)
            else:
                where.append("(confirmations.individual_name = ? OR confirmations.individual_id = ?)")
                values += [name, current[0]]
        sql = ("SELECT confirmations.at, confirmations.who, confirmations.action, confirmations.image_id,"
               " images.path AS photo, confirmations.individual_name AS individual, confirmations.detail"
               " FROM confirmations LEFT JOIN images ON images.id = confirmations.image_id"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY confirmations.id")
        table = pd.read_sql_query(sql, self.db, params=values)
        table["image_id"] = table["image_id"].astype("Int64")
        return table

    def stats(self) -> dict:
        count = lambda sql: int(self.db.execute(sql).fetchone()[0])  # noqa: E731
        from spotmatch.catalogue.migrations import schema_version

        return {"individuals": count("SELECT COUNT(*) FROM individuals"),
                "retired_individuals": count("SELECT COUNT(*) FROM individuals WHERE retired_at IS NOT NULL"),
                "images": count("SELECT COUNT(*) FROM images"),
                "identified_images": count("SELECT COUNT(*) FROM images WHERE individual_id IS NOT NULL"),
                "unidentified_images": count("SELECT COUNT(*) FROM images WHERE individual_id IS NULL"),
                "confirmations": count("SELECT COUNT(*) FROM confirmations"),
                "schema_version": schema_version(self.db), **self.settings().__dict__}

    # --- writes: each one transaction ------------------------------------------------------------------
    def _individual_id_creating(self, name: str) -> int:
        """Inside a transaction: checked here, a near-namesake made meanwhile by another process is seen."""
        name = individual_name(name)
        row = self.db.execute("SELECT id FROM individuals WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return int(row[0])
        self._refuse_unsafe_name(name)
        self._refuse_near_namesake(name)
        self._refuse_former_name(name)
        return int(self.db.execute("INSERT INTO individuals(name, created_at) VALUES (?, ?)", (name, now_utc())).lastrowid)

    def _refuse_unsafe_name(self, name: str) -> None:
        reason = unsafe_new_name(name)
        if reason is not None:
            raise SpotmatchError(f"{self.folder}: the name {name!r} {reason}; give the animal another name")

    def stations(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT DISTINCT station FROM images WHERE station IS NOT NULL ORDER BY station")]

    def has_individual(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM individuals WHERE name = ?", (individual_name(name),)).fetchone() is not None

    def _record(self, action: str, image_id: int | None, individual_id: int | None, who: str, detail: str = "") -> None:
        # The name is kept with the row: it still says whom it was about once the individual is merged away.
        self.db.execute("INSERT INTO confirmations(action, image_id, individual_id, individual_name, detail, who, at)"
                        " VALUES (?, ?, ?, (SELECT name FROM individuals WHERE id = ?), ?, ?, ?)",
                        (action, image_id, individual_id, individual_id, detail, reviewer(who), now_utc()))

    def _retired(self, individual_id: int) -> bool:
        return self.db.execute("SELECT retired_at FROM individuals WHERE id = ?", (individual_id,)).fetchone()[0] is not None

    def insert_images(self, images: list[NewImage], who: str) -> list[int]:
        """Insert a batch in one transaction; an image whose hash is already there (another process added it
        meanwhile) is skipped. Returns the new image ids. A labelled image's identity is recorded as an import."""
        expected_dim = self.settings().embedding_dim
        new_ids: list[int] = []
        with transaction(self.db) as db:
            for image in images:
                if image.embedding.shape != (expected_dim,):
                    raise SpotmatchError(f"{image.path}: embedding has shape {image.embedding.shape}, the catalogue stores"
                                         f" {expected_dim} dimensions; use the catalogue's checkpoint")
                if db.execute("SELECT 1 FROM images WHERE sha256 = ?", (image.sha256,)).fetchone():
                    continue  # another process added it meanwhile: no individual made for a label it never gets
                individual = self._individual_id_creating(image.identity) if image.identity else None
                cursor = db.execute(
                    "INSERT OR IGNORE INTO images(path, filename, sha256, individual_id, station, camera, captured_at, side, added_at,"
                    " embedder_id, feature_key, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (image.path, Path(image.path).name, image.sha256, individual, image.station, image.camera,
                     iso_capture_time(image.captured_at), image.side, now_utc(), image.embedder_id, image.feature_key,
                     embedding_to_blob(image.embedding)))
                if cursor.rowcount:
                    new_ids.append(int(cursor.lastrowid))
                    if individual is not None:
                        self._record("import", cursor.lastrowid, individual, who, "identity from the added table")
        return new_ids

    def confirm(self, image_id: int, individual: str | None, who: str) -> Confirmed:
        """Assign an image to `individual` (made if new), or to a fresh individual when None."""
        with transaction(self.db):
            self.image(image_id)
            previous = self.db.execute("SELECT individuals.id, individuals.name FROM images JOIN individuals"
                                       " ON individuals.id = images.individual_id WHERE images.id = ?", (image_id,)).fetchone()
            if individual is None:
                individual = self._fresh_name()
                action = "new"
            else:
                individual, action = self.confirmable_name(individual), "confirm"
            individual_id = self._individual_id_creating(individual)
            self.db.execute("UPDATE images SET individual_id = ? WHERE id = ?", (individual_id, image_id))
            self._record(action, image_id, individual_id, who, f"was {previous['name']}" if previous else "")
            # Its last image moved away, the old individual would stay counted and listed with nothing to match:
            # removed, as merge removes the absorbed one; its history rows keep its name.
            emptied = previous is not None and previous["id"] != individual_id and self.db.execute(
                "SELECT 1 FROM images WHERE individual_id = ? LIMIT 1", (previous["id"],)).fetchone() is None
            if emptied:
                self.db.execute("DELETE FROM individuals WHERE id = ?", (previous["id"],))
        return Confirmed(image_id, individual, previous["name"] if previous else None, emptied)

    def relink_files(self, checkpoint: str | None, fusion: str | None, who: str, fusion_sha256: str | None = None) -> None:
        """Point the catalogue at its model files' new places, or a calibration file made again for its model (the
        caller checked they are the same model, and a calibration for it); recorded in the history like a
        reviewer's decision."""
        who = reviewer(who)
        with transaction(self.db) as db:
            for key, value in (("checkpoint", checkpoint), ("fusion", fusion), ("fusion_sha256", fusion_sha256)):
                if value is not None:
                    db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                               (key, value))
                    if key != "fusion_sha256":
                        self._record("relink", None, None, who, f"{key} -> {value}"
                                     + (f" (content {fusion_sha256[:12]})" if key == "fusion" and fusion_sha256 else ""))

    def moved_photos(self, old: Path, new: Path) -> MovedPhotos:
        """Which photos stored under folder `old` are now under `new` (archived, moved to another disk): only where
        the new place holds the same photo (same content hash), so photos that were not moved, or a different photo
        of the same name, keep their path. Refused when none is; reads the files and writes nothing."""
        from spotmatch.data.images import file_sha256

        under_old = [(image_id, new / Path(path).relative_to(old), sha)
                     for image_id, path, sha in self.db.execute("SELECT id, path, sha256 FROM images ORDER BY id")
                     if Path(path).is_relative_to(old)]
        if not under_old:
            raise SpotmatchError(f"{self.folder}: no catalogue photo is stored under {old}; `spotmatch catalogue export` lists their paths")
        found = [(str(candidate), image_id) for image_id, candidate, sha in under_old
                 if candidate.is_file() and file_sha256(candidate) == sha]
        if not found:
            raise SpotmatchError(f"{new}: none of the {len(under_old)} photos stored under {old} is here with the same content;"
                                 f" name the folder they were moved to")
        return MovedPhotos(old, new, found, len(under_old))

    def relink_photos(self, moved: MovedPhotos, who: str) -> None:
        """Rewrite the paths `moved_photos` found, in one transaction, recorded in the history."""
        who = reviewer(who)
        with transaction(self.db) as db:
            db.executemany("UPDATE images SET path = ? WHERE id = ?", moved.found)
            self._record("relink", None, None, who, f"photos {moved.old} -> {moved.new} ({len(moved.found)} of {moved.stored})")

    def near_namesake(self, name: str, besides: str | None = None) -> str | None:
        """The individual, other than `besides`, whose name differs from the new name `name` only in case, spaces or
        punctuation ("cat21", "Cat 21" beside Cat21): a typo far more often than a new animal, which would quietly
        split one animal in two. None when `name` is an individual's own name, or like no other."""
        existing = [row[0] for row in self.db.execute("SELECT name FROM individuals")]
        if name in existing:
            return None
        return next((other for other in existing if other != besides and folded_name(other) == folded_name(name)), None)

    def former_name(self, name: str) -> FormerName | None:
        """The individual once called `name` (or a spelling of it that differs only in case, spaces or punctuation)
        that lives on under another name: renamed, or merged into another. None for a name never used, one an
        individual has now, or one whose individual is gone (its last photo confirmed as another animal)."""
        if self.has_individual(name):
            return None
        folded = folded_name(name)
        spellings = [row[0] for row in self.db.execute("SELECT DISTINCT individual_name FROM confirmations WHERE"
                                                       " individual_name IS NOT NULL") if folded_name(row[0]) == folded]
        for spelling in spellings:
            # Rows about an individual keep the name it had then, and its id until it is merged away.
            renamed = self.db.execute("SELECT individuals.name FROM confirmations JOIN individuals ON individuals.id ="
                                      " confirmations.individual_id WHERE confirmations.individual_name = ? AND"
                                      " individuals.name != ? ORDER BY confirmations.id DESC LIMIT 1", (spelling, spelling)).fetchone()
            if renamed is not None:
                return FormerName(spelling, "renamed to", renamed[0])
            pattern = "merged " + spelling.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + " into %"
            merged = self.db.execute("SELECT individuals.name FROM confirmations JOIN individuals ON individuals.id ="
                                     " confirmations.individual_id WHERE action = 'merge' AND detail LIKE ? ESCAPE '\\'"
                                     " ORDER BY confirmations.id DESC LIMIT 1", (pattern,)).fetchone()
            if merged is not None:
                return FormerName(spelling, "merged into", merged[0])
        return None

    def confirmable_name(self, individual: str) -> str:
        """The name as `confirm` stores it, or a one-line refusal: blank, a near-namesake of another individual, or
        the former name of one."""
        individual = individual_name(individual)
        twin = self.near_namesake(individual)
        if twin is not None:
            raise SpotmatchError(f"{self.folder}: no individual named {individual!r}; did you mean {twin!r}? (a new animal"
                                 f" needs a name that differs from it in more than case, spaces or punctuation)")
        self._refuse_former_name(individual)
        if not self.has_individual(individual):
            self._refuse_unsafe_name(individual)
        return individual

    def _refuse_former_name(self, name: str, besides: str | None = None) -> None:
        """A name an individual gave up (renamed, merged away) would make a second animal of a label written before:
        an old table added again, a reviewer working from an old list. `besides`: the individual it may go back to
        (a rename undone)."""
        former = self.former_name(name)
        if former is not None and former.successor != besides:
            raise SpotmatchError(f"{self.folder}: no individual is named {name!r} now: {former} (`spotmatch catalogue history"
                                 f" {self.folder} --individual {former.spelling}`); use its name now, or give a new animal a"
                                 f" name never used")

    def _refuse_near_namesake(self, name: str, besides: str | None = None) -> None:
        """For a name given to a rename or a split, where nothing can mean the existing individual."""
        twin = self.near_namesake(name, besides)
        if twin is not None:
            raise SpotmatchError(f"{self.folder}: {name!r} is too like the existing {twin!r} (only case, spaces or punctuation"
                                 f" differ); merge into {twin!r} if they are one animal, or choose a name that differs more")

    def _fresh_name(self) -> str:
        """`individual-NNNN`, a name no individual has or had (SQLite reuses a merged-away individual's id)."""
        number = int(self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM individuals").fetchone()[0])
        while self.db.execute("SELECT 1 FROM individuals WHERE name = ?1 UNION ALL SELECT 1 FROM confirmations WHERE"
                              " individual_name = ?1 LIMIT 1", (f"individual-{number:04d}",)).fetchone():
            number += 1
        return f"individual-{number:04d}"

    def merge(self, keep: str, absorb: str, who: str) -> int:
        """Move every image of `absorb` to `keep` and delete `absorb`. Returns how many images moved.
        `absorb`'s history stays as it was, naming it (`confirmations.individual_name`), its id cleared."""
        keep, absorb = individual_name(keep), individual_name(absorb)
        who = reviewer(who)  # checked here too: an individual without images is merged without a history row
        if keep == absorb:
            raise SpotmatchError(f"{self.folder}: cannot merge {keep!r} into itself; name two different individuals")
        with transaction(self.db):
            keep_id, absorb_id = self.individual_id(keep), self.individual_id(absorb)
            # One of them retired: the merged animal would silently be looked for again, or hidden; the user decides.
            if self._retired(keep_id) != self._retired(absorb_id):
                retired, living = (keep, absorb) if self._retired(keep_id) else (absorb, keep)
                raise SpotmatchError(f"{self.folder}: {retired!r} is retired and {living!r} is not; run `spotmatch catalogue"
                                     f" retire {self.folder} {retired} --undo` first (or retire {living}), then merge")
            moved = [r[0] for r in self.db.execute("SELECT id FROM images WHERE individual_id = ?", (absorb_id,))]
            self.db.execute("UPDATE images SET individual_id = ? WHERE individual_id = ?", (keep_id, absorb_id))
            for image_id in moved or [None]:  # an individual without images (made before 2026-12-07) still leaves a row
                self._record("merge", image_id, keep_id, who, f"merged {absorb} into {keep}")
            self.db.execute("DELETE FROM individuals WHERE id = ?", (absorb_id,))  # its history rows: id NULL, name kept
        return len(moved)

    def split(self, individual: str, image_ids: list[int], new_name: str | None, who: str) -> str:
        """Move the listed images of `individual` to a new individual. Returns the new individual's name."""
        with transaction(self.db):
            source_id = self.individual_id(individual)
            owned = {r[0] for r in self.db.execute("SELECT id FROM images WHERE individual_id = ?", (source_id,))}
            strangers = [i for i in image_ids if i not in owned]
            if strangers or not image_ids:
                raise SpotmatchError(f"{self.folder}: image(s) {strangers or image_ids} are not images of {individual!r};"
                                     f" list its image ids with `spotmatch catalogue export`")
            repeated = sorted({i for i in image_ids if image_ids.count(i) > 1})
            if repeated:
                raise SpotmatchError(f"{self.folder}: image id(s) {repeated} listed more than once; list each image once")
            if set(image_ids) == owned:  # an individual without images would still be counted and listed
                raise SpotmatchError(f"{self.folder}: these are all the images of {individual!r}; to give it another name use"
                                     f" `spotmatch catalogue rename`")
            new_name = individual_name(new_name) if new_name is not None else self._fresh_name()
            if self.has_individual(new_name):
                raise SpotmatchError(f"{self.folder}: individual {new_name!r} already exists; split into a new name (or merge)")
            self._refuse_near_namesake(new_name)
            new_id = self._individual_id_creating(new_name)
            for image_id in image_ids:
                self.db.execute("UPDATE images SET individual_id = ? WHERE id = ?", (new_id, image_id))
                self._record("split", image_id, new_id, who, f"split from {individual}")
        return new_name

    def rename(self, old: str, new: str, who: str) -> None:
        new = individual_name(new)
        with transaction(self.db):
            individual_id = self.individual_id(old)
            if individual_name(old) == new:
                raise SpotmatchError(f"{self.folder}: {old!r} already has that name; nothing to rename")
            if self.has_individual(new):
                raise SpotmatchError(f"{self.folder}: individual {new!r} already exists; merge the two instead")
            self._refuse_unsafe_name(new)
            self._refuse_near_namesake(new, besides=individual_name(old))  # Cat5 -> cat5 is a rename, not a typo
            self._refuse_former_name(new, besides=individual_name(old))  # its own former name back: a rename undone
            self.db.execute("UPDATE individuals SET name = ? WHERE id = ?", (new, individual_id))
            self._record("rename", None, individual_id, who, f"{old} -> {new}")

    def retire(self, name: str, who: str, undo: bool = False) -> None:
        """Mark an individual as no longer to be looked for (dead, left the area), or undo that. Its images
        and history stay; identify leaves it out unless asked to include retired individuals."""
        with transaction(self.db):
            individual_id = self.individual_id(name)
            if self._retired(individual_id) != undo:  # a second row would record a decision that changed nothing
                raise SpotmatchError(f"{self.folder}: {individual_name(name)!r} is {'not' if undo else 'already'} retired;"
                                     f" nothing to {'undo' if undo else 'do'}")
            self.db.execute("UPDATE individuals SET retired_at = ? WHERE id = ?", (None if undo else now_utc(), individual_id))
            self._record("unretire" if undo else "retire", None, individual_id, who)

    # --- the FAISS index: a cache of the identified images' embeddings -----------------------------------
    def search_index(self):
        """(FAISS index, image ids in index order) over the identified images; rebuilt from the database's
        blobs and saved beside it when the saved one is missing or was built from a different image set."""
        from spotmatch.global_embed.index import IndexConfig, build_index

        image_ids, _ = self.identified_images()
        if len(image_ids) == 0:
            raise SpotmatchError(f"{self.folder}: the catalogue has no identified images yet; add a labelled CSV"
                                 f" (`catalogue add CSV`) or confirm photos first")
        key = self._index_key(image_ids)
        saved = self._load_index(key)
        if saved is not None:
            return saved
        index = build_index(self.embeddings(image_ids), IndexConfig(kind="auto"))  # the saved index's key assumes this
        if self.writable:  # a read-only catalogue is searched all the same, with the index built for this call
            self._save_index(index, image_ids, key)
        return index, image_ids

    def _index_key(self, image_ids: np.ndarray) -> str:
        """What a saved index must have been built from: these image ids with these photos (content hashes),
        embedded by this model. Ids alone match another catalogue's index, or one copied from a backup."""
        sha_of = dict(self.db.execute("SELECT id, sha256 FROM images WHERE individual_id IS NOT NULL"))
        digest = hashlib.sha256(self.settings().embedder_id.encode())
        for image_id in image_ids.tolist():
            digest.update(f"{image_id}:{sha_of[image_id]};".encode())
        return digest.hexdigest()

    def _load_index(self, key: str):
        import faiss

        if not self.index_path.is_file():
            return None
        try:
            with np.load(self.index_path) as saved:
                if str(saved["key"]) != key:
                    return None  # built from other photos: rebuild it
                return faiss.deserialize_index(saved["index"]), saved["image_ids"]
        except (OSError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile):
            return None  # unreadable, or saved before it carried a key: it is only a cache, rebuild it

    def _save_index(self, index, image_ids: np.ndarray, key: str) -> None:
        import faiss

        # Index, its id list and what it was built from in one file, renamed into place: they can never disagree.
        # Rebuilt from the database when missing, so a full disk skips it rather than failing identify.
        buffer = io.BytesIO()
        np.savez(buffer, index=faiss.serialize_index(index), image_ids=image_ids, key=np.array(key))
        write_cache_entry(self.index_path, lambda tmp: tmp.write_bytes(buffer.getvalue()))

    def integrity_problems(self) -> list[str]:
        """What `PRAGMA integrity_check` and the catalogue's own invariants say; empty when all is well."""
        try:
            problems = [r[0] for r in self.db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        except sqlite3.DatabaseError as exc:  # damage deep enough that the check itself stops on it
            return [str(exc)]
        dim_bytes = self.settings().embedding_dim * 4
        bad = self.db.execute("SELECT COUNT(*) FROM images WHERE embedding IS NULL OR length(embedding) != ?", (dim_bytes,)).fetchone()[0]
        if bad:
            problems.append(f"{bad} image row(s) without a whole embedding")
        problems += [f"foreign key violation in {r[0]}" for r in self.db.execute("PRAGMA foreign_key_check")]
        return problems
