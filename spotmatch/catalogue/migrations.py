"""Schema migrations: an ordered list of functions; `PRAGMA user_version` records how many have run.

A migration never edits an earlier one: a new schema change is a new function appended to MIGRATIONS,
so a catalogue made by any earlier version upgrades step by step, each step in its own transaction.
"""
from __future__ import annotations

import sqlite3
from typing import Callable


def _run_statements(db: sqlite3.Connection, script: str) -> None:
    # Not executescript: it commits first, which would split a migration from its version bump.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _create_tables(db: sqlite3.Connection) -> None:
    _run_statements(db, """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE individuals (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        );
        -- An image row is inserted together with its embedding, in one statement: no image without one.
        CREATE TABLE images (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL,
            filename TEXT NOT NULL,
            sha256 TEXT NOT NULL UNIQUE,
            individual_id INTEGER REFERENCES individuals(id) ON DELETE SET NULL,
            station TEXT,
            camera TEXT,
            captured_at TEXT,
            added_at TEXT NOT NULL,
            embedder_id TEXT NOT NULL,          -- names the embedding cache folder (.cache/embeddings/<id>)
            feature_key TEXT,                   -- local-feature cache entry (<cache>/local/<extractor>/<sha>.npz)
            embedding BLOB NOT NULL             -- float32, L2-normalised: the FAISS index is rebuilt from these
        );
        CREATE TABLE confirmations (
            id INTEGER PRIMARY KEY,
            action TEXT NOT NULL,               -- confirm, new, merge, split, rename
            image_id INTEGER REFERENCES images(id) ON DELETE SET NULL,
            individual_id INTEGER REFERENCES individuals(id) ON DELETE SET NULL,
            detail TEXT NOT NULL DEFAULT '',
            who TEXT NOT NULL,
            at TEXT NOT NULL
        );
    """)


def _add_lookup_indexes(db: sqlite3.Connection) -> None:
    # identify and export look images up by individual; review lists confirmations by image.
    _run_statements(db, """
        CREATE INDEX images_by_individual ON images(individual_id);
        CREATE INDEX confirmations_by_image ON confirmations(image_id);
    """)


def _add_flank_and_retirement(db: sqlite3.Connection) -> None:
    # identify restricts the gallery to the query's flank (a left flank's rosettes are not the right's),
    # and leaves out animals known to be dead or gone.
    _run_statements(db, """
        ALTER TABLE images ADD COLUMN side TEXT;             -- 'left', 'right', or NULL: not known
        ALTER TABLE individuals ADD COLUMN retired_at TEXT;  -- when it was retired, or NULL: still looked for
        CREATE INDEX images_by_station ON images(station);
    """)


def _normalise_capture_times(db: sqlite3.Connection) -> None:
    # Capture times came as written (EXIF "2012:07:22 01:53:20", a CSV's "2012-7-22 1-53-20"); date
    # restrictions compare ISO text. One that cannot be read is kept as it was, never dropped.
    from spotmatch.catalogue.store import iso_capture_time

    for image_id, captured_at in db.execute("SELECT id, captured_at FROM images WHERE captured_at IS NOT NULL").fetchall():
        normalised = iso_capture_time(captured_at)
        if normalised != captured_at:
            db.execute("UPDATE images SET captured_at = ? WHERE id = ?", (normalised, image_id))


def _name_history_rows(db: sqlite3.Connection) -> None:
    # A history row names its individual, so it still says whom it was about after a merge deletes that
    # individual (its id then becomes NULL). Older rows get the name their individual has now; rows of
    # individuals merged away before this version were re-pointed to the one they were merged into, and
    # what they said first cannot be recovered.
    _run_statements(db, """
        ALTER TABLE confirmations ADD COLUMN individual_name TEXT;
        UPDATE confirmations SET individual_name = (SELECT name FROM individuals WHERE individuals.id = confirmations.individual_id)
    """)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_create_tables, _add_lookup_indexes, _add_flank_and_retirement,
                                                          _normalise_capture_times, _name_history_rows]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection) -> int:
    """Run the migrations this database has not seen, each with its version bump in one transaction."""
    from spotmatch.catalogue.store import transaction

    while schema_version(db) < SCHEMA_VERSION:
        with transaction(db):
            version = schema_version(db)  # read inside the lock: another process may have migrated meanwhile
            if version < SCHEMA_VERSION:
                MIGRATIONS[version](db)
                db.execute(f"PRAGMA user_version = {version + 1}")
    return schema_version(db)
