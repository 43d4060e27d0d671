"""How much a blob's compressed size moves when only its header's provenance changes: one quantize output packed
N times with the plan's source sha256 and train_dir set to other values of the same length (what a checkpoint's
digest and a run's directory were before blobs left them out), per codec layout. One JSON line.

    python benchmarks/header_jitter.py artifacts/run/q --codec brotli --tries 6
"""

import argparse
import copy
import hashlib
import json
from pathlib import Path

from pgolf.codecs import CODECS, build_payload, check_codec, encode_blob
from pgolf.quantized import load_quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quantized", type=Path, help="a `pgolf quantize` output directory")
    parser.add_argument("--codec", default="brotli", choices=CODECS)
    parser.add_argument("--tries", type=int, default=6)
    args = parser.parse_args()
    tensors, plan = load_quantized(args.quantized)
    level = check_codec(args.codec, None)
    sizes = {}
    for shuffle in (False, True):
        row = []
        for i in range(args.tries):
            varied = copy.deepcopy(plan)
            varied["source"] = {"sha256": hashlib.sha256(str(i).encode()).hexdigest()}
            # In the blob the header is all that differs: the tensors' bytes are the same each time.
            payload = build_payload(tensors, varied, shuffle, False)
            row.append(len(encode_blob(payload, args.codec, level, shuffle, False)))
        sizes[f"shuffle={shuffle}"] = {"min": min(row), "max": max(row), "spread": max(row) - min(row), "sizes": row}
    print(json.dumps({"quantized": str(args.quantized), "codec": args.codec, "tensors": len(tensors), **sizes}))


if __name__ == "__main__":
    main()
