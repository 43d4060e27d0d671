"""`pgolf bundle`: parse, run pgolf.bundle.bundle, print.

The folder holds ONE self-contained train_gpt.py (pgolf's core inlined, the run's settings baked in;
optionally a self-extracting compressed copy), the blob as final_model.blob, README.md, submission.json and
the train logs. train_gpt.py is the counted code file: `pgolf verify-size BUNDLE_DIR` counts exactly it plus
the blob.
"""

from pathlib import Path

import typer

from pgolf import log
from pgolf.artifacts import ARTIFACT_BYTE_LIMIT
from pgolf.bundle import bundle as run_bundle
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, out_option, report
from pgolf.submission import SUBMISSION_BLOB


def bundle(
    train_dir: Path = typer.Option(..., "--train", help="The `pgolf train` output the blob came from."),
    blob_dir: Path = typer.Option(..., "--blob", help="The `pgolf compress` output to ship."),
    eval_dir: Path = typer.Option(None, "--eval", help="`pgolf eval` output of the blob (the score)."),
    report_dir: Path = typer.Option(None, "--report", help="`pgolf report` output (multi-seed fields)."),
    name: str = typer.Option(..., "--name", help="Submission name."),
    github_id: str = typer.Option(..., "--github-id", help="Your GitHub user name."),
    author: str = typer.Option(None, "--author", help="Author name (default: the GitHub id)."),
    blurb: str = typer.Option("", "--blurb", help="One-paragraph summary for README and submission.json."),
    compress_code: bool = typer.Option(False, "--compress-code", help="Ship train_gpt.py as a self-extracting "
                                       "script: the program lzma/zlib/brotli-compressed (fewer counted bytes)."),
    code_literal: str = typer.Option("base85", "--code-literal", help="How --compress-code embeds the compressed "
                                     "program: base85 (ASCII text) or latin1 (its bytes as a latin-1 string "
                                     "literal: ~18 % fewer code bytes, but no longer text an editor or a diff "
                                     "shows)."),
    minify: str = typer.Option(None, "--minify", help="python-minifier on the shipped program: rename (drop "
                               "docstrings and annotations, shorten local names), safe (the same without "
                               "renaming) or off. Default: rename with --compress-code, else off."),
    out: Path = out_option(),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Write a records-style folder: train_gpt.py, final_model.blob, README.md, submission.json, logs.

    Example: pgolf bundle --train artifacts/run1/train --blob artifacts/run1/blob --eval artifacts/run1/eval
    --name "11L int6 brotli" --github-id me --out artifacts/run1/submission
    """
    metrics = run_bundle(train_dir, blob_dir, out, name=name, github_id=github_id, author=author, blurb=blurb,
                         eval_dir=eval_dir, report_dir=report_dir, compress_code=compress_code, minify=minify,
                         code_literal=code_literal, force=force, log=log).metrics
    bytes_model, bytes_code = metrics["bytes_model"], metrics["bytes_code"]
    lines = [f"train_gpt.py{' (self-extracting)' if compress_code else ''} {bytes_code:,} B + {SUBMISSION_BLOB} "
             f"{bytes_model:,} B = {bytes_model + bytes_code:,} B, margin "
             f"{ARTIFACT_BYTE_LIMIT - bytes_model - bytes_code:,} B"]
    report({"out": str(out), **metrics}, as_json, lines, out)


def register(app: typer.Typer) -> None:
    app.command("bundle")(bundle)
