"""`pgolf tokenize` on real FineWeb documents and the shared SentencePiece models: shards hold exactly
[BOS] + sp.encode(text) per document, validation first; manifest metrics are exact; bad input exits 3 leaving
nothing behind; Ctrl-C leaves no shard that looks complete."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

from pgolf import cli
from pgolf.artifacts import read_manifest, sha256_file
from pgolf.bpb import build_byte_tables, tokenizer_problems
from pgolf.shards import HEADER_BYTES, list_shards, load_shard, load_split
from pgolf.tokenizer import CHALLENGE_TRAINER_SETTINGS, DocumentEncoder, train_tokenizer
from tests.demo_data import demo_documents, write_demo_corpus, write_demo_tokenizer
from tests.shared_data import BENCH, DOCS200, SP1024, SP8192, fineweb_docs, need


@pytest.fixture(scope="module")
def docs():
    """The demo corpus (tests/demo_data.py): what the tokenize stage's mechanics are tested on."""
    return list(demo_documents())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def sp1024(tmp_path_factory):
    return write_demo_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def fineweb():
    """Real FineWeb documents, for the checks of the challenge's own tokenizers."""
    return fineweb_docs()


def pgolf(capsys, *args) -> tuple[int, str, str]:
    """Run the `pgolf` command in this process; returns (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["pgolf", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err


def expected_tokens(sp, texts) -> np.ndarray:
    return np.array([t for text in texts for t in (1, *sp.encode(text))], dtype=np.uint16)


def assert_refused(code, err, out_dir, message):
    """Exit 3, one line on stderr naming the problem, and no output or staging directory left."""
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.partial*"))


@pytest.mark.parametrize("model, workers", [(SP1024, 2), (SP8192, 1)])
def test_shards_hold_bos_plus_sp_encode_val_first(capsys, tmp_path, fineweb, model, workers):
    sp = spm.SentencePieceProcessor(model_file=str(need(model)))
    out = tmp_path / "out"
    code, stdout, err = pgolf(
        capsys,
        "tokenize",
        DOCS200,
        "--tokenizer",
        model,
        "--val-docs",
        30,
        "--shard-tokens",
        100_000,
        "--workers",
        workers,
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    for split, texts in (("val", fineweb[:30]), ("train", fineweb[30:])):
        shards = list_shards(out, split)
        assert [s.name for s in shards] == [f"fineweb_{split}_{i:06d}.bin" for i in range(len(shards))]
        assert (
            all(len(load_shard(s)) == 100_000 for s in shards[:-1]) and len(load_shard(shards[-1])) <= 100_000
        )
        tokens = load_split(shards)
        assert np.array_equal(tokens, expected_tokens(sp, texts))
        assert np.count_nonzero(tokens == 1) == len(texts)
    assert len(list_shards(out, "train")) > 1

    manifest = read_manifest(out)
    metrics = manifest["metrics"]
    assert json.loads(stdout) == metrics
    tables = build_byte_tables(sp)
    for split, texts in (("val", fineweb[:30]), ("train", fineweb[30:])):
        tokens = load_split(list_shards(out, split))
        assert metrics[split] == {
            "documents": len(texts),
            "tokens": len(tokens),
            "bytes": tables.count_bytes(tokens),
            "text_bytes": sum(len(t.encode()) for t in texts),
        }
    total_tokens = metrics["val"]["tokens"] + metrics["train"]["tokens"]
    assert metrics["tokens_per_byte"] == pytest.approx(
        total_tokens / sum(len(t.encode()) for t in fineweb), abs=1e-6
    )
    assert metrics["vocab_size"] == sp.GetPieceSize()
    assert metrics["tokenizer_sha256"] == sha256_file(model)
    tokenizer_file = out / f"fineweb_{sp.GetPieceSize()}_bpe.model"
    assert tokenizer_file.read_bytes() == model.read_bytes()
    roles = {o["path"]: o["role"] for o in manifest["outputs"]}
    assert roles[tokenizer_file.name] == "tokenizer"
    assert {r for p, r in roles.items() if p.startswith("fineweb_val_")} == {"val_shard"}
    assert {r for p, r in roles.items() if p.startswith("fineweb_train_")} == {"train_shard"}
    assert {i["role"] for i in manifest["inputs"]} == {"corpus", "tokenizer"}
    assert pgolf(capsys, "data", "check", out)[0] == 0


def test_word_cache_encoder_is_exact_even_when_full(fineweb):
    sp = spm.SentencePieceProcessor(model_file=str(need(SP1024)))
    reference = expected_tokens(sp, fineweb)
    for cache_size in (1 << 20, 2000):  # 2000 words: full after the first batch, later new words are not kept
        encoder = DocumentEncoder(SP1024.read_bytes(), cache_size=cache_size)
        assert encoder.words_separable
        batches = [encoder.encode(fineweb[i : i + 17]) for i in range(0, len(fineweb), 17)]
        assert np.array_equal(np.concatenate([b.tokens for b in batches]), reference)
        assert (
            encoder.cached_words == min(cache_size, len(encoder.ids_length)) and encoder.cached_words >= 2000
        )


def test_word_cache_encoder_on_odd_documents():
    sp = spm.SentencePieceProcessor(model_file=str(need(SP8192)))
    texts = [
        "",
        "  leading and  inner   spaces ",
        "\n\t\n",
        "a",
        "",
        "literal \u2581 piece mark\u2581",
        "NUL\x00byte",
        "e\u0301 combining, \ufb01 ligature, \u3000wide space",
        "\u4e2d\u6587 and emoji \U0001f600",
        "12345 67",
        "",
    ]
    encoder = DocumentEncoder(SP8192.read_bytes())
    for _ in range(2):  # learning, then from the cache
        assert np.array_equal(encoder.encode(texts).tokens, expected_tokens(sp, texts))


def test_hash_collisions_cost_speed_not_correctness(fineweb):
    sp = spm.SentencePieceProcessor(model_file=str(need(SP1024)))
    encoder = DocumentEncoder(SP1024.read_bytes())
    encoder.hash_words = lambda data, starts, ends: np.zeros(
        len(starts), dtype=np.uint64
    )  # every word collides
    for i in range(0, 40, 20):
        assert np.array_equal(encoder.encode(fineweb[i : i + 20]).tokens, expected_tokens(sp, fineweb[i : i + 20]))


@pytest.mark.parametrize(
    "setting",
    [{"split_by_whitespace": False}, {"model_type": "unigram"}],  # pieces span '▁'; unigram isn't per-word
)
def test_models_not_encodable_word_by_word_fall_back_to_plain_encoding(docs, setting):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_writer=model,
        vocab_size=1000,
        minloglevel=2,
        **{**CHALLENGE_TRAINER_SETTINGS, **setting},
    )
    encoder = DocumentEncoder(model.getvalue())
    assert not encoder.words_separable
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert np.array_equal(encoder.encode(docs).tokens, expected_tokens(sp, docs))


def test_trains_challenge_tokenizer_on_train_split_only(capsys, tmp_path, docs, corpus):
    out = tmp_path / "sp512"
    code, _, err = pgolf(
        capsys, "tokenize", corpus, "--vocab-size", 512, "--val-docs", 20, "--train-docs", 150, "--out", out
    )
    assert code == 0, err
    sp = spm.SentencePieceProcessor(model_file=str(out / "fineweb_512_bpe.model"))
    assert sp.GetPieceSize() == 512 and tokenizer_problems(sp) == []
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sum(sp.IsByte(i) for i in range(512)) == 256  # byte fallback
    assert sp.encode("\u4e01", out_type=str) == ["<0xE4>", "<0xB8>", "<0x81>"]  # an unseen character
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # split_digits
    assert not sp.encode("the", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.normalize("\ufb01ne") == "fine"  # nmt_nfkc
    # Trained on documents 20..169 only: the validation documents stay unseen.
    direct = spm.SentencePieceProcessor(model_proto=train_tokenizer(docs[20:170], 512))
    assert [sp.IdToPiece(i) for i in range(512)] == [direct.IdToPiece(i) for i in range(512)]
    manifest = read_manifest(out)
    assert manifest["metrics"]["val"]["documents"] == 20 and manifest["metrics"]["vocab_size"] == 512
    assert manifest["inputs"][0]["role"] == "corpus" and len(manifest["inputs"]) == 1


def test_settings_from_env_and_contradictions(capsys, tmp_path, monkeypatch, corpus, sp1024):
    monkeypatch.setenv("PGOLF_VAL_DOCS", "7")
    code, stdout, err = pgolf(
        capsys, "tokenize", corpus, "--tokenizer", sp1024, "--out", tmp_path / "a", "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["val"]["documents"] == 7
    code, _, err = pgolf(
        capsys, "tokenize", corpus, "--tokenizer", sp1024, "--vocab-size", 8192, "--out", tmp_path / "b"
    )
    assert code == 2 and "contradicts --tokenizer" in err
    assert not (tmp_path / "b").exists()


def write_corpus(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def good_lines(corpus):
    return corpus.read_bytes().splitlines()


@pytest.mark.parametrize(
    "bad_line, message",
    [
        (b'{"text": "no closing quote}', "bad.jsonl:181: invalid JSON"),
        (b'{"body": "text under another name"}', "bad.jsonl:181: no 'text' field"),
        (b'{"text": "Latin-1 caf\xe9"}', "bad.jsonl:181: not valid UTF-8"),
    ],
)
def test_bad_lines_exit_3_leaving_no_shards(capsys, tmp_path, good_lines, bad_line, message, corpus, sp1024):
    # Line 181 comes after several complete shards have been written (one process, 5,000-token shards).
    corpus = write_corpus(tmp_path / "bad.jsonl", good_lines[:180] + [bad_line] + good_lines[180:])
    out = tmp_path / "out"
    code, _, err = pgolf(
        capsys,
        "tokenize",
        corpus,
        "--tokenizer",
        sp1024,
        "--val-docs",
        10,
        "--shard-tokens",
        5000,
        "--workers",
        1,
        "--out",
        out,
    )
    assert_refused(code, err, out, message)


def test_bad_line_while_training_exits_3(capsys, tmp_path, good_lines):
    corpus = write_corpus(tmp_path / "bad.jsonl", good_lines[:50] + [b"not json"])
    out = tmp_path / "out"
    code, _, err = pgolf(capsys, "tokenize", corpus, "--vocab-size", 512, "--val-docs", 10, "--out", out)
    assert_refused(code, err, out, "bad.jsonl:51: invalid JSON")


@pytest.mark.parametrize("train", [False, True])
def test_empty_corpus_exits_3(capsys, tmp_path, train, corpus, sp1024):
    corpus = write_corpus(tmp_path / "empty.jsonl", [])
    model = ["--vocab-size", 512] if train else ["--tokenizer", sp1024]
    out = tmp_path / "out"
    code, _, err = pgolf(capsys, "tokenize", corpus, *model, "--out", out)
    assert_refused(code, err, out, "empty corpus")


@pytest.mark.parametrize(
    "vocab, message",
    [
        (70_000, "does not fit uint16 shards"),
        (200, "too small for byte fallback"),
        (300, "too small for this corpus"),  # the demo corpus's characters need 342 pieces
    ],
)
def test_vocab_sizes_the_format_or_corpus_cannot_hold(capsys, tmp_path, vocab, message, corpus):
    out = tmp_path / "out"
    code, _, err = pgolf(
        capsys, "tokenize", corpus, "--vocab-size", vocab, "--val-docs", 10, "--out", out
    )
    assert_refused(code, err, out, message)


def test_existing_output_needs_force_and_force_never_deletes_foreign_files(capsys, tmp_path, corpus, sp1024):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    for flags in ((), ("--force",)):
        code, _, err = pgolf(capsys, "tokenize", corpus, "--tokenizer", sp1024, "--val-docs", 5,
                             "--out", out, *flags)
        assert code == 3 and "not a pgolf stage output" in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "earlier results"
    (out / "keep.txt").unlink()
    out.rmdir()
    assert pgolf(capsys, "tokenize", corpus, "--tokenizer", sp1024, "--val-docs", 4, "--out", out)[0] == 0
    code, _, err = pgolf(capsys, "tokenize", corpus, "--tokenizer", sp1024, "--val-docs", 5, "--out", out)
    assert code == 3 and "already exists and is not up to date (config differs: val_docs 4 -> 5); pass --force" in err
    code, _, err = pgolf(
        capsys, "tokenize", corpus, "--tokenizer", sp1024, "--val-docs", 5, "--out", out, "--force"
    )
    assert code == 0, err
    assert read_manifest(out)["metrics"]["val"]["documents"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, lock or aside left


def test_tokenizer_unfit_for_bpb_needs_force(capsys, tmp_path, docs, corpus):
    model = io.BytesIO()
    settings = {**CHALLENGE_TRAINER_SETTINGS, "byte_fallback": False}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs), model_writer=model, vocab_size=500, minloglevel=2, **settings
    )
    path = tmp_path / "no_bytes.model"
    path.write_bytes(model.getvalue())
    out = tmp_path / "out"
    code, _, err = pgolf(capsys, "tokenize", corpus, "--tokenizer", path, "--out", out)
    assert_refused(code, err, out, "no byte fallback")
    code, _, err = pgolf(capsys, "tokenize", corpus, "--tokenizer", path, "--out", out, "--force")
    assert code == 0 and "no byte fallback" in err
    assert read_manifest(out)["checks"][0] == {
        "name": "tokenizer_fit_for_bpb",
        "ok": False,
        "detail": "no byte fallback (0 of 256 <0xNN> pieces)",
    }
    not_a_model = tmp_path / "junk.model"
    not_a_model.write_bytes(b"junk")
    code, _, err = pgolf(capsys, "tokenize", corpus, "--tokenizer", not_a_model, "--out", tmp_path / "o2")
    assert_refused(code, err, tmp_path / "o2", "not a SentencePiece model")


def terminal_signal_state() -> None:
    """In the child before exec: SIGINT handled by default and not blocked, as under a terminal. A child inherits
    an ignored or blocked SIGINT from its parent; in the full suite the test worker's state made the child
    finish despite the Ctrl-C (exit 0), though this test alone passed."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_no_complete_looking_shard(tmp_path):
    out = tmp_path / "out"
    staging = tmp_path / ".out.partial"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgolf",
            "tokenize",
            need(BENCH),
            "--tokenizer",
            need(SP1024),
            "--val-docs",
            "10000",
            "--shard-tokens",
            "200000",
            "--workers",
            "2",
            "--out",
            out,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=terminal_signal_state,
    )
    deadline = time.monotonic() + 120
    while not list(staging.glob("fineweb_val_*.bin")):  # wait until complete shards sit in the staging dir
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the whole process group
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0, err.decode()[-2000:]
    assert b"Traceback" not in err
    assert not out.exists() and not staging.exists()
    for path in tmp_path.rglob("*"):
        assert not (path.is_file() and path.stat().st_size > HEADER_BYTES), f"{path} left behind"
    with pytest.raises(ProcessLookupError):  # no worker outlives the command
        for _ in range(50):
            os.killpg(process.pid, 0)
            time.sleep(0.1)


