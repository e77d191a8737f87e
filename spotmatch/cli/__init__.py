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
from spotmatch.errors import SpotmatchError, one_line
from spotmatch.io import DISK_WRITE_FAILURES


def _register_commands() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name.endswith("_cmds"):
            importlib.import_module(f"{__name__}.{module.name}")


INTERRUPTED = ("interrupted: output files are written whole or not at all, and catalogue batches already added stay;"
               " run the same command again to go on (`train`: with --resume)")


def _on_interrupt(main_pid: int):
    """SIGINT's, SIGTERM's and SIGHUP's handler: one line, then the KeyboardInterrupt that unwinds the run (its
    `atomic_path`s remove their temporary files)."""
    def handler(signum, frame):
        if os.getpid() == main_pid:  # image-decoding workers get the same Ctrl-C: one line, from the main process
            try:
                print(INTERRUPTED, file=sys.stderr)
            except OSError:  # a hung-up terminal cannot take the line; the run must still end as interrupted
                pass
        raise KeyboardInterrupt  # typer turns it into exit status 130
    return handler


def main() -> None:
    _register_commands()
    quiet_large_photos()  # the command line owns the process; a library caller keeps its own warning filters
    # `kill` and a scheduler's stop (SIGTERM), and a dropped terminal or ssh session (SIGHUP), end a run as Ctrl-C
    # does: temporary files removed, one line. A signal the caller chose to ignore stays ignored: `nohup` ignores
    # SIGHUP precisely so that the run outlives the terminal.
    for stop in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(stop) is not signal.SIG_IGN:
            signal.signal(stop, _on_interrupt(os.getpid()))
    try:
        app()
    except SpotmatchError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        message = _environment_failure(exc)
        if message is None:
            raise
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(2)


def _environment_failure(exc: BaseException) -> str | None:
    """One line for what the machine, not the input, made fail; None for anything else (a bug: its traceback)."""
    damage = _database_damage(exc)
    if damage is not None:
        return (f"the catalogue database is damaged ({damage}); restore it from a backup (the folder `catalogue backup`"
                f" made is a catalogue: use it)")
    if isinstance(exc, sqlite3.OperationalError):
        name = exc.sqlite_errorname or ""
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            return (f"the catalogue database could not be written ({exc}); the write in progress was undone (an add keeps"
                    f" the batches committed before it): free disk space and run the command again")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return (f"the catalogue is busy: another command has held it for over a minute ({exc}); run this again when it"
                    f" is done")
    if isinstance(exc, OSError) and exc.errno in DISK_WRITE_FAILURES:  # no fix in the input, but one line all the same
        return (f"{exc.filename or 'an output file'}: cannot be written ({exc.strerror}); make room (free disk space, raise the"
                f" quota or file-size limit) or write elsewhere, and run the command again: outputs are written whole or not at all")
    return None


def _database_damage(exc: BaseException | None) -> sqlite3.DatabaseError | None:
    """The SQLite damage behind `exc` (pandas wraps it in its own DatabaseError), if any: met on a page a command
    reads, past the checks made on opening (`catalogue stats` checks every page)."""
    while exc is not None:
        if isinstance(exc, sqlite3.DatabaseError) and exc.sqlite_errorname in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


__all__ = ["app", "main"]
