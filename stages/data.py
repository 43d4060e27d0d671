"""`pgolf data check DIR`: parse, run pgolf.data.check_data, print."""

from pathlib import Path

import typer

from pgolf.data import check_data
from pgolf.shards import SPLITS
from pgolf.stages.common import JSON_OPTION, report

data_app = typer.Typer(help="Inspect token shard directories.", no_args_is_help=True)


def check(
    directory: Path = typer.Argument(..., help="Shard directory: pgolf tokenize output or fineweb10B_spV."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model (default: next to the shards)."),
    as_json: bool = JSON_OPTION,
):
    """Validate magic, version, size = 1024 + 2n, n > 0, token ids < vocab and BOS count = documents for every
    shard; with a tokenize manifest, also that the shards are exactly the ones it lists, with their sha256.

    Example: pgolf data check artifacts/sp1024
    """
    result = check_data(directory, tokenizer)
    lines = []
    for split in SPLITS:
        summary = result[split]
        byte_text = f", {summary['bytes']:,} bytes" if summary["bytes"] is not None else ""
        lines.append(f"{split}: {summary['shards']} shards, {summary['tokens']:,} tokens, "
                     f"{summary['documents']:,} documents{byte_text}")
    lines.append(f"{directory}: all shards valid")
    report(result, as_json, lines)


def register(app: typer.Typer) -> None:
    data_app.command("check")(check)
    app.add_typer(data_app, name="data")
