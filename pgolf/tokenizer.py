"""SentencePiece training with the challenge's settings, and fast exact parallel encoding into token shards.

Every document becomes `[BOS=1] + sp.encode(text)` (no EOS); the first `val_docs` documents form the
validation split and the rest the train split, each written as challenge shards (REFERENCE.md, "Data shards").
"""

import collections
import contextlib
import io
import itertools
import multiprocessing
import operator
import os
import re
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.bpb import SPACE, build_byte_tables
from pgolf.errors import InvalidInput
from pgolf.shards import BOS_ID, MAX_VOCAB, ShardWriter

# The challenge exporter's SentencePiece settings (REFERENCE.md), verbatim.
CHALLENGE_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}
# 256 byte-fallback pieces + pad/bos/eos/unk + the standalone '▁' piece; real text needs its characters too.
MIN_VOCAB = 256 + 4 + 1
MAX_SHARD_TOKENS = 2**31 - 1  # the header stores the count as an int32
BATCH_CHARS = 1 << 20  # characters of text per batch sent to a worker
WORD_CACHE_SIZE = 1 << 19  # distinct words an encoder keeps (~60 MB); rarer ones are encoded every time


@dataclass(frozen=True)
class TokenizeConfig:
    vocab_size: int = 1024  # pieces of the SentencePiece BPE to train (unused with --tokenizer)
    train_docs: int = 1_000_000  # train the tokenizer on at most this many train-split documents
    val_docs: int = 50_000  # the first documents of the corpus, written as the validation split
    shard_tokens: int = 100_000_000  # tokens per shard file (the challenge's 10^8)
    text_field: str = "text"  # JSON field holding a document's text in .jsonl / .jsonl.zst files
    workers: int = 0  # encoding processes; 0 = one per CPU core

    def __post_init__(self):
        # vocab_size's range is checked as input (exit 3) by check_vocab_size: the shard format limits it.
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.train_docs < 1:
            raise ValueError(f"train_docs must be >= 1, got {self.train_docs}")
        if self.val_docs < 0:
            raise ValueError(f"val_docs must be >= 0, got {self.val_docs}")
        if not 1 <= self.shard_tokens <= MAX_SHARD_TOKENS:
            raise ValueError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}], got {self.shard_tokens}")
        if not self.text_field:
            raise ValueError("text_field must be a non-empty JSON field name")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one per CPU core), got {self.workers}")


def check_vocab_size(vocab_size: int, where: str = "--vocab-size") -> None:
    if vocab_size > MAX_VOCAB:
        raise InvalidInput(
            f"{where}: vocab size {vocab_size} does not fit uint16 shards (at most {MAX_VOCAB})"
        )
    if vocab_size < MIN_VOCAB:
        raise InvalidInput(
            f"{where}: vocab size {vocab_size} is too small for byte fallback (at least {MIN_VOCAB}: "
            "256 byte pieces + 4 special + '\u2581')"
        )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, threads: int | None = None, source: str = "corpus"
) -> bytes:
    """Train a SentencePiece BPE with the challenge's settings; returns the serialized model. `source` names
    the texts in error messages."""
    import sentencepiece as spm

    check_vocab_size(vocab_size)
    raised = []

    def sentences():
        # SentencePiece turns an exception in the iterator into a RuntimeError; keep the original to re-raise.
        try:
            for text in texts:
                text = text.replace("\x00", " ").strip()  # as the challenge exporter feeds its trainer
                if text:
                    yield text
        except BaseException as e:
            raised.append(e)
            raise

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            vocab_size=vocab_size,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
            **CHALLENGE_TRAINER_SETTINGS,
        )
    except RuntimeError as e:
        if raised:
            raise raised[0] from None
        raise InvalidInput(f"{source}: SentencePiece training failed: {trainer_problem(str(e))}") from None
    return model.getvalue()


