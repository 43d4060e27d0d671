"""The `pgolf` command: one sub-command per stage module in stages/ (installed as pgolf.stages)."""

import importlib
import sys

import typer

from pgolf import __version__
from pgolf.errors import PgolfError
from pgolf.log import console

# Stage modules, in pipeline order; each defines `register(app)`.
STAGES = ["data", "verify", "tokenize", "train", "quantize", "compress", "verify_size", "evaluate", "bundle",
          "report"]

app = typer.Typer(
    name="pgolf",
    help=(
        "Parameter Golf pipeline: tokenize -> train -> quantize -> compress -> verify-size -> eval (+ bundle, report)."
        "\n\nExit codes: 0 ok, 1 unexpected error, 2 usage, 3 invalid input or artifact, 4 over the size budget,"
        " 5 a legality/compliance check failed."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool):
    if value:
        typer.echo(f"pgolf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """Global options."""


for _name in STAGES:
    importlib.import_module(f"pgolf.stages.{_name}").register(app)


def main() -> None:
    try:
        app(prog_name="pgolf")
    except PgolfError as e:
        console.print(f"error: {e}", style="red", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
