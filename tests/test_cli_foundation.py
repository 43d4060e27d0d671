"""`pgolf --help`, `pgolf data check` and `pgolf verify` through a real subprocess: exit codes and one-line errors."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.shards import ShardWriter, write_shard
from tests.shared_data import SP1024, fineweb_docs, need


def pgolf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    sp = load_tokenizer(need(SP1024))
    directory = tmp_path_factory.mktemp("sp1024")
    docs = fineweb_docs()
    for split, texts in (("val", docs[:20]), ("train", docs[20:])):
        writer = ShardWriter(directory, split, shard_tokens=50_000)
        for text in texts:
            writer.write(np.array([1, *sp.encode(text)]))
        writer.close()
    shutil.copy(SP1024, directory / SP1024.name)
    return directory


def test_help_lists_commands_and_exit_codes():
    result = pgolf("--help")
    assert result.returncode == 0 and "data" in result.stdout and "Exit codes" in result.stdout
    assert pgolf("--version").stdout.startswith("pgolf ")
    assert subprocess.run(["pgolf", "--help"], capture_output=True).returncode == 0


def test_data_check_reports_split_counts_and_exact_bytes(shard_dir):
    result = pgolf("data", "check", shard_dir, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    sp = load_tokenizer(SP1024)
    docs = fineweb_docs()
    assert summary["val"]["documents"] == 20 and summary["train"]["documents"] == 180
    assert summary["val"]["tokens"] == sum(1 + len(sp.encode(t)) for t in docs[:20])
    assert summary["train"]["shards"] > 1
    # The bpb denominator equals the UTF-8 bytes of the decoded documents.
    assert summary["val"]["bytes"] == sum(len(sp.decode(sp.encode(t)).encode()) for t in docs[:20])
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


def test_verify_rehashes_a_stage_directory(tmp_path):
    from pgolf.artifacts import StageOutput

    with StageOutput(tmp_path / "stage", "demo") as out:
        out.add_output("x.bin", "blob").write_bytes(b"1234")
        out.finalize()
    ok = pgolf("verify", tmp_path / "stage", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    (tmp_path / "stage" / "x.bin").write_bytes(b"4321")
    bad = pgolf("verify", tmp_path / "stage")
    assert bad.returncode == 3 and "x.bin: sha256 does not match" in bad.stderr
    assert pgolf("verify", tmp_path / "nowhere").returncode == 3


def test_usage_errors_exit_2():
    assert pgolf("data", "check").returncode == 2
    assert pgolf("no-such-command").returncode == 2


def test_long_log_lines_stay_whole_in_a_pipe():
    message = "final_model_sliding_exact val_loss:2.42103129 val_bpb:1.42582866 " + "x" * 150 + " end"
    result = subprocess.run([sys.executable, "-c", f"from pgolf import log; log.info({message!r}); "
                             f"log.warn({message!r})"], capture_output=True, text=True, check=True)
    assert result.stderr.splitlines() == [message, f"warning: {message}"]
