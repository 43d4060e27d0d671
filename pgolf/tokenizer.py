"""SentencePiece training with the challenge's settings, and fast exact parallel encoding into token shards.

Every document becomes `[BOS=1] + sp.encode(text)` (no EOS); the first `val_docs` documents form the
validation split and the rest the train split, each written as challenge shards (REFERENCE.md, "Data shards").
"""

import collections
import contextlib
import io
import itertools
import multiprocessing
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
WORD_CACHE_SIZE = 1 << 20  # distinct words an encoder keeps (~80 MB); rarer ones are encoded every time


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


# Words are looked up by a polynomial hash of their UTF-8 bytes (mod 2^64), computed for a whole batch at once
# from prefix sums. A collision costs speed, never correctness: every word is then checked byte for byte.
_HASH_BASE = np.uint64(0x100000001B3)  # odd, hence invertible mod 2^64
_HASH_MIX = np.uint64(0x9E3779B97F4A7C15)  # spreads the hash into the high bits that pick a table slot
_NEWLINE = ord("\n")


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
    concatenation of the encodings of its words (a document's first word, then one per '▁'), each made on its
    own. Words repeat (Zipf), so each distinct word is encoded once and its ids cached, in numpy arrays and an
    open-addressing hash table that whole batches are looked up in at once. Every word of a batch is compared
    byte for byte with the cached word it was matched to. Other models (unigram segments a word differently in
    context), or a batch that fails a check, are encoded with plain `sp.encode`.
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
        table_bits = (2 * cache_size - 1).bit_length()  # the table stays at most half full
        self.slot_shift = 64 - table_bits
        self.slot_hash = np.zeros(1 << table_bits, dtype=np.uint64)
        self.slot_word = np.full(1 << table_bits, -1, dtype=np.int64)  # word number, -1 = empty slot
        # Word 0 is BOS (never looked up). Words past `cached_words` serve one batch only.
        self.cached_words = 1
        self.word_ids = np.array([BOS_ID], dtype=np.uint16)  # ids of all words, back to back
        self.ids_start = np.zeros(1, dtype=np.int64)
        self.ids_length = np.ones(1, dtype=np.int64)
        self.word_bytes = np.zeros(0, dtype=np.uint8)  # UTF-8 of all words, back to back
        self.bytes_start = np.zeros(1, dtype=np.int64)
        self.bytes_length = np.zeros(1, dtype=np.int64)
        self.powers = self.inverse_powers = np.ones(1, dtype=np.uint64)

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
        data = np.frombuffer("\n".join(self.sp.normalize(texts)).encode("utf-8"), dtype=np.uint8)
        newline = data == _NEWLINE
        if np.count_nonzero(newline) != len(texts) - 1:
            return None  # a normalized document holds a '\n' of its own
        starts, ends, opens_document = split_words(data, newline)
        hashes = self.hash_words(data, starts, ends)
        word = self.lookup(hashes)
        missing = np.flatnonzero(word < 0)
        learned = len(missing) == 0 or self.learn_words(
            data, starts, ends, opens_document, hashes[missing], missing, word
        )
        if not learned:
            return None
        tokens = None
        if self.words_match(data[~newline], ends - starts, word):
            with_bos = np.insert(word, np.flatnonzero(opens_document), 0)  # word 0, BOS, opens each document
            tokens = self.gather(with_bos)
        self.forget_uncached_words()
        return tokens

    def hash_words(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """hash(word) = sum of byte[i] * BASE^(i - start), from prefix sums of byte[i] * BASE^i."""
        if len(self.powers) <= len(data):
            bases = np.full(1 << len(data).bit_length(), _HASH_BASE, dtype=np.uint64)
            bases[0] = 1
            self.powers = np.multiply.accumulate(bases)
            bases[1:] = pow(int(_HASH_BASE), -1, 1 << 64)
            self.inverse_powers = np.multiply.accumulate(bases)
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        np.cumsum(data * self.powers[: len(data)], out=prefix[1:])
        hashes = (prefix[ends] - prefix[starts]) * self.inverse_powers[starts]
        return hashes * _HASH_MIX + (ends - starts).astype(np.uint64)

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        """The cached word number of each hash, -1 where none (linear probing, all hashes at once)."""
        mask = len(self.slot_word) - 1
        slot = (hashes >> np.uint64(self.slot_shift)).astype(np.int64)
        word = np.full(len(hashes), -1, dtype=np.int64)
        pending = np.arange(len(hashes))
        while len(pending):
            held = self.slot_word[slot[pending]]
            found = (held >= 0) & (self.slot_hash[slot[pending]] == hashes[pending])
            word[pending[found]] = held[found]
            pending = pending[(held >= 0) & ~found]
            slot[pending] = (slot[pending] + 1) & mask
        return word

    def learn_words(self, data, starts, ends, opens_document, hashes, missing, word) -> bool:
        """Encode the distinct words at positions `missing` (with `hashes`), number them, fill in their `word`
        and cache as many as there is room for; False when they can't be encoded word by word."""
        unique_hashes, first_seen, which = np.unique(hashes, return_index=True, return_inverse=True)
        seen = missing[first_seen]
        order = np.concatenate([np.flatnonzero(opens_document[seen]), np.flatnonzero(~opens_document[seen])])
        new = seen[order]  # words that open a document first, then '▁'-words
        firsts = int(np.count_nonzero(opens_document[seen]))
        lengths = ends[new] - starts[new]
        new_bytes = data[concatenated_ranges(starts[new], lengths)]
        split = int(lengths[:firsts].sum())
        first_words = [data[starts[i] : ends[i]].tobytes().decode() for i in new[:firsts].tolist()]
        encoded = (
            self.encode_first_words(first_words),
            self.encode_inner_words(new_bytes[split:].tobytes().decode(), len(new) - firsts),
        )
        if None in encoded:
            return False
        number = np.empty(len(new), dtype=np.int64)
        number[order] = len(self.ids_length) + np.arange(len(new))
        word[missing] = number[which]
        ids_length = np.concatenate([encoded[0][1], encoded[1][1]])
        self.ids_start = np.concatenate(
            [self.ids_start, len(self.word_ids) + np.cumsum(ids_length) - ids_length]
        )
        self.ids_length = np.concatenate([self.ids_length, ids_length])
        self.word_ids = np.concatenate([self.word_ids, encoded[0][0], encoded[1][0]])
        self.bytes_start = np.concatenate(
            [self.bytes_start, len(self.word_bytes) + np.cumsum(lengths) - lengths]
        )
        self.bytes_length = np.concatenate([self.bytes_length, lengths])
        self.word_bytes = np.concatenate([self.word_bytes, new_bytes])
        room = min(max(self.cache_size - self.cached_words, 0), len(new))
        self.cache(unique_hashes[order][:room].tolist(), range(self.cached_words, self.cached_words + room))
        return True

    def cache(self, hashes: list[int], numbers: range) -> None:
        """Put words in the hash table; their ids and bytes are already stored under `numbers`."""
        mask = len(self.slot_word) - 1
        for hash_, number in zip(hashes, numbers, strict=True):
            slot = hash_ >> self.slot_shift
            while self.slot_word[slot] >= 0:
                slot = (slot + 1) & mask
            self.slot_hash[slot] = hash_
            self.slot_word[slot] = number
        self.cached_words += len(numbers)

    def forget_uncached_words(self) -> None:
        keep = self.cached_words
        if len(self.ids_length) > keep:
            self.word_ids = self.word_ids[: self.ids_start[keep]]
            self.word_bytes = self.word_bytes[: self.bytes_start[keep]]
            self.ids_start, self.ids_length = self.ids_start[:keep], self.ids_length[:keep]
            self.bytes_start, self.bytes_length = self.bytes_start[:keep], self.bytes_length[:keep]

    def words_match(self, word_bytes: np.ndarray, lengths: np.ndarray, word: np.ndarray) -> bool:
        """Whether the words' bytes, back to back, equal those of the stored words they were matched to."""
        return np.array_equal(self.bytes_length[word], lengths) and np.array_equal(
            self.word_bytes[concatenated_ranges(self.bytes_start[word], lengths)], word_bytes
        )

    def gather(self, word: np.ndarray) -> np.ndarray:
        """The ids of words `word`, back to back."""
        return self.word_ids[concatenated_ranges(self.ids_start[word], self.ids_length[word])]

    def encode_first_words(self, words: list[str]):
        """(ids back to back, length of each) for words that open a document (no '▁')."""
        if not words:
            return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64)
        if self.sp.normalize(words) != words:
            return None
        encoded = self.sp.encode(words, out_type=int, num_threads=1)
        ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint16)
        return ids, np.array([len(e) for e in encoded], dtype=np.int64)

    def encode_inner_words(self, words: str, count: int):
        """(ids back to back, length of each) for `count` '▁'-words given back to back: one sp.encode
        call, split where a piece starts with '▁'. A leading 'x' keeps the normalizer from dropping the first
        '▁'."""
        if count == 0:
            return np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.int64)
        text = "x" + words
        if self.sp.normalize(text) != text:
            return None
        ids = np.array(self.sp.encode(text, out_type=int), dtype=np.uint16)
        starts = np.flatnonzero(self.starts_word[ids])
        if len(starts) != count:
            return None
        return ids[starts[0] :], np.diff(np.append(starts, len(ids)))


def split_words(data: np.ndarray, newline: np.ndarray):
    """(starts, ends, opens_document) of the words in '\n'-separated normalized documents (UTF-8 bytes): a
    word starts at each document start and each '▁' (E2 96 81), and ends where the next starts or at '\n'."""
    n = len(data)
    opens = np.zeros(n + 1, dtype=bool)
    opens[0] = True
    opens[1:] = newline
    is_start = opens.copy()
    is_start[: max(n - 2, 0)] |= (data[:-2] == 0xE2) & (data[1:-1] == 0x96) & (data[2:] == 0x81)
    starts = np.flatnonzero(is_start)
    ends = np.append(starts[1:] - opens[starts[1:]], n)
    return starts, ends, opens[starts]


def concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices of ranges [start, start + length), back to back."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(total)


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
