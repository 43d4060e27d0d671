"""The tokenize stage: a corpus -> a SentencePiece tokenizer (trained with the challenge's settings, or reused)
+ challenge shards (validation documents first, then train) + a manifest.

Progress goes to an optional `progress(task, description, completed, total, docs, docs_per_s, mb_per_s)`
callback (the CLI draws it as a progress bar); `progress(task, None, ...)` says the task is over.
"""

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from pgolf.artifacts import StageOutput, atomic_write_bytes, sha256_file, up_to_date
from pgolf.bpb import check_tokenizer, load_tokenizer
from pgolf.config import to_dict
from pgolf.corpus import Corpus
from pgolf.dist import PlainLog
from pgolf.errors import InvalidInput, UsageError
from pgolf.tokenizer import TokenizeConfig, check_vocab_size, train_tokenizer, write_shards


def no_progress(*args) -> None:
    pass


def tokenizer_from_bytes(model_proto: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_proto)


def reused_tokenizer(path: Path, config: TokenizeConfig, vocab_size_given: str | None,
                     force: bool) -> tuple[bytes, list[str]]:
    """The --tokenizer model's bytes and its bpb problems (accepted only with --force), refused (exit 3) when it
    can't serve the challenge format; `vocab_size_given` names where a contradicting vocab_size came from."""
    sp = load_tokenizer(path)
    vocab = sp.GetPieceSize()
    check_vocab_size(vocab, str(path))
    if vocab_size_given and config.vocab_size != vocab:
        raise UsageError(f"vocab_size {config.vocab_size} ({vocab_size_given}) contradicts --tokenizer {path} "
                         f"({vocab} pieces); drop one")
    return path.read_bytes(), check_tokenizer(sp, path, force)


class Meter:
    """Documents and text bytes since `started`, reported to a progress callback as one task."""

    def __init__(self, progress, task: str, description: str, corpus: Corpus):
        self.progress, self.task, self.description, self.corpus = progress, task, description, corpus
        self.docs = self.text_bytes = 0
        self.started = time.perf_counter()

    def add(self, docs: int, text_bytes: int) -> None:
        self.docs += docs
        self.text_bytes += text_bytes

    def report(self, description: str | None = None) -> None:
        self.description = description or self.description
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.progress(self.task, self.description, self.corpus.bytes_read, self.corpus.total_bytes, self.docs,
                      self.docs / seconds, self.text_bytes / seconds / 1e6)

    def done(self) -> None:
        self.progress(self.task, None, self.corpus.bytes_read, self.corpus.total_bytes, self.docs, 0.0, 0.0)


def train_on_corpus(corpus: Corpus, config: TokenizeConfig, progress) -> bytes:
    """Train on the first train_docs documents after the validation split (validation text stays unseen)."""
    meter = Meter(progress, "train", "reading training documents", corpus)
    seen = [0]

    def texts():
        with contextlib.closing(corpus.documents()) as documents:
            for index, text in enumerate(documents):
                seen[0] = index + 1
                if index < config.val_docs:
                    continue
                if index >= config.val_docs + config.train_docs:
                    break
                meter.add(1, len(text))
                if meter.docs % 1000 == 0:
                    meter.report()
                yield text
        meter.report(f"training SentencePiece BPE, {config.vocab_size} pieces")
        if seen[0] == 0:
            raise InvalidInput(f"{corpus}: empty corpus (no documents)")
        if meter.docs == 0:
            raise InvalidInput(f"{corpus}: no documents after the first {config.val_docs:,} (validation) to train "
                               "the tokenizer on; lower --val-docs or pass --tokenizer")

    model_proto = train_tokenizer(texts(), config.vocab_size, config.workers or None, str(corpus))
    meter.done()
    return model_proto


