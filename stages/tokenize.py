"""`pgolf tokenize SOURCE... --out DIR`: parse, run pgolf.tokenize.tokenize with a progress bar, print."""

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pgolf import log
from pgolf.config import resolve
from pgolf.stages.common import JSON_OPTION, out_option, report
from pgolf.tokenize import tokenize as run_tokenize
from pgolf.tokenizer import TokenizeConfig


def tokenize(
    sources: list[str] = typer.Argument(
        ...,
        metavar="SOURCE...",
        help="Corpus: .jsonl, .jsonl.zst or .txt files, directories (their corpus files, sorted) or globs.",
    ),
    out: Path = out_option(),
    vocab_size: int = typer.Option(
        None, "--vocab-size", help="Train a SentencePiece BPE of this many pieces (default 1024)."
    ),
    tokenizer: Path = typer.Option(
        None, "--tokenizer", help="Reuse this SentencePiece model instead of training."
    ),
    train_docs: int = typer.Option(
        None,
        "--train-docs",
        help="Train the tokenizer on at most this many train-split documents (default 1,000,000).",
    ),
    val_docs: int = typer.Option(
        None, "--val-docs", help="The first N documents form the validation split (default 50,000)."
    ),
    shard_tokens: int = typer.Option(
        None, "--shard-tokens", help="Tokens per shard file (default 100,000,000)."
    ),
    text_field: str = typer.Option(
        None, "--text-field", help="JSON field holding the text in .jsonl inputs (default text)."
    ),
    workers: int = typer.Option(None, "--workers", help="Encoding processes (default: one per CPU core)."),
    config_file: Path = typer.Option(None, "--config", help="TOML file with any of these settings."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Overwrite an existing output directory; accept a tokenizer that fails bpb checks.",
    ),
    as_json: bool = JSON_OPTION,
):
    """Tokenize a corpus into the challenge's shard format: validation documents first, then train shards,
    each document as [BOS] + tokens; the tokenizer is trained with the challenge's SentencePiece settings (or
    reused with --tokenizer).

    Example: pgolf tokenize docs.jsonl --vocab-size 1024 --val-docs 50000 --out artifacts/sp1024
    """
    config, sources_of = resolve(
        TokenizeConfig,
        kind="tokenize",
        config_file=config_file,
        overrides={
            "vocab_size": vocab_size,
            "train_docs": train_docs,
            "val_docs": val_docs,
            "shard_tokens": shard_tokens,
            "text_field": text_field,
            "workers": workers,
        },
    )
    with progress_bar() as bar:
        result = run_tokenize(config, sources, out, tokenizer=tokenizer, vocab_size_given=sources_of.get("vocab_size"),
                              config_file=config_file, force=force, log=log, progress=ProgressTasks(bar))
    report(result.metrics, as_json, summary(result.metrics), out)


def progress_bar() -> Progress:
    """docs, docs/s, text MB/s and ETA on stderr; hidden when stderr is not a terminal (or not rank 0)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn(
            "{task.fields[docs]:>12,} docs  {task.fields[docs_per_s]:>8,.0f} docs/s  "
            "{task.fields[mb_per_s]:>6.1f} MB/s"
        ),
        TimeRemainingColumn(),
        console=log.console,
        auto_refresh=False,  # no refresh thread: encoding forks worker processes (see pgolf.tokenizer)
        disable=not log.progress_enabled(),
    )


class ProgressTasks:
    """pgolf.tokenize's progress callback drawn as rich tasks: one per task name, removed when it ends."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.tasks: dict[str, int] = {}

    def __call__(self, task, description, completed, total, docs, docs_per_s, mb_per_s) -> None:
        if description is None:
            if task in self.tasks:
                self.bar.remove_task(self.tasks.pop(task))
            return
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(description, total=total, docs=0, docs_per_s=0.0, mb_per_s=0.0)
        self.bar.update(self.tasks[task], description=description, completed=completed, docs=docs,
                        docs_per_s=docs_per_s, mb_per_s=mb_per_s, refresh=True)


def summary(metrics: dict) -> list[str]:
    lines = [
        f"{split}: {m['documents']:,} documents, {m['tokens']:,} tokens, {m['text_bytes']:,} text bytes, "
        f"{m['bytes']:,} bpb bytes"
        for split, m in ((s, metrics[s]) for s in ("val", "train"))
    ]
    lines.append(f"vocab {metrics['vocab_size']}, {metrics['tokens_per_byte']:.4f} tokens/byte")
    return lines


def register(app: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
