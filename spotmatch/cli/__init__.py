"""`spotmatch` command line: each verb is a thin function that builds a config and calls one `main`.

Command modules register on the shared `app`; `main` turns a SpotmatchError into one line on stderr
and exit status 2, never a traceback, and Ctrl-C into one line and exit status 130.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import sys

from spotmatch.cli.app import app
from spotmatch.data.images import quiet_large_photos
from spotmatch.errors import SpotmatchError


def _register_commands() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name.endswith("_cmds"):
            importlib.import_module(f"{__name__}.{module.name}")


INTERRUPTED = ("interrupted: output files are written whole or not at all, and catalogue batches already added stay;"
               " run the same command again to go on (`train`: with --resume)")


def _on_interrupt(main_pid: int):
    def handler(signum, frame):
        if os.getpid() == main_pid:  # image-decoding workers get the same Ctrl-C: one line, from the main process
            print(INTERRUPTED, file=sys.stderr)
        raise KeyboardInterrupt  # typer turns it into exit status 130
    return handler


def main() -> None:
    _register_commands()
    quiet_large_photos()  # the command line owns the process; a library caller keeps its own warning filters
    signal.signal(signal.SIGINT, _on_interrupt(os.getpid()))
    try:
        app()
    except SpotmatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        damage = _database_damage(exc)
        if damage is None:
            raise
        print(f"error: the catalogue database is damaged ({damage}); restore catalogue.db from a backup (or `catalogue export`"
              f" of a copy made before the damage)", file=sys.stderr)
        sys.exit(2)


def _database_damage(exc: BaseException | None) -> sqlite3.DatabaseError | None:
    """The SQLite damage behind `exc` (pandas wraps it in its own DatabaseError), if any: met on a page a command
    reads, past the checks made on opening (`catalogue stats` checks every page)."""
    while exc is not None:
        if isinstance(exc, sqlite3.DatabaseError) and exc.sqlite_errorname in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


__all__ = ["app", "main"]
