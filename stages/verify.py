"""`pgolf verify DIR`: re-hash every output of a stage directory against its manifest."""

from pathlib import Path

import typer

from pgolf.artifacts import read_manifest, verify_outputs
from pgolf.errors import InvalidInput
from pgolf.stages.common import JSON_OPTION, report


def verify(
    directory: Path = typer.Argument(..., help="A stage output directory (holds manifest.json)."),
    as_json: bool = JSON_OPTION,
):
    """Re-hash every output listed in DIR/manifest.json and report; exit 3 on any mismatch.

    Example: pgolf verify artifacts/sp1024
    """
    manifest = read_manifest(directory)
    rows = verify_outputs(directory, manifest)
    bad = [r for r in rows if not r["ok"]]
    lines = [f"{'ok ' if r['ok'] else 'BAD'} {r['path']} ({r['role']}, {r['bytes']:,} B)"
             + (f": {r['problem']}" if r["problem"] else "") for r in rows]
    lines.append(f"{manifest['stage']}: {len(rows) - len(bad)}/{len(rows)} outputs match the manifest")
    report({"stage": manifest["stage"], "outputs": rows, "ok": not bad}, as_json, lines)
    if bad:
        raise InvalidInput(f"{bad[0]['path']}: {bad[0]['problem']}")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
