"""Logging to stderr (rank 0 only under torchrun); stdout is reserved for `--json` results."""

import json
import sys

from rich.console import Console

from pgolf.dist import env_rank

console = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    return env_rank() == 0


# soft_wrap: a long line stays one line in a log file or pipe (rich would break it at 80 columns, splitting the
# `final_... val_loss:... val_bpb:...` lines that scripts grep); a terminal still wraps it for display.
def progress_enabled() -> bool:
    """Rich progress bars only on a terminal (rank 0): a pipe, CI job or log file gets the plain lines alone."""
    return console.is_terminal and is_main_process()


def info(message: str) -> None:
    if is_main_process():
        console.print(message, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"warning: {message}", style="yellow", markup=False, soft_wrap=True)


def emit_json(obj) -> None:
    """Print the one JSON result object on stdout (rank 0 only)."""
    if is_main_process():
        sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
