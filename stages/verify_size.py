"""`pgolf verify-size PATH`: counted bytes (model blob + the code file that ships) against the decimal cap.

A read-only check: it writes nothing. Code bytes must be accounted for explicitly (`--bundle`, `--code`, or
a bundle directory as PATH); `--blob-only` is the deliberate way to skip them, so nothing is silently
under-counted.
"""

from pathlib import Path

import typer

from pgolf import log
from pgolf.artifacts import ARTIFACT_BYTE_LIMIT, open_stage, output_path
from pgolf.codecs import read_blob
from pgolf.errors import InvalidInput, OverBudget, UsageError
from pgolf.stages.common import JSON_OPTION, report

MARGIN_WARNING_BYTES = 10_000  # runs drift by about +-5 KB between seeds


def counted_files(path: Path, code: list[Path], bundle: Path | None, blob_only: bool):
    """(blob file, code files) to count, digest-checked through their directories' manifests."""
    manifest = open_stage(path, ("compress", "bundle"))
    blob = output_path(manifest, path, "blob")
    if manifest["stage"] == "bundle":
        if code or bundle or blob_only:
            raise UsageError(f"{path}: is a bundle (blob + code); --code, --bundle and --blob-only apply "
                             f"to a compress output")
        return blob, [output_path(manifest, path, "code")]
    if sum((bool(code), bundle is not None, blob_only)) != 1:
        raise UsageError("give exactly one of --bundle DIR, --code FILE... or --blob-only "
                         "(code bytes count too)")
    if bundle is not None:
        bundle_manifest = open_stage(bundle, "bundle")
        shipped = output_path(bundle_manifest, bundle, "blob")
        if shipped.read_bytes() != blob.read_bytes():
            raise InvalidInput(f"{shipped}: the bundle ships a different blob than {blob}")
        return blob, [output_path(bundle_manifest, bundle, "code")]
    for file in code:
        if not file.is_file():
            raise InvalidInput(f"{file}: code file not found")
    return blob, list(code)


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
    if cap <= 0:
        raise UsageError(f"--cap must be > 0, got {cap}")
    blob, code_files = counted_files(path, code or [], bundle, blob_only)
    read_blob(blob)  # a blob that does not decode is no artifact, whatever its size
    blob_bytes = blob.stat().st_size
    code_bytes = {str(file): file.stat().st_size for file in code_files}
    total = blob_bytes + sum(code_bytes.values())
    margin = cap - total
    result = {"blob": str(blob), "blob_bytes": blob_bytes, "code_bytes": sum(code_bytes.values()),
              "code_files": code_bytes, "total_bytes": total, "cap": cap, "margin": margin, "ok": margin >= 0}
    lines = [f"blob  {blob}: {blob_bytes:,} B"]
    lines += [f"code  {file}: {size:,} B" for file, size in code_bytes.items()]
    if blob_only:
        lines.append("code  not counted (--blob-only)")
    lines.append(f"total {total:,} B of {cap:,} (margin {margin:,} B)")
    report(result, as_json, lines)
    if margin < 0:
        raise OverBudget(f"{path}: {total:,} counted bytes exceed the {cap:,}-byte cap by {-margin:,}")
    if margin < MARGIN_WARNING_BYTES:
        log.warn(f"margin {margin:,} B is under {MARGIN_WARNING_BYTES:,} B; runs drift by about 5 KB")
    if blob_only:
        log.warn("code bytes are not counted (--blob-only); the submission's train_gpt.py counts too")


def register(app: typer.Typer) -> None:
    app.command("verify-size")(verify_size)
