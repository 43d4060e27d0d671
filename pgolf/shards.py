"""The challenge's token shard format, byte-exact (REFERENCE.md, "Data shards").

Header: 256 little-endian int32 (1,024 bytes): magic 20240520, version 1, n_tokens, then zeros; then n_tokens
little-endian uint16. A file whose size is not exactly 1024 + 2 * n_tokens is rejected.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pgolf.artifacts import MANIFEST, file_record, read_manifest, sha256_file
from pgolf.errors import InvalidInput, named

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
        try:
            self.file.write(tokens.astype("<u2", copy=False).tobytes())
        except OSError as e:
            raise named(e, self.path) from None
        self.n_tokens += int(tokens.size)

    def close(self) -> None:
        try:
            self.file.seek(0)
            self.file.write(header_bytes(self.n_tokens))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise named(e, self.path) from None

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
    """A folder of shards: a `pgolf tokenize` output (`manifest` set) or the challenge's own
    `data/datasets/fineweb10B_spV/`."""

    directory: Path
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    tokenizer: Path | None = None
    manifest: dict | None = None

    def split(self, name: str) -> list[Path]:
        return self.train if name == "train" else self.val

    def tokenizer_sha256(self) -> str:
        """The tokenizer's sha256 (the manifest's, verified when opened, or hashed now)."""
        recorded = (self.manifest or {}).get("metrics", {}).get("tokenizer_sha256")
        if recorded and self.tokenizer == self.listed_tokenizer():
            return recorded
        return sha256_file(self.tokenizer)

    def input_records(self, paths: list[Path], role: str) -> list[dict]:
        """Input records of these files; digests from the manifest where it lists them (verified when opened),
        else hashed now."""
        listed = {(self.directory / out["path"]).resolve(): out for out in (self.manifest or {}).get("outputs", [])}
        records = []
        for path in paths:
            known = listed.get(Path(path).resolve())
            records.append({**known, "path": str(Path(path).resolve()), "role": role} if known
                           else file_record(path, role))
        return records

    def listed_tokenizer(self) -> Path | None:
        for out in (self.manifest or {}).get("outputs", []):
            if out["role"] == "tokenizer":
                return self.directory / out["path"]
        return None


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


def check_listed_shards(dataset: Dataset, verify: tuple[str, ...]) -> None:
    """With a tokenize manifest: every shard on disk is one it lists (an extra fineweb_val_000001.bin would be
    scored as validation), every listed shard is there, and the splits in `verify` (and the tokenizer) still
    have their recorded sha256."""
    where = dataset.directory / MANIFEST
    listed = {out["path"]: out for out in dataset.manifest["outputs"]}
    for split in SPLITS:
        for path in dataset.split(split):
            record = listed.get(path.name)
            if record is None or record["role"] != f"{split}_shard":
                raise InvalidInput(f"{path}: a shard {where} does not list (added after tokenize?); move it away "
                                   f"or re-run tokenize")
        on_disk = {path.name for path in dataset.split(split)}
        missing = sorted(name for name, out in listed.items() if out["role"] == f"{split}_shard"
                         and name not in on_disk)
        if missing:
            raise InvalidInput(f"{dataset.directory / missing[0]}: listed in {where} but missing")
    checked = [path for split in verify for path in dataset.split(split)]
    if dataset.tokenizer is not None and dataset.tokenizer == dataset.listed_tokenizer():
        checked.append(dataset.tokenizer)
    for path in checked:
        record = listed[path.name]
        if path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            raise InvalidInput(f"{path}: sha256 does not match {where} (changed after tokenize)")


def open_dataset(directory: Path, tokenizer: Path | None = None, verify: tuple[str, ...] = SPLITS) -> Dataset:
    """A shard directory with every shard's header checked (no empty shard: an empty train stream never ends).
    With a tokenize manifest, its listing is authoritative and the splits in `verify` are digest-checked; its
    tokenizer is the default."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInput(f"{directory}: no such data directory")
    manifest = read_manifest(directory) if (directory / MANIFEST).is_file() else None
    if manifest is not None and manifest["stage"] != "tokenize":
        raise InvalidInput(f"{directory}: is a '{manifest['stage']}' output, not a shard directory")
    dataset = Dataset(directory, list_shards(directory, "train"), list_shards(directory, "val"), manifest=manifest)
    if not dataset.train and not dataset.val:
        raise InvalidInput(f"{directory}: no fineweb_train_*.bin or fineweb_val_*.bin shards")
    if tokenizer:
        dataset.tokenizer = Path(tokenizer)
    else:
        dataset.tokenizer = dataset.listed_tokenizer() or find_tokenizer(directory)
    for path in dataset.train + dataset.val:
        if read_header(path) == 0:
            raise InvalidInput(f"{path}: holds 0 tokens (an empty shard; remove it or re-run tokenize)")
    if manifest is not None:
        check_listed_shards(dataset, verify)
    return dataset


def dataset_fingerprint(dataset: Dataset, sample_bytes: int = 1 << 20) -> str:
    """A digest that tells one dataset from another without hashing every train byte (10 GB at challenge scale):
    the tokenizer's and the val shards' sha256, and each train shard's name, size and first and last MiB."""
    def sampled(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(sample_bytes))
            f.seek(max(path.stat().st_size - sample_bytes, 0))
            digest.update(f.read(sample_bytes))
        return digest.hexdigest()

    listed = {out["path"]: out["sha256"] for out in (dataset.manifest or {}).get("outputs", [])}
    identity = {
        "tokenizer": dataset.tokenizer_sha256() if dataset.tokenizer else None,
        "val": [listed.get(path.name) or sha256_file(path) for path in dataset.val],
        "train": [[path.name, path.stat().st_size, sampled(path)] for path in dataset.train],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def load_split(paths: list[Path]) -> np.ndarray:
    """All tokens of a split in one array (validation is small: 62 M tokens = 124 MB at sp1024)."""
    if not paths:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate([np.asarray(load_shard(p)) for p in paths])
