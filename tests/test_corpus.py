"""pgolf.corpus on real documents (the demo corpus, tests/demo_data.py): every input kind yields exactly the
documents, in order, streamed; bad input names the file (and line) and exits 3."""

import json

import pytest
import zstandard

from pgolf.corpus import Corpus, corpus_files
from pgolf.errors import InvalidInput
from tests.demo_data import demo_documents, write_demo_corpus


@pytest.fixture(scope="module")
def docs():
    return list(demo_documents())


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"))


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def read_all(*sources, text_field="text"):
    return list(Corpus(list(sources), text_field).documents())


def test_jsonl_yields_every_document_in_order(docs, corpus_file):
    corpus = Corpus([corpus_file])
    assert list(corpus.documents()) == docs
    assert corpus.bytes_read == corpus.total_bytes == corpus_file.stat().st_size
    assert list(corpus.documents()) == docs  # re-readable


def test_zstd_with_a_long_window_needs_and_gets_the_large_window_limit(docs, tmp_path, corpus_file):
    # Like the benchmark corpus: written with a 256 MiB window, which zstandard refuses by default (128 MiB).
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=28)
    path = tmp_path / "docs.jsonl.zst"
    with (
        open(path, "wb") as f,
        zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as writer,
    ):
        writer.write(corpus_file.read_bytes())
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().stream_reader(open(path, "rb")).read()
    corpus = Corpus([path])
    assert list(corpus.documents()) == docs
    assert corpus.bytes_read == path.stat().st_size


def test_corrupt_zstd_names_the_file(docs, tmp_path, corpus_file):
    data = zstandard.ZstdCompressor().compress(corpus_file.read_bytes())
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(data[: len(data) // 2] + bytes(64) + data[len(data) // 2 + 64 :])
    with pytest.raises(InvalidInput, match=r"bad\.jsonl\.zst.*corrupt zstd"):
        read_all(path)


def test_txt_files_directories_and_globs_are_sorted(docs, tmp_path):
    nested = tmp_path / "corpus" / "b"
    nested.mkdir(parents=True)
    (tmp_path / "corpus" / "c.txt").write_text(docs[2])
    (nested / "a.txt").write_text(docs[1])
    write_jsonl(tmp_path / "corpus" / "a.jsonl", docs[3:6])
    (tmp_path / "corpus" / "notes.md").write_text("not a corpus file")
    # Sorted by path: a.jsonl, b/a.txt, c.txt; notes.md is skipped.
    assert read_all(tmp_path / "corpus") == docs[3:6] + [docs[1], docs[2]]
    assert read_all(str(tmp_path / "corpus" / "*.txt")) == [docs[2]]
    assert read_all(str(tmp_path / "corpus" / "**" / "*.txt")) == [docs[1], docs[2]]
    # Several sources keep the order given.
    assert read_all(tmp_path / "corpus" / "c.txt", tmp_path / "corpus" / "a.jsonl") == [docs[2], *docs[3:6]]


def test_text_field_and_blank_lines(docs, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", docs[:3], field="content")
    path.write_text(path.read_text().replace("\n", "\n\n", 1))
    assert read_all(path, text_field="content") == docs[:3]
    with pytest.raises(InvalidInput, match=r"c\.jsonl:1: no 'text' field"):
        read_all(path)


@pytest.mark.parametrize(
    "line, problem",
    [
        (b'{"text": "unterminated', r"bad\.jsonl:3: invalid JSON"),
        (b'["a list"]', r"bad\.jsonl:3: no 'text' field"),
        (b'{"text": 42}', r"bad\.jsonl:3: 'text' is a int, not a string"),
        (b'{"text": "caf\xe9"}', r"bad\.jsonl:3: not valid UTF-8 \(byte 13 of the line\)"),
        (b'{"text": "half \\ud800 a pair"}', r"bad\.jsonl:3: 'text' is not valid UTF-8 \(unpaired surrogate"),
    ],
)
def test_bad_lines_name_file_and_line(docs, tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = write_jsonl(tmp_path / "good.jsonl", docs[:2]).read_bytes()
    path.write_bytes(good + line + b"\n" + good)
    documents = Corpus([path]).documents()
    assert [next(documents), next(documents)] == docs[:2]  # streamed: good lines come before the error
    with pytest.raises(InvalidInput, match=problem):
        next(documents)


def test_non_utf8_txt(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine text then \xff")
    with pytest.raises(InvalidInput, match=r"a\.txt: not valid UTF-8 \(byte 15\)"):
        read_all(tmp_path / "a.txt")


def test_sources_that_name_no_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InvalidInput, match="no such file"):
        corpus_files(tmp_path / "missing.jsonl")
    with pytest.raises(InvalidInput, match="directory holds no"):
        corpus_files(tmp_path / "empty")
    with pytest.raises(InvalidInput, match="not a corpus file"):
        corpus_files(tmp_path / "x.json")
    with pytest.raises(InvalidInput, match="pattern matches no"):
        corpus_files(str(tmp_path / "*.jsonl"))


def test_a_zstd_file_cut_at_a_block_boundary_is_refused_not_read_short(docs, tmp_path):
    """Flushing a block after every document makes block boundaries land between lines; a file cut at one
    decodes cleanly to fewer documents, which only the frame's missing end gives away."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    whole, cut = b"", None
    for index, text in enumerate(docs[:50]):
        whole += compressor.compress((json.dumps({"text": text}) + "\n").encode())
        whole += compressor.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        if index == 29:
            cut = len(whole)
    whole += compressor.flush()
    complete, truncated = tmp_path / "all.jsonl.zst", tmp_path / "cut.jsonl.zst"
    complete.write_bytes(whole)
    truncated.write_bytes(whole[:cut])
    assert read_all(complete) == docs[:50]
    with pytest.raises(InvalidInput, match=r"cut.jsonl.zst: zstd stream is truncated .*after line 30"):
        read_all(truncated)
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    with pytest.raises(InvalidInput, match="zstd stream is empty"):
        read_all(tmp_path / "empty.jsonl.zst")


def test_concatenated_zstd_frames_are_one_corpus(docs, tmp_path):
    frames = b"".join(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in part)
                                                          .encode()) for part in (docs[:3], docs[3:7]))
    (tmp_path / "frames.jsonl.zst").write_bytes(frames)
    assert read_all(tmp_path / "frames.jsonl.zst") == docs[:7]
