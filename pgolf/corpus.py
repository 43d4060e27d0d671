"""Streaming corpus readers: `.jsonl` and `.jsonl.zst` (a JSON object per line), `.txt` (a document per file).

A corpus source is a file, a directory (every corpus file under it, sorted) or a glob pattern (its matches).
Documents are read one line at a time, so the corpus is never held in memory. Bad input raises InvalidInput
naming the file and line: invalid JSON, a missing or non-string text field, bytes that are not UTF-8.
"""

import glob
import json
from collections.abc import Iterator
from pathlib import Path

import zstandard

from pgolf.errors import InvalidInput

CORPUS_SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
# The benchmark corpus was compressed with a long window; zstandard refuses windows above 128 MiB unless told.
ZSTD_MAX_WINDOW = 2**31
CORPUS_READ_BUFFER = 1 << 20


def is_corpus_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(CORPUS_SUFFIXES)


def corpus_files(source: str | Path) -> list[Path]:
    """The corpus files a source names: the file itself, a directory's files, or a glob's matches (sorted)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if is_corpus_file(p))
        if not files:
            raise InvalidInput(f"{source}: directory holds no {', '.join(CORPUS_SUFFIXES)} files")
        return files
    if path.exists():
        if not is_corpus_file(path):
            raise InvalidInput(f"{source}: not a corpus file (expected {', '.join(CORPUS_SUFFIXES)})")
        return [path]
    if glob.has_magic(str(source)):
        files = sorted(p for p in map(Path, glob.glob(str(source), recursive=True)) if is_corpus_file(p))
        if not files:
            raise InvalidInput(f"{source}: pattern matches no {', '.join(CORPUS_SUFFIXES)} files")
        return files
    raise InvalidInput(f"{source}: no such file or directory")


class Corpus:
    """The documents of one or more sources, in order; re-readable (tokenizer training, then encoding).

    `bytes_read` counts the on-disk bytes consumed so far (compressed bytes for `.zst`), against
    `total_bytes`, so a progress bar can show an ETA.
    """

    def __init__(self, sources: list[str | Path], text_field: str = "text"):
        self.sources = [str(s) for s in sources]
        self.files = [f for source in sources for f in corpus_files(source)]
        self.text_field = text_field
        self.total_bytes = sum(f.stat().st_size for f in self.files)
        self.bytes_read = 0

    def __str__(self) -> str:
        return ", ".join(self.sources)

    def documents(self) -> Iterator[str]:
        self.bytes_read = 0
        for path in self.files:
            done_before = self.bytes_read
            with open(path, "rb") as raw:
                if path.name.endswith(".txt"):
                    yield read_text_file(path, raw)
                else:
                    for text in read_jsonl(path, raw, self.text_field):
                        self.bytes_read = done_before + raw.tell()
                        yield text
            self.bytes_read = done_before + path.stat().st_size


def read_text_file(path: Path, raw) -> str:
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{path}: not valid UTF-8 (byte {e.start})") from None


def read_jsonl(path: Path, raw, text_field: str) -> Iterator[str]:
    """The text field of every line of a `.jsonl` or `.jsonl.zst` file; blank lines are skipped."""
    lines = zstd_lines(path, raw) if path.name.endswith(".zst") else raw
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        yield parse_jsonl_line(line, text_field, f"{path}:{line_number}")


def zstd_lines(path: Path, raw) -> Iterator[bytes]:
    """The lines of a zstd stream (one or more frames), decompressed piecewise. A stream that ends inside a
    frame is refused: cut at a block boundary it would otherwise decode to a silently shorter corpus."""
    decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    frame = decompressor.decompressobj()
    pending, lines_done, compressed = b"", 0, 0
    try:
        while chunk := raw.read(CORPUS_READ_BUFFER):
            compressed += len(chunk)
            data = frame.decompress(chunk)
            while frame.eof and frame.unused_data:  # the next frame starts inside this chunk
                rest = frame.unused_data
                frame = decompressor.decompressobj()
                data += frame.decompress(rest)
            pending += data
            if b"\n" not in data:
                continue
            *complete, pending = pending.split(b"\n")
            yield from complete
            lines_done += len(complete)
    except zstandard.ZstdError as e:
        raise InvalidInput(f"{path}: corrupt zstd stream after line {lines_done} ({e})") from None
    if not frame.eof:
        what = "empty" if compressed == 0 else f"truncated (the stream ends inside a frame, after line {lines_done})"
        raise InvalidInput(f"{path}: zstd stream is {what}")
    if pending:
        yield pending


def parse_jsonl_line(line: bytes, text_field: str, where: str) -> str:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{where}: not valid UTF-8 (byte {e.start} of the line)") from None
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise InvalidInput(f"{where}: no '{text_field}' field")
    text = record[text_field]
    if not isinstance(text, str):
        raise InvalidInput(f"{where}: '{text_field}' is a {type(text).__name__}, not a string")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate written as a \\uD8xx escape
            raise InvalidInput(
                f"{where}: '{text_field}' is not valid UTF-8 (unpaired surrogate at {e.start})"
            ) from None
    return text
