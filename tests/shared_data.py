"""Paths to the third-party data in ../shared/data (never copied into the repo); tests skip when it is absent."""

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
SP8192 = SHARED / "tokenizers" / "fineweb_8192_bpe.model"
DOCS200 = SHARED / "fineweb-sample" / "docs-200.jsonl"
BENCH = SHARED / "bench" / "blogs-125MB.jsonl.zst"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path} (see ../shared/data/README.md)")
    return path


def fineweb_docs() -> list[str]:
    with open(need(DOCS200)) as f:
        return [json.loads(line)["text"] for line in f]
