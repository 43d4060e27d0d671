"""Counted code bytes of a bundled train_gpt.py: plain, self-extracting as it is, and self-extracting minified
(what `pgolf bundle --compress-code` ships), each checked to compile.

    pgolf bundle --train T --blob B --eval E --name x --github-id me --out /tmp/plain   # without --compress-code
    python benchmarks/code_bytes.py /tmp/plain/train_gpt.py

One JSON line: plain_bytes, packed_bytes (lzma/zlib + base85 of the source as bundled), minified_bytes (the
source without docstrings and comments), packed_minified_bytes, and the bytes minifying saves once packed.
"""

import argparse
import json
from pathlib import Path

from pgolf.bundle import extracted_source, minified_source, self_extracting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("script", type=Path, help="a plain (not --compress-code) bundled train_gpt.py")
    args = parser.parse_args()
    plain = args.script.read_text()
    minified = minified_source(plain)
    packed, packed_minified = self_extracting(plain), self_extracting(minified)
    assert extracted_source(packed) == plain and extracted_source(packed_minified) == minified
    for source in (plain, minified, packed, packed_minified):
        compile(source, "train_gpt.py", "exec")
    size = lambda text: len(text.encode())  # noqa: E731
    print(json.dumps({"script": str(args.script), "plain_bytes": size(plain), "packed_bytes": size(packed),
                      "minified_bytes": size(minified), "packed_minified_bytes": size(packed_minified),
                      "minifying_saves_bytes": size(packed) - size(packed_minified)}))


if __name__ == "__main__":
    main()
