"""`catalogue backup`: a consistent copy of a catalogue, taken while others use it, that is itself a catalogue.

Copying catalogue.db by hand is not a backup: in WAL mode the latest decisions may still sit in catalogue.db-wal,
and a copy taken during a write can be torn. SQLite's online backup copies one committed state; photos uploaded in
the review app live only in the catalogue's uploads/ folder, so they are copied too. The copy is built in a hidden
folder beside the target and renamed into place whole: an interrupted backup leaves no half-made catalogue.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from spotmatch.catalogue.store import DB_NAME, Catalogue, transaction
from spotmatch.errors import SpotmatchError

UPLOADS = "uploads"


@dataclass(frozen=True)
class BackupReport:
    folder: Path
    images: int
    individuals: int
    decisions: int
    uploads: int  # files of uploads/ copied; catalogue photos among them now point at the backup's copies
    photos_elsewhere: int  # catalogue photos the backup names by a path outside itself: referenced, not copied
    model_files: list[str]  # the checkpoint and calibration file the backup still reads where they are


def refuse_backup_target(catalogue_folder: Path, target: Path) -> Path:
    """The backup goes to a new (or empty) folder outside the catalogue; returned absolute."""
    target = Path(os.path.abspath(target)).resolve()  # the backup's rows name its uploads by this path
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SpotmatchError(f"--out {target}: already exists and is not an empty folder; name a new folder for the backup")
    catalogue_folder = catalogue_folder.resolve()
    if target.is_relative_to(catalogue_folder):
        raise SpotmatchError(f"--out {target}: inside the catalogue it backs up; put the backup outside {catalogue_folder}"
                             f" (ideally on another disk)")
    existing = next(path for path in target.parents if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise SpotmatchError(f"--out {target}: cannot write in {existing}; name a folder somewhere writable")
    return target


def backup_catalogue(catalogue: Catalogue, target: Path) -> BackupReport:
    """Copy `catalogue` to the new folder `target` (checked by `refuse_backup_target`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
    try:
        copy_path = building / DB_NAME
        with contextlib.closing(sqlite3.connect(copy_path, isolation_level=None)) as copy:
            catalogue.db.backup(copy)  # one read transaction: every committed decision, none half-written
            uploads = _copy_uploads(copy, catalogue.folder / UPLOADS, building / UPLOADS, target / UPLOADS)
            report = _report(copy, target, uploads)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, nothing left in a -wal beside it
            problems = [row[0] for row in copy.execute("PRAGMA integrity_check") if row[0] != "ok"]
        if problems:  # the source itself is damaged: a backup of it must not pass for a good one
            raise SpotmatchError(f"{catalogue.folder / DB_NAME}: damaged ({problems[0]}); `catalogue stats` names what, and an"
                                 f" older backup is the copy to keep")
        with open(copy_path, "rb") as written:
            os.fsync(written.fileno())
        # The catalogue's own permissions (a team's catalogue is often group-writable), not mkdtemp's private ones.
        shutil.copymode(catalogue.folder, building)
        shutil.copymode(catalogue.folder / DB_NAME, copy_path)
        os.replace(building, target)  # an empty target folder is replaced too
    except OSError as error:
        if error.filename and str(error.filename).startswith(str(building)):  # name the user's folder, not the hidden one
            raise OSError(error.errno, error.strerror, str(target)) from None
        raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return report


def _copy_uploads(copy: sqlite3.Connection, source: Path, destination: Path, final: Path) -> int:
    """Copy the uploaded photos and point the copy's rows for them at `final` (where `destination` will be): the
    backup then holds every photo that exists only inside the catalogue, and reads its own copies."""
    if not source.is_dir():
        return 0
    shutil.copytree(source, destination, symlinks=False)
    source = source.resolve()  # uploads are stored by their resolved path (`photo_path`)
    moved = []
    for image_id, path in copy.execute("SELECT id, path FROM images"):
        if Path(path).is_relative_to(source) and (destination / Path(path).relative_to(source)).is_file():
            moved.append((str(final / Path(path).relative_to(source)), image_id))
    with transaction(copy):
        copy.executemany("UPDATE images SET path = ? WHERE id = ?", moved)
    return sum(1 for path in destination.rglob("*") if path.is_file())


def _report(copy: sqlite3.Connection, target: Path, uploads: int) -> BackupReport:
    def count(sql: str, *args) -> int:
        return int(copy.execute(sql, args).fetchone()[0])

    paths = [Path(row[0]) for row in copy.execute("SELECT path FROM images")]
    meta = dict(copy.execute("SELECT key, value FROM meta WHERE key IN ('checkpoint', 'fusion')").fetchall())
    return BackupReport(folder=target, images=len(paths), individuals=count("SELECT COUNT(*) FROM individuals"),
                        decisions=count("SELECT COUNT(*) FROM confirmations"), uploads=uploads,
                        photos_elsewhere=sum(1 for path in paths if not path.is_relative_to(target)),
                        model_files=[meta[key] for key in ("checkpoint", "fusion") if meta.get(key)])