def trainer_problem(message: str) -> str:
    """SentencePiece's error, reworded where it is a known input problem."""
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (
            f"vocab size {too_small.group(1)} is too small for this corpus: its characters need at least "
            f"{too_small.group(2)} pieces (with byte fallback and the 4 special pieces)"
        )
    if "sentences_.empty()" in message:
        return "no non-empty training documents"
    return message.splitlines()[0]


def sentencepiece_model_type(model_proto: bytes) -> str:
    """'bpe', 'unigram', 'word' or 'char': ModelProto.trainer_spec (field 2) .model_type (field 3), read from
    the protobuf wire format (SentencePiece's Python API does not expose it)."""
    for field, trainer_spec in _protobuf_fields(model_proto):
        if field == 2:
            model_type = dict(_protobuf_fields(trainer_spec)).get(3, 1)  # proto2 default: UNIGRAM
            return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(model_type, "unknown")
    return "unigram"


def _protobuf_fields(message: bytes):
    """(field number, value) of each top-level field of a serialized protobuf message: an int for varints,
    the raw bytes otherwise."""
    position = 0
    while position < len(message):
        key, position = _protobuf_varint(message, position)
        wire_type = key & 7
        if wire_type == 0:
            value, position = _protobuf_varint(message, position)
        elif wire_type == 2:
            length, position = _protobuf_varint(message, position)
            value, position = message[position : position + length], position + length
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            value, position = message[position : position + width], position + width
        else:
            raise InvalidInput(f"tokenizer: not a SentencePiece model (protobuf wire type {wire_type})")
        yield key >> 3, value


