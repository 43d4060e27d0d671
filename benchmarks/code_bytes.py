"""Counted code bytes of a bundled train_gpt.py: plain, and self-extracting after each --minify mode (what
`pgolf bundle --compress-code --minify MODE` ships), each checked to compile and to unpack to its source.

    pgolf bundle --train T --blob B --eval E --name x --github-id me --out /tmp/plain   # without --compress-code
    python benchmarks/code_bytes.py /tmp/plain/train_gpt.py

One JSON line: plain_bytes, then per mode (off, safe, rename) minified_<mode>_bytes (the program),
packed_<mode>_bytes (compressed with the best of --codecs, base85 behind the stub: the counted bytes) and
packed_<mode>_latin1_bytes (the same as a latin-1 literal, `--code-literal latin1`), and the seconds minifying took.
    python benchmarks/code_bytes.py /tmp/plain/train_gpt.py --codecs lzma,zlib,brotli   (a brotli blob's bundle)
    python benchmarks/code_bytes.py sub/train_gpt.py --packed --codecs lzma,zlib,brotli   (a shipped
        --compress-code script: its program packed again with each literal, shipped_bytes its own size)
"""

import argparse
import json
import time
from pathlib import Path

from pgolf.bundle import CODE_LITERALS, MINIFY_MODES, extracted_source, minified_source, self_extracting


def packed_sizes(program: str, codecs: tuple[str, ...]) -> dict[str, int]:
    """{literal: counted bytes} of `program` behind the self-extracting stub, each checked to compile and to
    unpack to the program."""
    sizes = {}
    for literal in CODE_LITERALS:
        packed = self_extracting(program, codecs, literal)
        assert extracted_source(packed) == program
        compile(packed, "train_gpt.py", "exec")
        sizes[literal] = len(packed)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("script", type=Path, help="a plain (not --compress-code) bundled train_gpt.py")
    parser.add_argument("--packed", action="store_true", help="the script is a --compress-code one: repack its "
                        "(already minified) program only")
    parser.add_argument("--codecs", default="lzma,zlib", help="packers to try (the bundle adds brotli for a "
                        "brotli blob)")
    args = parser.parse_args()
    codecs = tuple(args.codecs.split(","))
    size = lambda text: len(text.encode())  # noqa: E731
    if args.packed:
        shipped = args.script.read_bytes()
        program = extracted_source(shipped)
        row = {"script": str(args.script), "shipped_bytes": len(shipped), "program_bytes": size(program)}
        row |= {f"packed_{literal}_bytes": count for literal, count in packed_sizes(program, codecs).items()}
        print(json.dumps(row))
        return
    plain = args.script.read_text()
    row = {"script": str(args.script), "plain_bytes": size(plain)}
    for mode in MINIFY_MODES:
        start = time.perf_counter()
        minified = minified_source(plain, mode)
        seconds = time.perf_counter() - start
        compile(minified, "train_gpt.py", "exec")
        row |= {f"minified_{mode}_bytes": size(minified), f"minify_{mode}_seconds": round(seconds, 2)}
        row |= {f"packed_{mode}{'' if literal == 'base85' else '_' + literal}_bytes": count
                for literal, count in packed_sizes(minified, codecs).items()}
    print(json.dumps(row))


if __name__ == "__main__":
    main()
