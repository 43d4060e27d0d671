"""Encoding throughput of `pgolf tokenize`, against plain SentencePiece in the same run.

    python benchmarks/tokenize_throughput.py                 # the benchmark corpus with sp1024, all cores
    python benchmarks/tokenize_throughput.py --workers 8 --json

Three ways to turn the corpus into `[BOS] + sp.encode(text)` per document, each reading the corpus itself:
  pipeline  pgolf.tokenizer.write_shards with --workers processes (what `pgolf tokenize` runs after training)
  one-core  the same in one process (the word cache alone, no parallelism)
  baseline  a plain loop of [BOS] + sp.encode(text) over the documents in one process
Rates are MB of raw UTF-8 text per second of wall clock, and per CPU-second (this process and its workers;
less disturbed by other load on a shared machine). On the benchmark corpus with the shared sp1024 model and
--val-docs 10000 the pipeline's counts must equal ../shared/data/README.md's exactly; a mismatch exits 1.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.bpb import build_byte_tables
from pgolf.corpus import Corpus
from pgolf.shards import BOS_ID, list_shards, load_split
from pgolf.tokenizer import write_shards

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
BENCH_CORPUS = SHARED / "bench" / "blogs-125MB.jsonl.zst"
SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
# ../shared/data/README.md, "The benchmark protocol": sp1024 on the benchmark corpus, 10,000 val documents.
EXPECTED_BENCH_COUNTS = {
    "val": {"documents": 10_000, "tokens": 5_153_041, "text_bytes": 12_636_391, "bytes": 12_623_248},
    "train": {"documents": 82_967, "tokens": 46_039_912},
}


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(name: str, run) -> dict:
    """Run `run() -> (splits, text_bytes)` and time it by wall clock and CPU."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    splits, text_bytes = run()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    row = {
        "name": name,
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "text_bytes": text_bytes,
        "mb_per_s": round(text_bytes / wall / 1e6, 2),
        "mb_per_cpu_s": round(text_bytes / cpu / 1e6, 2),
    }
    print(
        f"{name:9s} {wall:7.1f} s  {row['mb_per_s']:6.2f} MB/s  {row['mb_per_cpu_s']:6.2f} MB/CPU-s",
        file=sys.stderr,
    )
    return {**row, "splits": splits}


def run_pipeline(corpus: Corpus, model_proto: bytes, val_docs: int, workers: int):
    with tempfile.TemporaryDirectory() as directory:
        splits, _ = write_shards(
            corpus.documents(),
            model_proto,
            Path(directory),
            val_docs=val_docs,
            shard_tokens=100_000_000,
            workers=workers,
        )
        # The bpb denominator, recounted from the written val shards rather than taken from the encoder.
        sp = spm.SentencePieceProcessor(model_proto=model_proto)
        splits["val"]["bytes_from_shards"] = build_byte_tables(sp).count_bytes(
            load_split(list_shards(directory, "val"))
        )
    return splits, sum(s["text_bytes"] for s in splits.values())


def run_baseline(corpus: Corpus, model_proto: bytes):
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    tokens = text_bytes = documents = 0
    for text in corpus.documents():
        ids = np.array([BOS_ID, *sp.encode(text)], dtype=np.uint16)
        tokens += len(ids)
        text_bytes += len(text.encode("utf-8"))
        documents += 1
    return {"all": {"documents": documents, "tokens": tokens}}, text_bytes


def count_mismatches(splits: dict) -> list[str]:
    problems = [
        f"{split} {key}: {splits[split][key]:,} != expected {value:,}"
        for split, expected in EXPECTED_BENCH_COUNTS.items()
        for key, value in expected.items()
        if splits[split][key] != value
    ]
    if splits["val"]["bytes_from_shards"] != EXPECTED_BENCH_COUNTS["val"]["bytes"]:
        problems.append(f"val bytes recounted from shards: {splits['val']['bytes_from_shards']:,}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(BENCH_CORPUS), help="corpus file, directory or glob")
    parser.add_argument("--tokenizer", default=str(SP1024), help="SentencePiece model")
    parser.add_argument("--val-docs", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args()
    if not Path(args.tokenizer).is_file():
        sys.exit(f"{args.tokenizer}: not found (the shared data lives in ../shared/data)")
    corpus = Corpus([args.corpus])
    model_proto = Path(args.tokenizer).read_bytes()
    print(
        f"{args.corpus} ({corpus.total_bytes / 1e6:.1f} MB on disk), {args.tokenizer}, "
        f"{os.cpu_count()} cores",
        file=sys.stderr,
    )
    pipeline = measure(
        f"pipeline ({args.workers} workers)",
        lambda: run_pipeline(corpus, model_proto, args.val_docs, args.workers),
    )
    one_core = measure("one-core", lambda: run_pipeline(corpus, model_proto, args.val_docs, 1))
    baseline = measure("baseline", lambda: run_baseline(corpus, model_proto))

    result = {
        "corpus": args.corpus,
        "tokenizer": args.tokenizer,
        "workers": args.workers,
        "cpu_count": os.cpu_count(),
        "runs": [pipeline, one_core, baseline],
        "pipeline_mb_per_s_per_core": round(pipeline["mb_per_s"] / args.workers, 2),
        "speedup_vs_baseline": round(pipeline["mb_per_s"] / baseline["mb_per_s"], 2),
        "one_core_speedup_vs_baseline": round(one_core["mb_per_s"] / baseline["mb_per_s"], 2),
    }
    problems = []
    if (
        Path(args.corpus).resolve() == BENCH_CORPUS.resolve()
        and Path(args.tokenizer).resolve() == SP1024.resolve()
        and args.val_docs == 10_000
    ):
        problems = count_mismatches(pipeline["splits"]) + count_mismatches(one_core["splits"])
        result["counts_match_readme"] = not problems
        print(
            "counts: " + ("match ../shared/data/README.md exactly" if not problems else "; ".join(problems)),
            file=sys.stderr,
        )
    print(
        f"pipeline {result['pipeline_mb_per_s_per_core']} MB/s per core; "
        f"{result['speedup_vs_baseline']}x the plain loop "
        f"({result['one_core_speedup_vs_baseline']}x on one core)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result, default=int))
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