def _protobuf_varint(message: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = message[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


# Word-cache keys are split from SentencePiece's normalized text, which is valid Unicode, so lone surrogates
# never occur in it: they mark what is not a '▁'-word, a document's BOS and the start of its first word.
_BOS_KEY = "\ud800"
_FIRST_MARK = "\udc00"


@dataclass
class EncodedBatch:
    tokens: np.ndarray  # uint16: [BOS] + ids of every document, back to back
    documents: int
    text_bytes: int  # raw UTF-8 bytes of the documents' text
    bytes: int  # the bpb denominator of these tokens (pgolf.bpb tables)


class DocumentEncoder:
    """Encodes documents to `[BOS] + sp.encode(text)` each, exactly, faster than `sp.encode` alone.

    Why this is exact: SentencePiece normalizes the text (spaces become '▁'), then segments it. In a BPE model
    where no piece holds '▁' past its first character, no merge can span a '▁', and merges within a word are
    ordered by score, then position, independently of other words; so the encoding of a text is the
    concatenation of the encodings of its '▁'-words, each made on its own. Words repeat (Zipf), so each
    distinct word is encoded once and its ids are reused. Other models (unigram segments a word differently in
    context), or a batch whose new words do not normalize to themselves, are encoded with plain `sp.encode`.
    """

    def __init__(self, model_proto: bytes, cache_size: int = WORD_CACHE_SIZE):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        vocab_size = self.sp.GetPieceSize()
        check_vocab_size(vocab_size, "tokenizer")
        pieces = [self.sp.IdToPiece(i) for i in range(vocab_size)]
        self.starts_word = np.array([p.startswith(SPACE) for p in pieces])
        self.words_separable = sentencepiece_model_type(model_proto) == "bpe" and not any(
            SPACE in p[1:] for p in pieces
        )
        self.tables = build_byte_tables(self.sp)
        self.cache_size = cache_size
        self.word_index = {_BOS_KEY: 0}  # cache key -> word number
        self.word_ids = np.array([BOS_ID], dtype=np.uint16)  # ids of all cached words, back to back
        self.word_start = np.zeros(1, dtype=np.int64)  # where each word's ids start in word_ids
        self.word_length = np.ones(1, dtype=np.int64)

    def encode(self, texts: list[str]) -> EncodedBatch:
        tokens = self.encode_words(texts) if self.words_separable else None
        if tokens is None:
            tokens = self.encode_plain(texts)
        return EncodedBatch(
            tokens=tokens,
            documents=len(texts),
            text_bytes=sum(len(text.encode("utf-8")) for text in texts),
            bytes=self.tables.count_bytes(tokens),
        )

    def encode_plain(self, texts: list[str]) -> np.ndarray:
        encoded = self.sp.encode(texts, out_type=int, num_threads=1)
        total = sum(map(len, encoded)) + len(encoded)
        with_bos = itertools.chain.from_iterable(itertools.chain((BOS_ID,), ids) for ids in encoded)
        return np.fromiter(with_bos, dtype=np.uint16, count=total)

    def encode_words(self, texts: list[str]) -> np.ndarray | None:
        # One split of the whole batch: each document contributes _BOS_KEY, its first word behind _FIRST_MARK,
        # then its '▁'-words without their '▁'.
        batch = SPACE.join(f"{_BOS_KEY}{SPACE}{_FIRST_MARK}{text}" for text in self.sp.normalize(texts))
        keys = batch.split(SPACE)
        index = np.fromiter(
            map(self.word_index.get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys)
        )
        missing = np.flatnonzero(index < 0)
        if len(missing) == 0:
            return self.gather(index)
        if not self.learn_words(keys, index, missing):
            return None
        tokens = self.gather(index)
        if len(self.word_index) > self.cache_size:
            self.forget_words(self.cache_size)
        return tokens

    def gather(self, index: np.ndarray) -> np.ndarray:
        """The cached ids of words `index`, back to back."""
        lengths = self.word_length[index]
        ends = np.cumsum(lengths)
        # Output position p copies word_ids[start of its word + (p - where its word begins in the output)].
        shift = np.repeat(self.word_start[index] - (ends - lengths), lengths)
        return self.word_ids[shift + np.arange(int(ends[-1]))]

    def learn_words(self, keys: list[str], index: np.ndarray, missing: np.ndarray) -> bool:
        """Encode and cache the words at positions `missing` of `keys`, and fill in their `index`; False when
        they can't be encoded word by word."""
        opens_document = np.zeros(len(keys), dtype=bool)
        opens_document[np.flatnonzero(index == 0) + 1] = True  # the key after each BOS is a first word
        missing_keys = list(map(keys.__getitem__, missing.tolist()))
        is_first = opens_document[missing].tolist()
        first_keys = list(dict.fromkeys(itertools.compress(missing_keys, is_first)))
        inner_keys = list(dict.fromkeys(itertools.compress(missing_keys, map(operator.not_, is_first))))
        encoded = (
            self.encode_first_words([key[1:] for key in first_keys]),
            self.encode_inner_words(inner_keys),
        )
        if None in encoded:
            return False
        for new_keys, (ids, lengths) in zip((first_keys, inner_keys), encoded, strict=True):
            numbers = range(len(self.word_index), len(self.word_index) + len(new_keys))
            self.word_index.update(zip(new_keys, numbers, strict=True))
            self.word_start = np.concatenate(
                [self.word_start, len(self.word_ids) + np.cumsum(lengths) - lengths]
            )
            self.word_length = np.concatenate([self.word_length, lengths])
            self.word_ids = np.concatenate([self.word_ids, ids])
        index[missing] = np.fromiter(map(self.word_index.__getitem__, missing_keys), dtype=np.int64)
        return True

    def forget_words(self, keep: int) -> None:
        """Drop all but the first `keep` cached words, so memory stays bounded; the words seen first, in
        Zipf-distributed text mostly the frequent ones, stay."""
        for key in list(itertools.islice(self.word_index, keep, None)):
            del self.word_index[key]
        self.word_ids = self.word_ids[: self.word_start[keep]]
        self.word_start = self.word_start[:keep]
        self.word_length = self.word_length[:keep]

    def encode_first_words(self, words: list[str]):
        """(ids back to back, length of each) for words that open a document (no '▁')."""
        if not words:
            return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64)
        if self.sp.normalize(words) != words:
            return None
        encoded = self.sp.encode(words, out_type=int, num_threads=1)
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint16)
        return ids, np.array([len(e) for e in encoded], dtype=np.int64)

    def encode_inner_words(self, words: list[str]):
        """(ids back to back, length of each) for '▁'-words, given without their '▁': all in one sp.encode
        call, split where a piece starts with '▁'. A leading 'x' keeps the normalizer from dropping the first
        '▁'."""
        if not words:
            return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64)
        text = "x " + " ".join(words)
        if self.sp.normalize(text) != "x" + SPACE + SPACE.join(words):
            return None
        ids = np.array(self.sp.encode(text, out_type=int), dtype=np.uint16)
        starts = np.flatnonzero(self.starts_word[ids])
        if len(starts) != len(words):
            return None
        return ids[starts[0] :], np.diff(np.append(starts, len(ids)))