@pytest.mark.slow
def test_benchmark_corpus_counts_match_the_readme(capsys, tmp_path):
    out = tmp_path / "bench"
    code, stdout, err = pgolf(
        capsys,
        "tokenize",
        need(BENCH),
        "--tokenizer",
        need(SP1024),
        "--val-docs",
        10_000,
        "--out",
        out,
        "--json",
    )
    assert code == 0, err
    metrics = json.loads(stdout)
    assert metrics["val"] == {
        "documents": 10_000,
        "tokens": 5_153_041,
        "text_bytes": 12_636_391,
        "bytes": 12_623_248,
    }
    assert metrics["train"]["documents"] == 82_967 and metrics["train"]["tokens"] == 46_039_912
    tables = build_byte_tables(spm.SentencePieceProcessor(model_file=str(SP1024)))
    assert tables.count_bytes(load_split(list_shards(out, "val"))) == 12_623_248
    assert pgolf(capsys, "data", "check", out)[0] == 0


@pytest.mark.parametrize("val_docs, warning", [
    (None, "the train split is empty: all {documents:,} documents went to validation (--val-docs 50,000)"),
    (0, "the validation split is empty (--val-docs 0); nothing here can be scored"),
])
def test_an_empty_split_is_warned_about(capsys, tmp_path, val_docs, warning, docs, corpus, sp1024):
    flags = [] if val_docs is None else ["--val-docs", val_docs]
    code, _, err = pgolf(capsys, "tokenize", corpus, "--tokenizer", sp1024, *flags,
                         "--out", tmp_path / "out")
    warning = warning.format(documents=len(docs))
    assert code == 0 and f"warning: {tmp_path / 'out'}: {warning}" in " ".join(err.split())
