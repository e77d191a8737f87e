"""The typer application every command module registers on."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="spotmatch",
    help="Re-identify individual animals from their coat patterns: train, embed, match, score, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