def encode_corpus(corpus: Corpus, model_proto: bytes, stage: StageOutput, config: TokenizeConfig,
                  progress) -> dict:
    meter = Meter(progress, "encode", "encoding", corpus)

    def on_batch(split, batch):
        meter.add(batch.documents, batch.text_bytes)
        meter.report()

    splits, shards = write_shards(corpus.documents(), model_proto, stage.dir, val_docs=config.val_docs,
                                  shard_tokens=config.shard_tokens, workers=config.workers, on_batch=on_batch)
    meter.done()
    if meter.docs == 0:
        raise InvalidInput(f"{corpus}: empty corpus (no documents)")
    for split, paths in shards.items():
        for path in paths:
            stage.add_output(path.name, f"{split}_shard")
    return splits


def tokens_per_byte(splits: dict) -> float:
    """Tokens (BOS included) per raw UTF-8 byte of text, both splits together (how tokenizers compare)."""
    text_bytes = sum(s["text_bytes"] for s in splits.values())
    return round(sum(s["tokens"] for s in splits.values()) / max(text_bytes, 1), 6)


@dataclass
class TokenizeResult:
    out: Path
    metrics: dict  # per split {documents, tokens, bytes, text_bytes}, tokens_per_byte, tokenizer_sha256, vocab_size


def tokenize(config: TokenizeConfig, sources: list[str], out: Path, *, tokenizer: Path | None = None,
             vocab_size_given: str | None = None, config_file: Path | None = None, force: bool = False,
             log=PlainLog, progress=no_progress) -> TokenizeResult:
    """Tokenize `sources` (.jsonl, .jsonl.zst, .txt files, directories or globs) into `out`. With `tokenizer`,
    reuse that SentencePiece model (`vocab_size_given`: where an explicit vocab_size came from, which must then
    agree); `force` also accepts a tokenizer that fails the bpb checks. A finished `out` made by this very run is
    reported, not made again (up_to_date)."""
    if tokenizer is None:
        check_vocab_size(config.vocab_size)
    corpus = Corpus(sources, config.text_field)
    model_proto, problems = reused_tokenizer(Path(tokenizer), config, vocab_size_given, force) if tokenizer \
        else (None, [])
    resolved = {**to_dict(config), "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None}
    inputs = [*corpus.files, *(p for p in (tokenizer, config_file) if p is not None)]
    done = up_to_date(out, "tokenize", resolved, inputs, force=force, log=log)
    if done:
        return TokenizeResult(Path(out), done["metrics"])
    with StageOutput(out, "tokenize", config=resolved, force=force, inputs=inputs) as stage:
        if model_proto is None:
            model_proto = train_on_corpus(corpus, config, progress)
            problems = check_tokenizer(tokenizer_from_bytes(model_proto), "trained tokenizer", force)
        for problem in problems:
            log.warn(f"tokenizer: {problem} (accepted because of --force)")
        stage.check("tokenizer_fit_for_bpb", not problems, "; ".join(problems))
        vocab = tokenizer_from_bytes(model_proto).GetPieceSize()
        model_path = stage.add_output(f"fineweb_{vocab}_bpe.model", "tokenizer")
        atomic_write_bytes(model_path, model_proto)
        for path in corpus.files:
            stage.add_input(path, "corpus")
        if tokenizer:
            stage.add_input(tokenizer, "tokenizer")
        if config_file:
            stage.add_input(config_file, "config")
        splits = encode_corpus(corpus, model_proto, stage, config, progress)
        stage.metrics = {**splits, "tokens_per_byte": tokens_per_byte(splits),
                         "tokenizer_sha256": sha256_file(model_path), "vocab_size": vocab}
        stage.finalize()
    if splits["train"]["documents"] == 0:
        log.warn(f"{out}: the train split is empty: all {splits['val']['documents']:,} documents went to "
                 f"validation (--val-docs {config.val_docs:,}); lower --val-docs to train on this data")
    if splits["val"]["documents"] == 0:
        log.warn(f"{out}: the validation split is empty (--val-docs 0); nothing here can be scored")
    if tokenizer is None and vocab < config.vocab_size:
        log.warn(f"the corpus supports only {vocab} pieces of the {config.vocab_size} asked for")
    return TokenizeResult(Path(out), stage.metrics)
