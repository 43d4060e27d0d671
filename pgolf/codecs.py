"""The counted model blob: a quantized state (integer levels, fp16 scales, passthrough tensors) + its plan.

Layout (every byte counted, every byte decoded deterministically):
    16-byte header, uncompressed: magic b"PGLF" | format version u8 | codec id u8 | level u8 | flags u8
        | compressed stream length u32 LE | CRC32 of the decompressed payload u32 LE
    compressed stream of the payload:
        JSON length u32 LE | JSON {"plan": plan, "tensors": [entry, ...]} | tensor bytes
Each tensor entry is [name, dtype, shape, encoding]; encoding is "raw", "shuffle" (byte planes of a multi-byte
dtype, e.g. fp16 scales: all low bytes, then all high bytes) or ["pack", bits, minimum] (an int8 tensor whose
values span fewer than 8 bits, stored as (value - minimum) in `bits` bits each, little-endian bit order).
The JSON header is compressed with the payload because it is counted too.
Flags bit 0 = shuffle, bit 1 = bitpack, as chosen per blob.
"""
import json
import lzma
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import brotli
import numpy as np
import torch
import zstandard

from pgolf.errors import InvalidInput
from pgolf.quantized import check_quantized

CODECS = ("zlib", "zstd", "lzma", "brotli")  # the index of a name is its codec id in the blob header
DEFAULT_LEVELS = {"zlib": 9, "zstd": 22, "lzma": 9, "brotli": 11}
LEVEL_RANGES = {"zlib": (0, 9), "zstd": (1, 22), "lzma": (0, 9), "brotli": (0, 11)}
BLOB_MAGIC = b"PGLF"
BLOB_VERSION = 1
BLOB_HEADER = struct.Struct("<4sBBBBII")
FLAG_SHUFFLE, FLAG_BITPACK = 1, 2
# Largest decompressed payload a blob may have: a 16 MB blob of int8 levels and fp16 scales restores to well under
# 1 GB; anything larger is a crafted stream, refused before it exhausts memory.
MAX_PAYLOAD_BYTES = 1 << 30
BROTLI_CHUNK = 1 << 24

# Raw LZMA2 (no .xz container) saves the container's ~60 bytes; the filter chain is fixed by the format.
LZMA_FILTERS_BY_LEVEL = {level: [{"id": lzma.FILTER_LZMA2, "preset": level | lzma.PRESET_EXTREME}]
                         for level in range(10)}

BLOB_DTYPES = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float64": torch.float64,
}
BLOB_DTYPE_NAMES = {dtype: name for name, dtype in BLOB_DTYPES.items()}
SWITCHES = {"on": True, "off": False, "auto": None}  # auto = try both, keep the smaller blob


def check_codec(codec: str, level: int | None = None) -> int:
    """The level to use for `codec`; ValueError naming the valid codecs or the level range."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec '{codec}' (valid: {', '.join(CODECS)})")
    if level is None:
        return DEFAULT_LEVELS[codec]
    low, high = LEVEL_RANGES[codec]
    if not low <= level <= high:
        raise ValueError(f"level {level} out of range for {codec} ({low}..{high})")
    return level


def compress_bytes(data: bytes, codec: str, level: int) -> bytes:
    if codec == "zlib":
        return zlib.compress(data, level)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level, write_checksum=False).compress(data)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS_BY_LEVEL[level])
    return brotli.compress(data, quality=level, lgwin=24)


def decompress_bytes(data: bytes, codec: str, level: int, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Decompress one whole stream of at most `limit` bytes; InvalidInput if it is corrupt, truncated, followed
    by stray bytes or larger (a crafted stream must not exhaust memory: a 16 MB blob holds far less)."""
    too_large = InvalidInput(f"{codec} stream decompresses to more than {limit:,} bytes (not a pgolf blob)")
    try:
        if codec == "zlib":
            stream = zlib.decompressobj()
            out = stream.decompress(data, limit + 1)
            complete = stream.eof and not stream.unused_data and not stream.unconsumed_tail
        elif codec == "zstd":
            declared = zstandard.frame_content_size(data)  # pgolf's frames always declare their size
            if declared < 0:
                raise InvalidInput("zstd stream does not declare its size (pgolf always writes it)")
            if declared > limit:
                raise too_large
            stream = zstandard.ZstdDecompressor().decompressobj()
            out = stream.decompress(data)
            complete = stream.eof and not stream.unused_data
        elif codec == "lzma":
            stream = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=LZMA_FILTERS_BY_LEVEL[level])
            out = stream.decompress(data, limit + 1)
            complete = stream.eof and not stream.unused_data
        else:
            stream = brotli.Decompressor()
            parts = [stream.process(data, output_buffer_limit=BROTLI_CHUNK)]
            while not stream.is_finished() and not stream.can_accept_more_data() and \
                    sum(map(len, parts)) <= limit:
                parts.append(stream.process(b"", output_buffer_limit=BROTLI_CHUNK))
            out, complete = b"".join(parts), stream.is_finished()
    except (zlib.error, zstandard.ZstdError, lzma.LZMAError, brotli.error) as e:
        raise InvalidInput(f"{codec} stream is corrupt ({e})") from None
    if len(out) > limit:
        raise too_large
    if not complete:
        raise InvalidInput(f"{codec} stream is truncated or has trailing bytes")
    return out


def tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's little-endian bytes as a flat uint8 array (works for bfloat16, which numpy lacks)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, dtype=np.uint8)


def shuffle_bytes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte planes: byte 0 of every element, then byte 1, ... (runs of similar high bytes compress better)."""
    return raw.reshape(-1, itemsize).T.reshape(-1)


def unshuffle_bytes(planes: np.ndarray, itemsize: int) -> np.ndarray:
    return planes.reshape(itemsize, -1).T.reshape(-1)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Keep the low `bits` bits of each uint8 value, concatenated little-endian."""
    planes = np.unpackbits(values.reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 0:  # a constant tensor: every value is the stored minimum
        return np.zeros(count, dtype=np.uint8)
    planes = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(-1)


def pack_width(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(bits, minimum) when an int8 tensor's values span fewer than 8 bits (int5-int7 levels), else None."""
    if tensor.dtype != torch.int8 or tensor.numel() == 0:
        return None
    low, high = int(tensor.min()), int(tensor.max())
    bits = (high - low).bit_length()
    return (bits, low) if bits < 8 else None


def encode_tensor(tensor: torch.Tensor, shuffle: bool, bitpack: bool) -> tuple[object, np.ndarray]:
    """(encoding, bytes) of one tensor under the blob-wide shuffle/bitpack choice."""
    width = pack_width(tensor) if bitpack else None
    if width is not None:
        bits, minimum = width
        values = (tensor.detach().cpu().reshape(-1).to(torch.int16) - minimum).to(torch.uint8).numpy()
        return ["pack", bits, minimum], pack_bits(values, bits)
    raw = tensor_bytes(tensor)
    if shuffle and tensor.element_size() > 1:
        return "shuffle", shuffle_bytes(raw, tensor.element_size())
    return "raw", raw


def encoded_size(dtype: torch.dtype, numel: int, encoding) -> int:
    if isinstance(encoding, list):
        return (numel * encoding[1] + 7) // 8
    return numel * torch.empty(0, dtype=dtype).element_size()


def decode_tensor(data: np.ndarray, dtype: torch.dtype, shape: list[int], encoding) -> torch.Tensor:
    numel = int(np.prod(shape, dtype=np.int64))
    if isinstance(encoding, list):
        _, bits, minimum = encoding
        values = unpack_bits(data, bits, numel).astype(np.int16) + minimum
        if values.size and int(values.max()) > 127:  # the encoder never writes one; a crafted blob can
            raise ValueError(f"bit-packed value {int(values.max())} does not fit int8")
        return torch.from_numpy(values.astype(np.int8)).reshape(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = unshuffle_bytes(data, itemsize) if encoding == "shuffle" else data
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw.tobytes()), dtype=dtype).reshape(shape)


# Where a plan's provenance names places on the machine that quantized: left out of a blob.
MACHINE_PATHS = ("train_dir", "data")


def blob_plan(plan: dict) -> dict:
    """The plan as a blob carries it: without the quantizing machine's directories (the source's train and data
    paths; a plan file's directory, its name kept). A blob's size is a chaotic function of its header (brotli-11
    moved one 137 KB blob by up to ~550 bytes when 64 header characters changed), so with them the same
    quantized state packed to other sizes in another directory, and the submission carried local paths."""
    out = dict(plan)
    if isinstance(out.get("source"), dict):
        out["source"] = {key: value for key, value in out["source"].items() if key not in MACHINE_PATHS}
    spec = out.get("plan")
    if isinstance(spec, dict) and isinstance(spec.get("name"), str) and os.sep in spec["name"]:
        out["plan"] = {**spec, "name": Path(spec["name"]).name}
    return out


def build_payload(tensors: dict[str, torch.Tensor], plan: dict, shuffle: bool, bitpack: bool) -> bytes:
    """The uncompressed blob: header length, JSON header ({"plan": blob_plan(plan), "tensors": entries}), then
    each tensor's bytes in name order."""
    plan = blob_plan(plan)
    entries, chunks = [], []
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in BLOB_DTYPE_NAMES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, not storable in a blob")
        encoding, data = encode_tensor(tensor, shuffle, bitpack)
        entries.append([name, BLOB_DTYPE_NAMES[tensor.dtype], list(tensor.shape), encoding])
        chunks.append(data.tobytes())
    header = json.dumps({"plan": plan, "tensors": entries}, separators=(",", ":"), sort_keys=True).encode()
    return struct.pack("<I", len(header)) + header + b"".join(chunks)


def check_entry(entry) -> tuple[str, torch.dtype, list[int], object, int]:
    """(name, dtype, shape, encoding, encoded bytes) of a blob tensor entry; ValueError if malformed."""
    if not isinstance(entry, list) or len(entry) != 4:
        raise ValueError("not a [name, dtype, shape, encoding] list")
    name, dtype_name, shape, encoding = entry
    if not isinstance(name, str) or dtype_name not in BLOB_DTYPES:
        raise ValueError("bad name or dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                                              for d in shape):
        raise ValueError("bad shape")
    dtype = BLOB_DTYPES[dtype_name]
    if isinstance(encoding, list):
        if (len(encoding) != 3 or encoding[0] != "pack" or dtype != torch.int8
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in encoding[1:])
                or not 0 <= encoding[1] < 8 or not -128 <= encoding[2] <= 127):
            raise ValueError("bad bit-pack encoding")
    elif encoding not in ("raw", "shuffle"):
        raise ValueError("unknown encoding")
    return name, dtype, shape, encoding, encoded_size(dtype, int(np.prod(shape, dtype=np.int64)), encoding)


def parse_payload(payload: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        (header_len,) = struct.unpack_from("<I", payload)
        header = json.loads(payload[4 : 4 + header_len])
        plan, entries = header["plan"], header["tensors"]
    except (struct.error, ValueError, KeyError, TypeError, RecursionError) as e:
        raise InvalidInput(f"blob header is unreadable ({e})") from None
    if not isinstance(plan, dict) or not isinstance(entries, list):
        raise InvalidInput("blob header is malformed (plan or tensor list missing)")
    buffer = np.frombuffer(payload, dtype=np.uint8)
    offset = 4 + header_len
    tensors = {}
    for entry in entries:
        try:
            name, dtype, shape, encoding, size = check_entry(entry)
        except ValueError as e:
            raise InvalidInput(f"blob tensor entry {str(entry)[:200]} is malformed ({e})") from None
        if name in tensors:
            raise InvalidInput(f"blob lists tensor '{name}' twice")
        if offset + size > len(buffer):
            raise InvalidInput(f"blob payload ends inside tensor '{name}'")
        try:
            tensors[name] = decode_tensor(buffer[offset : offset + size], dtype, shape, encoding)
        except ValueError as e:
            raise InvalidInput(f"blob tensor '{name}' does not decode ({e})") from None
        offset += size
    if offset != len(buffer):
        raise InvalidInput(f"blob payload has {len(buffer) - offset} unexplained trailing bytes")
    return tensors, plan


def encode_blob(payload: bytes, codec: str, level: int, shuffle: bool, bitpack: bool) -> bytes:
    stream = compress_bytes(payload, codec, level)
    flags = (FLAG_SHUFFLE if shuffle else 0) | (FLAG_BITPACK if bitpack else 0)
    header = BLOB_HEADER.pack(BLOB_MAGIC, BLOB_VERSION, CODECS.index(codec), level, flags, len(stream),
                              zlib.crc32(payload))
    return header + stream


def read_blob_header(data: bytes) -> dict:
    """The uncompressed header's fields; InvalidInput on a foreign, truncated or unknown-version blob."""
    if len(data) < BLOB_HEADER.size:
        raise InvalidInput(f"truncated blob ({len(data)} bytes, under the {BLOB_HEADER.size}-byte header)")
    magic, version, codec_id, level, flags, stream_len, crc = BLOB_HEADER.unpack_from(data)
    if magic != BLOB_MAGIC:
        raise InvalidInput(f"not a pgolf blob (magic {magic!r}, expected {BLOB_MAGIC!r})")
    if version != BLOB_VERSION:
        raise InvalidInput(f"blob format version {version} is not supported (this reader: {BLOB_VERSION})")
    if codec_id >= len(CODECS):
        valid = ", ".join(f"{i}={name}" for i, name in enumerate(CODECS))
        raise InvalidInput(f"blob names codec id {codec_id} (valid: {valid})")
    codec = CODECS[codec_id]
    low, high = LEVEL_RANGES[codec]
    if not low <= level <= high:
        raise InvalidInput(f"blob names {codec} level {level}, outside {low}..{high}")
    actual = len(data) - BLOB_HEADER.size
    if actual != stream_len:
        problem = "truncated" if actual < stream_len else "has trailing bytes"
        raise InvalidInput(f"blob {problem}: header says {stream_len} compressed bytes, found {actual}")
    return {"codec": codec, "level": level, "shuffle": bool(flags & FLAG_SHUFFLE),
            "bitpack": bool(flags & FLAG_BITPACK), "stream_bytes": stream_len, "crc32": crc}


def unpack_blob(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, plan) restored bit-exactly from a blob; InvalidInput on anything wrong."""
    info = read_blob_header(data)
    payload = decompress_bytes(data[BLOB_HEADER.size :], info["codec"], info["level"])
    if zlib.crc32(payload) != info["crc32"]:
        raise InvalidInput("blob payload CRC32 does not match its header (corrupt)")
    return parse_payload(payload)


def tensors_bit_equal(restored: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and raw bytes (so NaN payloads and -0.0 count too)."""
    if restored.keys() != original.keys():
        return False
    return all(
        restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape
        and np.array_equal(tensor_bytes(restored[name]), tensor_bytes(tensor))
        for name, tensor in original.items()
    )


def read_blob(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """unpack_blob of a file, its quantized state checked against its plan (pgolf.quantized.check_quantized: a
    crafted or corrupt blob is refused, never half-loaded); errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read ({e.strerror})") from None
    try:
        tensors, plan = unpack_blob(data)
    except InvalidInput as e:
        raise InvalidInput(f"{path}: {e}") from None
    check_quantized(tensors, plan, str(path))
    return tensors, plan


def parallel_workers(tasks: int, cap: int = 8) -> int:
    """Threads for `tasks` independent compressions: the codec libraries release the GIL, so they run on
    separate cores; at most `cap` (zstd-22 holds ~1 GB of match tables per stream)."""
    return max(1, min(tasks, cap, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def blob_candidates(
    tensors: dict[str, torch.Tensor],
    plan: dict,
    codecs: tuple[str, ...],
    *,
    shuffle: bool | None = None,
    bitpack: bool | None = None,
    level: int | None = None,
    progress=None,
) -> list[dict]:
    """Every codec x shuffle x bitpack combination asked for (None = try both), smallest first, compressed on
    parallel threads. `progress(row)` is called for each one in a fixed order (compressing a 16 MB model with
    brotli-11 takes a while).

    Each row: codec, level, shuffle, bitpack, bytes, seconds (encode), blob. Only the smallest row keeps its
    `blob` (the others hold None) so trying many combinations of a 16 MB model does not hold them all.
    """
    levels = {codec: check_codec(codec, level) for codec in codecs}
    shuffles = (False, True) if shuffle is None else (shuffle,)
    bitpacks = (False, True) if bitpack is None else (bitpack,)
    if bitpack is None and not any(pack_width(t) for t in tensors.values()):
        bitpacks = (False,)  # nothing narrower than 8 bits: packing would change no byte
    layouts = [(do_shuffle, do_bitpack) for do_bitpack in bitpacks for do_shuffle in shuffles]
    payloads = {layout: build_payload(tensors, plan, *layout) for layout in layouts}
    combinations = [(codec, *layout) for layout in layouts for codec in codecs]

    def encode(combination) -> tuple[bytes, float]:
        codec, do_shuffle, do_bitpack = combination
        started = time.perf_counter()
        blob = encode_blob(payloads[(do_shuffle, do_bitpack)], codec, levels[codec], do_shuffle, do_bitpack)
        return blob, time.perf_counter() - started

    rows, best = [], None
    with ThreadPoolExecutor(max_workers=parallel_workers(len(combinations))) as pool:
        encoded = pool.map(encode, combinations)
        for (codec, do_shuffle, do_bitpack), (blob, seconds) in zip(combinations, encoded, strict=True):
            row = {"codec": codec, "level": levels[codec], "shuffle": do_shuffle, "bitpack": do_bitpack,
                   "bytes": len(blob), "seconds": round(seconds, 3), "blob": None}
            if best is None or len(blob) < best["bytes"]:
                if best is not None:
                    best["blob"] = None
                row["blob"], best = blob, row
            rows.append(row)
            if progress:
                progress(row)
    return sorted(rows, key=lambda r: r["bytes"])


def pack_blob(
    tensors: dict[str, torch.Tensor],
    plan: dict,
    codec: str,
    *,
    shuffle: bool | None = None,
    bitpack: bool | None = None,
    level: int | None = None,
) -> bytes:
    """The smallest blob for `codec` ("auto" = every codec); shuffle/bitpack None = try both, keep smaller."""
    codecs = CODECS if codec == "auto" else (codec,)
    return blob_candidates(tensors, plan, codecs, shuffle=shuffle, bitpack=bitpack, level=level)[0]["blob"]
