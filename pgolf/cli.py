"""The `pgolf` command: one sub-command per stage module in stages/ (installed as pgolf.stages)."""

import dataclasses
import difflib
import importlib
import os
import sys

import typer

from pgolf import __version__
from pgolf.config import ENV_PREFIX
from pgolf.dist import finish_distributed
from pgolf.errors import ENVIRONMENT_ERRNOS, PgolfError, UsageError
from pgolf.log import console

# Stage modules, in pipeline order; each defines `register(app)`.
STAGES = ["data", "verify", "tokenize", "train", "import_cmd", "quantize", "compress", "verify_size", "evaluate",
          "bundle", "report", "show"]

app = typer.Typer(
    name="pgolf",
    help=(
        "Parameter Golf pipeline: tokenize -> train (or import a record) -> quantize -> compress -> verify-size -> eval"
        " (+ bundle, report, show)."
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


def fail(message: str, code: int) -> None:
    console.print(f"error: {message}", style="red", markup=False, soft_wrap=True)
    sys.exit(code)


def env_settings() -> set[str]:
    """Every PGOLF_* name some stage reads: PGOLF_<FIELD> of each config, PGOLF_TTT_<FIELD> of TTT's."""
    from pgolf.compress import CompressConfig
    from pgolf.evaluate import EvalConfig
    from pgolf.model import ModelConfig
    from pgolf.quantize import QuantizeConfig
    from pgolf.stages.evaluate import TTT_ENV_PREFIX
    from pgolf.tokenizer import TokenizeConfig
    from pgolf.train_config import TrainConfig
    from pgolf.ttt import TTTConfig

    names = {ENV_PREFIX + f.name.upper() for cls in (ModelConfig, TrainConfig, EvalConfig, CompressConfig,
                                                    TokenizeConfig, QuantizeConfig) for f in dataclasses.fields(cls)}
    return names | {TTT_ENV_PREFIX + f.name.upper() for f in dataclasses.fields(TTTConfig)}


def check_env(env=os.environ) -> None:
    """A misspelt PGOLF_* variable would be ignored and the run would silently use another value."""
    known = env_settings()
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else " (PGOLF_<FIELD> of a config, e.g. PGOLF_NUM_LAYERS)"
            raise UsageError(f"env {name}: no pgolf setting has this name{hint}")


def main() -> None:
    """Run one command; under torchrun, the process group the stages started is torn down here, together
    after a command that completed."""
    completed = False
    try:
        try:
            check_env()
            app(prog_name="pgolf")
        except SystemExit as e:
            completed = e.code in (0, None)
            raise
        completed = True
    except PgolfError as e:
        fail(str(e), e.exit_code)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        fail(f"{e.filename or 'a file'}: {e.strerror}", 3)
    finally:
        finish_distributed(completed)
