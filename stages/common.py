"""Pieces every stage command shares: option declarations and result printing."""

from collections import defaultdict
from pathlib import Path

import typer

from pgolf import log
from pgolf.artifacts import MANIFEST, read_manifest

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object of results on stdout.")
FORCE_OPTION = typer.Option(False, "--force", help="Recompute and replace an existing output (without it, an "
                            "up-to-date output is reported and kept, any other refused naming what differs).")
# A role with more files than this (shards) is listed as one line: the summary stays one screen.
LISTED_PER_ROLE = 3


def out_option(help_text: str = "Output directory (written atomically, manifest last).") -> Path:
    return typer.Option(..., "--out", "-o", help=help_text)


def report(result: dict, as_json: bool, lines: list[str], out: Path | None = None) -> None:
    """Print the human summary to stderr: the key figures, then what `out` (the stage's output directory) holds;
    and the JSON object to stdout when asked."""
    if out is not None and log.is_main_process():  # other ranks may finish before rank 0 writes the manifest
        lines = lines + output_lines(Path(out))
    for line in lines:
        log.info(line)
    if as_json:
        log.emit_json(result)


def output_lines(out: Path) -> list[str]:
    """`wrote DIR (N files, B bytes):` and one line per output with its bytes, manifest.json last."""
    outputs = read_manifest(out)["outputs"]
    by_role = defaultdict(list)
    for record in outputs:
        by_role[record["role"]].append(record)
    rows = []
    for role, records in by_role.items():
        if len(records) > LISTED_PER_ROLE:
            rows.append((f"{records[0]['path']} ... {records[-1]['path']}",
                         sum(r["bytes"] for r in records), f"  ({len(records)} {role} files)"))
        else:
            rows += [(r["path"], r["bytes"], "") for r in records]
    rows.append((MANIFEST, (out / MANIFEST).stat().st_size, ""))
    name_width, bytes_width = max(len(row[0]) for row in rows), max(len(f"{row[1]:,}") for row in rows)
    total = sum(row[1] for row in rows)
    header = f"wrote {out} ({len(outputs) + 1} files, {total:,} B):"
    return [header] + [f"  {name:<{name_width}}  {size:>{bytes_width},} B{note}" for name, size, note in rows]