def split_batches(documents: Iterable[str], val_docs: int, batch_chars: int = BATCH_CHARS):
    """(split, texts) batches of about `batch_chars` characters; no batch mixes the val and train splits."""
    texts: list[str] = []
    chars = 0
    for index, text in enumerate(documents):
        if index == val_docs and texts:
            yield "val", texts
            texts, chars = [], 0
        texts.append(text)
        chars += len(text)
        if chars >= batch_chars:
            yield ("val" if index < val_docs else "train"), texts
            texts, chars = [], 0
    if texts:
        yield ("val" if index < val_docs else "train"), texts


_worker_encoder: DocumentEncoder | None = None


def _tokenizer_worker_init(model_proto: bytes) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    _worker_encoder = DocumentEncoder(model_proto)


def _tokenizer_worker_encode(texts: list[str]) -> EncodedBatch:
    return _worker_encoder.encode(texts)


def encode_batches(batches: Iterable[tuple[str, list[str]]], model_proto: bytes, workers: int):
    """(split, EncodedBatch) for each batch, in order, encoded by `workers` processes (in this one when 1)."""
    encoder = DocumentEncoder(model_proto)  # here first, so a bad model fails now rather than in every worker
    if workers == 1:
        for split, texts in batches:
            yield split, encoder.encode(texts)
        return
    # fork starts workers at once (spawn would re-import the caller's whole CLI in each); the caller must not
    # run threads meanwhile (a forked lock held by another thread stays locked), so `pgolf tokenize` refreshes
    # its progress bar by hand rather than from a thread.
    pool = multiprocessing.get_context("fork").Pool(workers, _tokenizer_worker_init, (model_proto,))
    pending = collections.deque()
    try:
        for split, texts in batches:
            pending.append((split, pool.apply_async(_tokenizer_worker_encode, (texts,))))
            if len(pending) > 2 * workers:  # bounded read-ahead: the corpus is never all in memory
                split, result = pending.popleft()
                yield split, result.get()
        while pending:
            split, result = pending.popleft()
            yield split, result.get()
    finally:
        pool.terminate()
        pool.join()


def write_shards(
    documents: Iterable[str],
    model_proto: bytes,
    directory: Path,
    *,
    val_docs: int,
    shard_tokens: int,
    workers: int = 0,
    on_batch: Callable[[str, EncodedBatch], None] | None = None,
) -> tuple[dict, dict]:
    """Encode `documents` into `directory`'s val then train shards. Returns per split its totals
    {documents, tokens, bytes, text_bytes} and its shard paths. A shard not finished when an exception escapes
    is removed."""
    workers = workers or os.cpu_count() or 1
    totals = {split: {"documents": 0, "tokens": 0, "bytes": 0, "text_bytes": 0} for split in ("val", "train")}
    writers = {split: ShardWriter(directory, split, shard_tokens) for split in ("val", "train")}
    batches = encode_batches(split_batches(documents, val_docs), model_proto, workers)
    try:
        with contextlib.closing(batches):
            for split, batch in batches:
                writers[split].write(batch.tokens)
                counts = totals[split]
                counts["documents"] += batch.documents
                counts["tokens"] += len(batch.tokens)
                counts["bytes"] += batch.bytes
                counts["text_bytes"] += batch.text_bytes
                if on_batch:
                    on_batch(split, batch)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    return totals, {split: writer.close() for split, writer in writers.items()}
