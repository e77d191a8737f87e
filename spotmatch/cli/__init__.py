"""`spotmatch` command line: each verb is a thin function that builds a config and calls one `main`.

Command modules register on the shared `app`; `main` turns a SpotmatchError into one line on stderr
and exit status 2, never a traceback.
"""
from __future__ import annotations

import sys

from spotmatch.cli.app import app
from spotmatch.errors import SpotmatchError


def _register_commands() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name.endswith("_cmds"):
            importlib.import_module(f"{__name__}.{module.name}")


def main() -> None:
    _register_commands()
    try:
        app()
    except SpotmatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


__all__ = ["app", "main"]
