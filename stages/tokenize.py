"""`pgolf tokenize SOURCE... --out DIR`: corpus -> SentencePiece tokenizer + challenge shards + manifest."""

import contextlib
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pgolf import log
from pgolf.artifacts import StageOutput, atomic_write_bytes, sha256_file
from pgolf.bpb import check_tokenizer, load_tokenizer
from pgolf.config import resolve, to_dict
from pgolf.corpus import Corpus
from pgolf.errors import InvalidInput, UsageError
from pgolf.stages.common import JSON_OPTION, out_option, report
from pgolf.tokenizer import TokenizeConfig, check_vocab_size, train_tokenizer, write_shards


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
    if tokenizer is None:
        check_vocab_size(config.vocab_size)
    corpus = Corpus(sources, config.text_field)
    model_proto, problems = load_model(tokenizer, config, sources_of, force) if tokenizer else (None, [])
    resolved = {**to_dict(config), "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None}
    inputs = [*corpus.files, *(p for p in (tokenizer, config_file) if p is not None)]
    with StageOutput(out, "tokenize", config=resolved, force=force, inputs=inputs) as stage, \
            progress_bar() as progress:
        if model_proto is None:
            model_proto = train_on_corpus(corpus, config, progress)
            problems = check_tokenizer(load_tokenizer_bytes(model_proto), "trained tokenizer", force)
        for problem in problems:
            log.warn(f"tokenizer: {problem} (accepted because of --force)")
        stage.check("tokenizer_fit_for_bpb", not problems, "; ".join(problems))
        vocab = load_tokenizer_bytes(model_proto).GetPieceSize()
        model_path = stage.add_output(f"fineweb_{vocab}_bpe.model", "tokenizer")
        atomic_write_bytes(model_path, model_proto)
        for path in corpus.files:
            stage.add_input(path, "corpus")
        if tokenizer:
            stage.add_input(tokenizer, "tokenizer")
        splits = encode_corpus(corpus, model_proto, stage, config, progress)
        stage.metrics = {
            **splits,
            "tokens_per_byte": tokens_per_byte(splits),
            "tokenizer_sha256": sha256_file(model_path),
            "vocab_size": vocab,
        }
        stage.finalize()
    if splits["train"]["documents"] == 0:
        log.warn(
            f"{out}: the train split is empty: all {splits['val']['documents']:,} documents went to validation "
            f"(--val-docs {config.val_docs:,}); lower --val-docs to train on this data"
        )
    if splits["val"]["documents"] == 0:
        log.warn(f"{out}: the validation split is empty (--val-docs 0); nothing here can be scored")
    if tokenizer is None and vocab < config.vocab_size:
        log.warn(f"the corpus supports only {vocab} pieces of the {config.vocab_size} asked for")
    report(stage.metrics, as_json, summary(out, stage.metrics))


def load_model(path: Path, config: TokenizeConfig, sources_of: dict, force: bool) -> tuple[bytes, list[str]]:
    """The --tokenizer model's bytes, refused when it can't serve the challenge format (exit 3)."""
    sp = load_tokenizer(path)
    vocab = sp.GetPieceSize()
    check_vocab_size(vocab, str(path))
    if "vocab_size" in sources_of and config.vocab_size != vocab:
        raise UsageError(
            f"vocab_size {config.vocab_size} ({sources_of['vocab_size']}) contradicts --tokenizer {path} "
            f"({vocab} pieces); drop one"
        )
    return path.read_bytes(), check_tokenizer(sp, path, force)


def load_tokenizer_bytes(model_proto: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_proto)


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
        disable=not (log.console.is_terminal and log.is_main_process()),
    )


def train_on_corpus(corpus: Corpus, config: TokenizeConfig, progress: Progress) -> bytes:
    """Train on the first --train-docs documents after the validation split (validation text stays unseen)."""
    task = progress.add_task(
        "reading training documents", total=corpus.total_bytes, docs=0, docs_per_s=0.0, mb_per_s=0.0
    )
    counts = {"seen": 0, "docs": 0, "bytes": 0}
    started = time.perf_counter()

    def texts():
        with contextlib.closing(corpus.documents()) as documents:
            for index, text in enumerate(documents):
                counts["seen"] = index + 1
                if index < config.val_docs:
                    continue
                if index >= config.val_docs + config.train_docs:
                    break
                counts["docs"] += 1
                counts["bytes"] += len(text)
                if counts["docs"] % 1000 == 0:
                    update_task(progress, task, corpus, counts, started)
                yield text
        update_task(progress, task, corpus, counts, started)
        progress.update(
            task, description=f"training SentencePiece BPE, {config.vocab_size} pieces", refresh=True
        )
        if counts["seen"] == 0:
            raise InvalidInput(f"{corpus}: empty corpus (no documents)")
        if counts["docs"] == 0:
            raise InvalidInput(
                f"{corpus}: no documents after the first {config.val_docs:,} (validation) to train the "
                "tokenizer on; lower --val-docs or pass --tokenizer"
            )

    model_proto = train_tokenizer(texts(), config.vocab_size, config.workers or None, str(corpus))
    progress.remove_task(task)
    return model_proto


def encode_corpus(
    corpus: Corpus, model_proto: bytes, stage: StageOutput, config: TokenizeConfig, progress: Progress
) -> dict:
    task = progress.add_task("encoding", total=corpus.total_bytes, docs=0, docs_per_s=0.0, mb_per_s=0.0)
    counts = {"docs": 0, "bytes": 0}
    started = time.perf_counter()

    def on_batch(split, batch):
        counts["docs"] += batch.documents
        counts["bytes"] += batch.text_bytes
        update_task(progress, task, corpus, counts, started)

    splits, shards = write_shards(
        corpus.documents(),
        model_proto,
        stage.dir,
        val_docs=config.val_docs,
        shard_tokens=config.shard_tokens,
        workers=config.workers,
        on_batch=on_batch,
    )
    if counts["docs"] == 0:
        raise InvalidInput(f"{corpus}: empty corpus (no documents)")
    for split, paths in shards.items():
        for path in paths:
            stage.add_output(path.name, f"{split}_shard")
    return splits


def update_task(progress: Progress, task, corpus: Corpus, counts: dict, started: float) -> None:
    seconds = max(time.perf_counter() - started, 1e-9)
    progress.update(
        task,
        completed=corpus.bytes_read,
        docs=counts["docs"],
        docs_per_s=counts["docs"] / seconds,
        mb_per_s=counts["bytes"] / seconds / 1e6,
        refresh=True,
    )


def tokens_per_byte(splits: dict) -> float:
    """Tokens (BOS included) per raw UTF-8 byte of text, both splits together (how tokenizers compare)."""
    text_bytes = sum(s["text_bytes"] for s in splits.values())
    return round(sum(s["tokens"] for s in splits.values()) / max(text_bytes, 1), 6)


def summary(out: Path, metrics: dict) -> list[str]:
    lines = [
        f"{split}: {m['documents']:,} documents, {m['tokens']:,} tokens, {m['text_bytes']:,} text bytes, "
        f"{m['bytes']:,} bpb bytes"
        for split, m in ((s, metrics[s]) for s in ("val", "train"))
    ]
    lines.append(f"{out}: vocab {metrics['vocab_size']}, {metrics['tokens_per_byte']:.4f} tokens/byte")
    return lines


def register(app: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
