"""`pgolf data check`: validate every shard of a data directory and summarize each split."""

from pathlib import Path

import numpy as np

from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.errors import InvalidInput
from pgolf.shards import BOS_ID, SPLITS, load_shard, open_dataset


def check_split(paths: list[Path], vocab_size: int | None, tables) -> dict:
    """Validate one split's shards in order; the first bad shard raises InvalidInput naming it."""
    tokens = documents = byte_count = 0
    prev_last = None
    for index, path in enumerate(paths):
        shard = load_shard(path)
        if index == 0 and len(shard) and shard[0] != BOS_ID:
            raise InvalidInput(f"{path}: first token is {int(shard[0])}, expected BOS ({BOS_ID})")
        if vocab_size is not None and len(shard) and int(shard.max()) >= vocab_size:
            bad = int(np.argmax(shard >= vocab_size))
            raise InvalidInput(f"{path}: token {int(shard[bad])} at position {bad} >= tokenizer vocab {vocab_size}")
        documents += int(np.count_nonzero(shard == BOS_ID))
        if tables is not None and len(shard):
            byte_count += tables.count_bytes(shard)
            if prev_last is not None:
                byte_count += int(tables.token_bytes([prev_last], [shard[0]])[0])
            prev_last = int(shard[-1])
        tokens += len(shard)
    return {"shards": len(paths), "tokens": tokens, "documents": documents,
            "bytes": byte_count if tables is not None else None}


def check_data(directory: Path, tokenizer: Path | None = None) -> dict:
    """{directory, tokenizer, val: {...}, train: {...}} of a shard directory: magic, version, size = 1024 + 2n,
    n > 0, token ids < vocab, BOS count = documents; with a tokenize manifest, exactly the shards it lists with
    their sha256. InvalidInput (exit 3) naming the first file that fails."""
    dataset = open_dataset(directory, tokenizer)  # headers, no empty shard; a manifest's listing and digests
    manifest = dataset.manifest
    tables = vocab_size = None
    if dataset.tokenizer is not None:
        sp = load_tokenizer(dataset.tokenizer)
        vocab_size = sp.GetPieceSize()
        tables = build_byte_tables(sp)
    result = {"directory": str(directory), "tokenizer": str(dataset.tokenizer) if dataset.tokenizer else None}
    for split in SPLITS:
        summary = check_split(dataset.split(split), vocab_size, tables)
        expected = manifest["metrics"][split]["documents"] if manifest else None
        if expected is not None and summary["documents"] != expected:
            raise InvalidInput(f"{directory}: {split} split has {summary['documents']} BOS tokens but the manifest "
                               f"lists {expected} documents")
        result[split] = summary
    return result
