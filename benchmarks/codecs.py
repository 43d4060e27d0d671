"""Blob size and speed of every codec x byte-shuffle x bitpack layout on one quantize output.

    python benchmarks/codecs.py artifacts/run1/q                     # all 16 layouts, one JSON line each
    python benchmarks/codecs.py artifacts/run1/q --codecs zstd,brotli --level-sweep

Each line: codec, level, shuffle, bitpack, bytes (the whole counted blob), ratio (tensor bytes / blob bytes),
encode_s / decode_s (wall clock) and encode_cpu_s / decode_cpu_s (this process's CPU time, less disturbed by
other load on a shared machine), and roundtrip (unpack_blob restored every tensor bit-exactly). A last line
`{"summary": ...}` names the smallest layout, the bytes bitpacking saves or costs per codec, and what the
plan JSON inside the blob costs on its own (it is counted too).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from pgolf.artifacts import open_stage, output_path
from pgolf.codecs import (
    CODECS,
    DEFAULT_LEVELS,
    LEVEL_RANGES,
    build_payload,
    compress_bytes,
    encode_blob,
    tensors_bit_equal,
    unpack_blob,
)
from pgolf.quantized import load_quantized


def timed(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def measure(tensors: dict, plan: dict, codec: str, level: int, shuffle: bool, bitpack: bool,
            tensor_bytes: int) -> dict:
    payload = build_payload(tensors, plan, shuffle, bitpack)
    blob, encode_s, encode_cpu_s = timed(encode_blob, payload, codec, level, shuffle, bitpack)
    (restored, _), decode_s, decode_cpu_s = timed(unpack_blob, blob)
    return {"codec": codec, "level": level, "shuffle": shuffle, "bitpack": bitpack, "bytes": len(blob),
            "ratio": round(tensor_bytes / len(blob), 4), "encode_s": round(encode_s, 3),
            "encode_cpu_s": round(encode_cpu_s, 3), "decode_s": round(decode_s, 3),
            "decode_cpu_s": round(decode_cpu_s, 3), "roundtrip": tensors_bit_equal(restored, tensors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quantize_dir", type=Path,
                        help="A `pgolf quantize` output, or a `pgolf compress` output (its blob is unpacked).")
    parser.add_argument("--codecs", default=",".join(CODECS), help="Comma-separated codecs (default: all).")
    parser.add_argument("--level-sweep", action="store_true", help="Also try every level of each codec "
                        "(shuffle on, bitpack off).")
    args = parser.parse_args()
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown:
        sys.exit(f"unknown codec(s) {', '.join(unknown)} (valid: {', '.join(CODECS)})")
    manifest = open_stage(args.quantize_dir, ("quantize", "compress"))
    if manifest["stage"] == "compress":  # the quantized state is exactly what the blob restores
        tensors, plan = unpack_blob(output_path(manifest, args.quantize_dir, "blob").read_bytes())
    else:
        tensors, plan = load_quantized(output_path(manifest, args.quantize_dir, "quantized"))
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    rows = []
    for codec in codecs:
        for bitpack in (False, True):
            for shuffle in (False, True):
                level = DEFAULT_LEVELS[codec]
                rows.append(measure(tensors, plan, codec, level, shuffle, bitpack, tensor_bytes))
                print(json.dumps(rows[-1]), flush=True)
        if args.level_sweep:
            low, high = LEVEL_RANGES[codec]
            for level in range(low, high + 1):
                print(json.dumps(measure(tensors, plan, codec, level, True, False, tensor_bytes)), flush=True)
    plan_json = json.dumps(plan, separators=(",", ":"), sort_keys=True).encode()
    best = min(rows, key=lambda r: r["bytes"])
    by_layout = {(r["codec"], r["shuffle"], r["bitpack"]): r["bytes"] for r in rows}
    summary = {
        "quantize_dir": str(args.quantize_dir), "tensors": len(tensors), "tensor_bytes": tensor_bytes,
        "smallest": {k: best[k] for k in ("codec", "level", "shuffle", "bitpack", "bytes")},
        "bitpack_saves_bytes": {c: by_layout[c, True, False] - by_layout[c, True, True] for c in codecs},
        "shuffle_saves_bytes": {c: by_layout[c, False, False] - by_layout[c, True, False] for c in codecs},
        "plan_json_bytes": len(plan_json),
        "plan_json_compressed": {c: len(compress_bytes(plan_json, c, DEFAULT_LEVELS[c])) for c in codecs},
        "all_roundtrips_exact": all(r["roundtrip"] for r in rows),
    }
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
