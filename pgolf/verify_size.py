"""The verify-size check: counted bytes (model blob + the code file that ships) against the decimal cap.

Read-only: it writes nothing. Code bytes must be accounted for explicitly (a bundle, code files, or a bundle
directory as the path); `blob_only` is the deliberate way to skip them, so nothing is silently under-counted.
"""

from pathlib import Path

from pgolf.artifacts import ARTIFACT_BYTE_LIMIT, open_stage, output_path
from pgolf.codecs import read_blob
from pgolf.errors import InvalidInput, OverBudget, UsageError

MARGIN_WARNING_BYTES = 10_000  # runs drift by about +-5 KB between seeds


def counted_files(path: Path, code: list[Path], bundle: Path | None, blob_only: bool) -> tuple[Path, list[Path]]:
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
            raise InvalidInput(f"{file}: {'is a directory, not' if file.is_dir() else 'no such'} code file")
    return blob, list(code)


def verify_size(path: Path, *, code: list[Path] = (), bundle: Path | None = None, blob_only: bool = False,
                cap: int = ARTIFACT_BYTE_LIMIT) -> dict:
    """{blob, blob_bytes, code_bytes, code_files, total_bytes, cap, margin, ok} of a compress or bundle output."""
    if cap <= 0:
        raise UsageError(f"--cap must be > 0, got {cap}")
    blob, code_files = counted_files(Path(path), list(code), bundle, blob_only)
    read_blob(blob)  # a blob that does not decode is no artifact, whatever its size
    blob_bytes = blob.stat().st_size
    code_bytes = {str(file): file.stat().st_size for file in code_files}
    total = blob_bytes + sum(code_bytes.values())
    return {"blob": str(blob), "blob_bytes": blob_bytes, "code_bytes": sum(code_bytes.values()),
            "code_files": code_bytes, "total_bytes": total, "cap": cap, "margin": cap - total,
            "ok": total <= cap}


def require_within_cap(path: Path, result: dict) -> None:
    """OverBudget (exit 4) naming `path` when the counted bytes exceed the cap."""
    if not result["ok"]:
        raise OverBudget(f"{path}: {result['total_bytes']:,} counted bytes exceed the {result['cap']:,}-byte cap "
                         f"by {-result['margin']:,}")
