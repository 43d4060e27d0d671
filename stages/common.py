"""Pieces every stage command shares: option declarations and result printing."""

from pathlib import Path

import typer

from pgolf import log

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object of results on stdout.")
FORCE_OPTION = typer.Option(False, "--force", help="Recompute and replace an existing output (without it, an "
                            "up-to-date output is reported and kept, any other refused naming what differs).")


def out_option(help_text: str = "Output directory (written atomically, manifest last).") -> Path:
    return typer.Option(..., "--out", "-o", help=help_text)


def report(result: dict, as_json: bool, lines: list[str]) -> None:
    """Print the human summary to stderr, and the JSON object to stdout when asked."""
    for line in lines:
        log.info(line)
    if as_json:
        log.emit_json(result)
