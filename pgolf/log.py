"""Logging to stderr (rank 0 only under torchrun); stdout is reserved for `--json` results."""

import json
import os
import sys

from rich.console import Console

console = Console(stderr=True, highlight=False)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def info(message: str) -> None:
    if is_main_process():
        console.print(message, markup=False)


def warn(message: str) -> None:
    if is_main_process():
        console.print(f"warning: {message}", style="yellow", markup=False)


def emit_json(obj) -> None:
    """Print the one JSON result object on stdout (rank 0 only)."""
    if is_main_process():
        sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
