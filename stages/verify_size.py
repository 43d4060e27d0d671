"""`pgolf verify-size PATH`: parse, run pgolf.verify_size.verify_size, print (exit 4 over the cap)."""

from pathlib import Path

import typer

from pgolf import log
from pgolf.artifacts import ARTIFACT_BYTE_LIMIT
from pgolf.stages.common import JSON_OPTION, report
from pgolf.verify_size import MARGIN_WARNING_BYTES, require_within_cap
from pgolf.verify_size import verify_size as run_verify_size


def verify_size(
    path: Path = typer.Argument(..., help="A `pgolf compress` or `pgolf bundle` output directory."),
    code: list[Path] = typer.Option(None, "--code", help="Code file that ships with the blob (repeatable)."),
    bundle: Path = typer.Option(None, "--bundle", help="A `pgolf bundle` output: count its train_gpt.py."),
    blob_only: bool = typer.Option(False, "--blob-only", help="Count the blob alone (code not counted)."),
    cap: int = typer.Option(ARTIFACT_BYTE_LIMIT, "--cap", help="Byte cap (decimal)."),
    as_json: bool = JSON_OPTION,
):
    """Count blob + code bytes against the 16,000,000-byte cap; exit 4 when over, warn under 10 KB of margin.

    Example: pgolf verify-size artifacts/run1/blob --bundle artifacts/run1/submission
    """
    result = run_verify_size(path, code=code or [], bundle=bundle, blob_only=blob_only, cap=cap)
    lines = [f"blob  {result['blob']}: {result['blob_bytes']:,} B"]
    lines += [f"code  {file}: {size:,} B" for file, size in result["code_files"].items()]
    if blob_only:
        lines.append("code  not counted (--blob-only)")
    lines.append(f"total {result['total_bytes']:,} B of {cap:,} (margin {result['margin']:,} B)")
    report(result, as_json, lines)
    require_within_cap(path, result)
    if result["margin"] < MARGIN_WARNING_BYTES:
        log.warn(f"margin {result['margin']:,} B is under {MARGIN_WARNING_BYTES:,} B; runs drift by about 5 KB")
    if blob_only:
        log.warn("code bytes are not counted (--blob-only); the submission's train_gpt.py counts too")


def register(app: typer.Typer) -> None:
    app.command("verify-size")(verify_size)
