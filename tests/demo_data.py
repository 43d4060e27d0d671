"""The suite's own real data, made in-process so no test of pgolf's machinery needs ../shared: the demo's corpus
(CPython's own documentation, scripts/cpython_docs_corpus.py: 227 documents, 1.4 MB of text on Python 3.11) and
a SentencePiece BPE of 1024 pieces trained on it with the challenge's settings (pgolf.tokenizer), as
`make demo` makes them. Tests of facts about the challenge's own data (its tokenizers, FineWeb, the benchmark
corpus) use tests/shared_data.py instead and skip without it.
"""

import functools
import importlib.util
import json
from pathlib import Path

from pgolf.tokenizer import train_tokenizer

CORPUS_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cpython_docs_corpus.py"
TOKENIZER_NAME = "fineweb_1024_bpe.model"  # the name `pgolf tokenize` gives a 1024-piece tokenizer
# The fixtures' validation split: ten documents of 3,000-11,000 characters (1.3k-3.9k tokens each, ~24k in all:
# windows, TTT chunks and document boundaries all occur inside it); every other document is train.
VAL_CHARS, VAL_COUNT = (3_000, 11_000), 10


@functools.cache
def demo_documents() -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location("cpython_docs_corpus", CORPUS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.documents())


@functools.cache
def demo_splits() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(val documents, train documents) of the fixtures, each in corpus order."""
    docs = demo_documents()
    low, high = VAL_CHARS
    val = [i for i, text in enumerate(docs) if low <= len(text) <= high][:VAL_COUNT]
    return tuple(docs[i] for i in val), tuple(text for i, text in enumerate(docs) if i not in val)


@functools.cache
def demo_tokenizer_bytes(vocab_size: int = 1024, skip_train_docs: int = 0) -> bytes:
    """A tokenizer trained (one thread: deterministic) on the train split; skipping its first documents gives a
    different tokenizer of the same vocabulary."""
    return train_tokenizer(demo_splits()[1][skip_train_docs:], vocab_size, threads=1)


def write_demo_tokenizer(directory: Path, vocab_size: int = 1024) -> Path:
    path = Path(directory) / f"fineweb_{vocab_size}_bpe.model"
    path.write_bytes(demo_tokenizer_bytes(vocab_size))
    return path


def write_demo_corpus(directory: Path, texts=None) -> Path:
    """`texts` (default: the whole demo corpus) as docs.jsonl, one {"text": ...} per line."""
    path = Path(directory) / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in (texts or demo_documents())))
    return path
