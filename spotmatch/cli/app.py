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


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"spotmatch {version('spotmatch')}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                                    help="Print the installed version and exit.")) -> None:
    """Re-identify individual animals from their coat patterns: train, embed, match, score, evaluate."""


def say_done(line: str, out) -> None:
    """A run's closing line: on stderr when the output itself is written into a stream (`--out /dev/stdout`, a pipe),
    which the line would otherwise join."""
    from spotmatch.io import writes_through

    typer.echo(line, err=writes_through(out))
