"""pgolf.data (`pgolf data check`) through a real subprocess: split counts and exact bytes, and the first bad
shard named."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.shards import ShardWriter, write_shard
from tests.demo_data import TOKENIZER_NAME, demo_documents, write_demo_tokenizer


def pgolf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True, cwd=cwd)


VAL = 20  # documents in shard_dir's val split


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """A manifest-less shard directory of the demo corpus (several train shards) with its tokenizer."""
    directory = tmp_path_factory.mktemp("sp1024")
    sp = load_tokenizer(write_demo_tokenizer(directory))
    docs = demo_documents()
    for split, texts in (("val", docs[:VAL]), ("train", docs[VAL:])):
        writer = ShardWriter(directory, split, shard_tokens=50_000)
        for text in texts:
            writer.write(np.array([1, *sp.encode(text)]))
        writer.close()
    return directory


def test_data_check_reports_split_counts_and_exact_bytes(shard_dir):
    result = pgolf("data", "check", shard_dir, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    sp = load_tokenizer(shard_dir / TOKENIZER_NAME)
    docs = demo_documents()
    assert summary["val"]["documents"] == VAL and summary["train"]["documents"] == len(docs) - VAL
    assert summary["val"]["tokens"] == sum(1 + len(sp.encode(t)) for t in docs[:VAL])
    assert summary["train"]["shards"] > 1
    # The bpb denominator equals the UTF-8 bytes of the decoded documents.
    assert summary["val"]["bytes"] == sum(len(sp.decode(sp.encode(t)).encode()) for t in docs[:VAL])
    assert build_byte_tables(sp).size == 1024


def test_data_check_names_the_first_bad_shard(shard_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    victim = sorted(bad.glob("fineweb_train_*.bin"))[1]
    victim.write_bytes(victim.read_bytes()[:-1])
    result = pgolf("data", "check", bad)
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0 and str(victim) in result.stderr and "size" in result.stderr


def test_data_check_rejects_token_ids_beyond_the_vocab(shard_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    write_shard(bad / "fineweb_val_000000.bin", np.array([1, 5, 1024, 7]))
    result = pgolf("data", "check", bad)
    assert result.returncode == 3 and "token 1024 at position 2 >= tokenizer vocab 1024" in result.stderr


def test_data_check_refuses_an_empty_shard(shard_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shard_dir, bad)
    empty = bad / f"fineweb_train_{len(list(bad.glob('fineweb_train_*.bin'))):06d}.bin"
    write_shard(empty, np.zeros(0, dtype=np.uint16))
    result = pgolf("data", "check", bad)
    assert result.returncode == 3 and result.stderr.strip() == f"error: {empty}: holds 0 tokens (an empty " \
        "shard; remove it or re-run tokenize)"
