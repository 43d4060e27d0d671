"""pgolf.cli through a real subprocess: help, usage errors, `pgolf verify`, log lines, and for every stage a full
disk as one line (exit 3) and --force never deleting what it did not make."""

import json
import resource
import subprocess
import sys

import pytest

from tests.demo_data import TOKENIZER_NAME, demo_documents, write_demo_corpus


def pgolf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_help_lists_commands_and_exit_codes():
    result = pgolf("--help")
    assert result.returncode == 0 and "data" in result.stdout and "Exit codes" in result.stdout
    assert pgolf("--version").stdout.startswith("pgolf ")
    assert subprocess.run(["pgolf", "--help"], capture_output=True).returncode == 0


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


# ---- a full disk, in every stage: one line naming the file, exit 3, nothing left that looks like an output ----
def limited_file_size(limit_bytes: int):
    """A real write failure without root: files cannot grow past `limit_bytes` (EFBIG, like a full disk)."""
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.fixture(scope="module")
def chain(tiny_data_dir, tmp_path_factory):
    """train -> quantize -> compress -> eval outputs of a few tiny steps, each stage's input for the next."""
    root = tmp_path_factory.mktemp("chain")
    write_demo_corpus(root, demo_documents()[:60])
    for args in (("train", tiny_data_dir, "--preset", "tiny", "--iterations", 4, "--out", root / "train"),
                 ("quantize", root / "train", "--plan", "int6", "--keep-float-numel", "1024", "--out",
                  root / "q"),
                 ("compress", root / "q", "--codec", "zlib", "--out", root / "blob"),
                 ("eval", root / "blob", "--data", tiny_data_dir, "--out", root / "eval")):
        assert pgolf(*args).returncode == 0, args
    return root


def stage_commands(data, chain, out):
    train = chain / "train"
    return {
        "tokenize": ["tokenize", chain / "docs.jsonl", "--tokenizer", data / TOKENIZER_NAME, "--val-docs", 10,
                     "--out", out],
        "train": ["train", data, "--preset", "tiny", "--iterations", 2, "--out", out],
        "quantize": ["quantize", train, "--plan", "int6", "--out", out],
        "compress": ["compress", chain / "q", "--codec", "zlib", "--out", out],
        "eval": ["eval", chain / "blob", "--data", data, "--out", out],
        "bundle": ["bundle", "--train", train, "--blob", chain / "blob", "--name", "x", "--github-id", "y",
                   "--out", out],
        "report": ["report", chain / "eval", "--out", out],
    }


@pytest.mark.parametrize("stage", ["tokenize", "train", "quantize", "compress", "eval", "bundle", "report"])
def test_a_full_disk_is_one_line_naming_the_file(stage, tiny_data_dir, chain, tmp_path):
    out = tmp_path / "out"
    command = stage_commands(tiny_data_dir, chain, out)[stage]
    # 64 bytes: the lock file's pid fits, every output does not (train's model, eval's results.json, ...).
    result = subprocess.run([sys.executable, "-m", "pgolf", *map(str, command)], capture_output=True, text=True,
                            preexec_fn=limited_file_size(64))
    assert result.returncode == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "cannot write (File too large)" in last and str(tmp_path) in last
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / ".out.lock").exists()
    # Only train keeps its staging directory (what --resume continues from); every other stage removes it.
    assert (tmp_path / ".out.partial").exists() == (stage == "train")


def tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["cwd", "own input", "data dir", "ancestor of input"])
def test_force_never_deletes_what_the_issue_saw_deleted(case, chain, tiny_data_dir, tmp_path):
    """Each of these used to be emptied by --force (exit 0 or a traceback)."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    commands = {
        "cwd": (["compress", chain / "q", "--out", ".", "--force"], work, "is the current directory"),
        "own input": (["compress", chain / "q", "--out", chain / "q", "--force"], chain / "q", "is an input"),
        "data dir": (["eval", chain / "blob", "--data", tiny_data_dir, "--out", tiny_data_dir, "--force"],
                     tiny_data_dir, "is an input"),
        "ancestor of input": (["compress", chain / "q", "--out", chain, "--force"], chain, "holds an input"),
    }
    args, watched, message = commands[case]
    before = tree(watched)
    result = subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True,
                            cwd=work)
    assert result.returncode == 3 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert tree(watched) == before
