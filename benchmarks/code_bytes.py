"""Counted code bytes of a bundled train_gpt.py: plain, and self-extracting after each --minify mode (what
`pgolf bundle --compress-code --minify MODE` ships), each checked to compile and to unpack to its source.

    pgolf bundle --train T --blob B --eval E --name x --github-id me --out /tmp/plain   # without --compress-code
    python benchmarks/code_bytes.py /tmp/plain/train_gpt.py

One JSON line: plain_bytes, then per mode (off, safe, rename) minified_<mode>_bytes (the program) and
packed_<mode>_bytes (lzma/zlib + base85 behind the stub: the counted bytes), and the seconds minifying took.
"""

import argparse
import json
import time
from pathlib import Path

from pgolf.bundle import MINIFY_MODES, extracted_source, minified_source, self_extracting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("script", type=Path, help="a plain (not --compress-code) bundled train_gpt.py")
    args = parser.parse_args()
    plain = args.script.read_text()
    size = lambda text: len(text.encode())  # noqa: E731
    row = {"script": str(args.script), "plain_bytes": size(plain)}
    for mode in MINIFY_MODES:
        start = time.perf_counter()
        minified = minified_source(plain, mode)
        seconds = time.perf_counter() - start
        packed = self_extracting(minified)
        assert extracted_source(packed) == minified
        compile(minified, "train_gpt.py", "exec")
        compile(packed, "train_gpt.py", "exec")
        row |= {f"minified_{mode}_bytes": size(minified), f"packed_{mode}_bytes": size(packed),
                f"minify_{mode}_seconds": round(seconds, 2)}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
