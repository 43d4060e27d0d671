"""The challenge's token shard format, byte-exact (REFERENCE.md, "Data shards").

Header: 256 little-endian int32 (1,024 bytes): magic 20240520, version 1, n_tokens, then zeros; then n_tokens
little-endian uint16. A file whose size is not exactly 1024 + 2 * n_tokens is rejected.
"""

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgolf.errors import InvalidInput

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
BOS_ID = 1
MAX_VOCAB = 1 << 16
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def header_bytes(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, n_tokens
    return header.tobytes()


def read_header(path: Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) < HEADER_BYTES:
        raise InvalidInput(f"{path}: truncated header ({len(raw)} of {HEADER_BYTES} bytes)")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise InvalidInput(f"{path}: wrong magic {int(header[0])} (expected {MAGIC})")
    if header[1] != VERSION:
        raise InvalidInput(f"{path}: unsupported version {int(header[1])} (expected {VERSION})")
    n_tokens = int(header[2])
    if n_tokens < 0:
        raise InvalidInput(f"{path}: negative token count {n_tokens}")
    if size != HEADER_BYTES + 2 * n_tokens:
        raise InvalidInput(
            f"{path}: size {size} bytes != 1024 + 2 * {n_tokens} tokens = {HEADER_BYTES + 2 * n_tokens}"
        )
    return n_tokens


def load_shard(path: Path) -> np.ndarray:
    """Memory-map a validated shard's tokens as a read-only uint16 array."""
    n_tokens = read_header(path)
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one complete shard atomically (temporary name, fsync, rename)."""
    with ShardFile(path) as shard:
        shard.write(tokens)


class ShardFile:
    """One shard written incrementally: tokens stream into `.name.tmp`, the header is fixed up on close, and the
    file is renamed into place only when complete. An exception inside the `with` leaves no file behind."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.n_tokens = 0
        self.file = open(self.tmp, "wb")
        self.file.write(header_bytes(0))

    def write(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_VOCAB):
            raise InvalidInput(f"{self.path}: token id outside uint16 range")
        self.file.write(tokens.astype("<u2", copy=False).tobytes())
        self.n_tokens += int(tokens.size)

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(header_bytes(self.n_tokens))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()
        return False


class ShardWriter:
    """Splits a stream of documents of one split into shards of at most `shard_tokens` tokens.

    Documents may straddle a shard boundary (each shard is a plain token stream); each split numbers from 0.
    """

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        self.directory = Path(directory)
        self.split = split
        self.shard_tokens = shard_tokens
        self.paths: list[Path] = []
        self.tokens = 0
        self.current: ShardFile | None = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.uint16)
        while tokens.size:
            if self.current is None:
                self.current = ShardFile(self.directory / shard_name(self.split, len(self.paths)))
            room = self.shard_tokens - self.current.n_tokens
            self.current.write(tokens[:room])
            self.tokens += min(room, tokens.size)
            tokens = tokens[room:]
            if self.current.n_tokens == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        self.current.close()
        self.paths.append(self.current.path)
        self.current = None

    def close(self) -> list[Path]:
        if self.current is not None and self.current.n_tokens:
            self._finish()
        elif self.current is not None:
            self.current.discard()
            self.current = None
        return self.paths

    def discard(self) -> None:
        if self.current is not None:
            self.current.discard()
            self.current = None


def list_shards(directory: Path, split: str) -> list[Path]:
    return sorted(Path(directory).glob(f"fineweb_{split}_*.bin"))


@dataclass
class Dataset:
    """A folder of shards: a `pgolf tokenize` output or the challenge's own `data/datasets/fineweb10B_spV/`."""

    directory: Path
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    tokenizer: Path | None = None

    def split(self, name: str) -> list[Path]:
        return self.train if name == "train" else self.val


def find_tokenizer(directory: Path) -> Path | None:
    """The SentencePiece model next to the shards, or the challenge layout's `../../tokenizers/fineweb_V_bpe.model`."""
    directory = Path(directory)
    local = sorted(directory.glob("*.model"))
    if local:
        return local[0]
    match = re.fullmatch(r"fineweb10B_sp(\d+)", directory.name)
    if match:
        candidate = directory.parent.parent / "tokenizers" / f"fineweb_{match.group(1)}_bpe.model"
        if candidate.is_file():
            return candidate
    return None


def open_dataset(directory: Path, tokenizer: Path | None = None) -> Dataset:
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInput(f"{directory}: no such data directory")
    dataset = Dataset(directory, list_shards(directory, "train"), list_shards(directory, "val"))
    dataset.tokenizer = Path(tokenizer) if tokenizer else find_tokenizer(directory)
    if not dataset.train and not dataset.val:
        raise InvalidInput(f"{directory}: no fineweb_train_*.bin or fineweb_val_*.bin shards")
    return dataset


def load_split(paths: list[Path]) -> np.ndarray:
    """All tokens of a split in one array (validation is small: 62 M tokens = 124 MB at sp1024)."""
    if not paths:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate([np.asarray(load_shard(p)) for p in paths])
