"""Re-running a finished stage: reported "up to date" from its manifest when nothing changed, refused naming what
changed otherwise (config, an input file, an input folder, an output), recomputed with --force."""

import contextlib
import io
import json
import shutil

import pytest

from pgolf.artifacts import read_manifest, verify_outputs
from tests.demo_data import TOKENIZER_NAME
from tests.test_codecs import run_main

RUN_TOML = """
[train]
iterations = 4
val_every = 0
checkpoint_every = 0
warmup_steps = 1
"""


def run(*args) -> tuple[int, str, str]:
    """pgolf in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(*args)
    return code, out.getvalue(), err.getvalue()


def manifest_stamp(directory) -> tuple[int, bytes]:
    path = directory / "manifest.json"
    return path.stat().st_mtime_ns, path.read_bytes()


@pytest.fixture(scope="module")
def chain(tiny_data_dir, tmp_path_factory):
    """Every writing stage run once, in order: {stage: (argv, --json output)} and the run folder."""
    root = tmp_path_factory.mktemp("up_to_date")
    data = root / "data"
    shutil.copytree(tiny_data_dir, data)
    (root / "run.toml").write_text(RUN_TOML)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": f"document {i}: " + "words " * 40}) + "\n"
                                               for i in range(12)))
    commands = {
        "tokenize": ["tokenize", root / "corpus.jsonl", "--tokenizer", data / TOKENIZER_NAME, "--val-docs", 4,
                     "--out", root / "tok"],
        "train": ["train", data, "--preset", "tiny", "--config", root / "run.toml", "--out", root / "train"],
        "quantize": ["quantize", root / "train", "--plan", "int6", "--out", root / "q"],
        "compress": ["compress", root / "q", "--codec", "lzma", "--shuffle", "on", "--bitpack", "off",
                     "--out", root / "blob"],
        "eval": ["eval", root / "blob", "--data", data, "--out", root / "eval"],
        "bundle": ["bundle", "--train", root / "train", "--blob", root / "blob", "--eval", root / "eval",
                   "--name", "x", "--github-id", "y", "--out", root / "submission"],
        "report": ["report", root / "eval", "--reference", 9.0, "--out", root / "report"],
    }
    first = {}
    for stage, argv in commands.items():
        code, out, err = run(*argv, "--json")
        assert code == 0, (stage, err[-2000:])
        first[stage] = (argv, json.loads(out))
    return root, first


def test_a_rerun_of_each_stage_is_up_to_date_prints_the_same_result_and_writes_nothing(chain):
    root, first = chain
    for stage, (argv, result) in first.items():
        out = argv[argv.index("--out") + 1]
        before = manifest_stamp(out)
        code, stdout, err = run(*argv, "--json")
        manifest = read_manifest(out)
        assert code == 0, (stage, err)
        assert f"{out}: up to date ({stage}, made {manifest['created']})" in err, stage
        assert json.loads(stdout) == result, stage
        assert manifest_stamp(out) == before, stage
        assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == [], stage


def test_a_changed_setting_is_refused_naming_the_field(chain):
    root, first = chain
    code, _, err = run(*first["train"][0], "--iterations", 5)
    assert code == 3 and "not up to date (config differs: train.iterations 4 -> 5)" in err
    assert "pass --force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run("quantize", root / "train", "--plan", "int8", "--out", root / "q")
    assert code == 3 and "plan \"int6\" -> \"int8\"" in err


def test_a_changed_input_file_is_refused_naming_it(chain, tmp_path):
    root, first = chain
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(root / "corpus.jsonl", corpus)
    argv = ["tokenize", corpus, "--tokenizer", root / "data" / TOKENIZER_NAME, "--val-docs", 4, "--out",
            tmp_path / "tok"]
    assert run(*argv)[0] == 0
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    code, _, err = run(*argv)
    assert code == 3 and f"input {corpus.resolve()} changed since it was made" in err


def test_the_same_files_in_another_folder_are_another_input(chain, tmp_path):
    root, first = chain
    other = tmp_path / "q"
    shutil.copytree(root / "q", other)  # the very same bytes, under the same name, elsewhere
    before = manifest_stamp(root / "blob")
    argv = first["compress"][0]
    code, _, err = run("compress", other, *argv[2:])
    assert code == 3 and f"made from {(root / 'q').resolve()}" in err and "not under this run's inputs" in err
    assert manifest_stamp(root / "blob") == before


def test_an_input_the_output_was_not_made_from_is_noticed(chain):
    root, _ = chain
    code, _, err = run("quantize", root / "train", "--plan", "int6", "--data", root / "data", "--out", root / "q")
    assert code == 3 and f"input {(root / 'data').resolve()} is new" in err


def test_a_tampered_output_is_refused_and_force_recomputes_it(chain, tmp_path):
    root, first = chain
    argv = first["compress"][0]
    blob_dir = tmp_path / "blob"
    assert run(*argv[:-1], blob_dir)[0] == 0
    blob = blob_dir / "model.blob"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    code, _, err = run(*argv[:-1], blob_dir)
    assert code == 3 and f"output {blob}: sha256 does not match the manifest" in err and "--force" in err
    code, stdout, err = run(*argv[:-1], blob_dir, "--force", "--json")
    assert code == 0 and "up to date" not in err
    assert all(row["ok"] for row in verify_outputs(blob_dir))
    assert json.loads(stdout)["bytes"] == first["compress"][1]["bytes"]


def test_force_recomputes_an_up_to_date_output(chain, tmp_path):
    _, first = chain
    argv = [*first["eval"][0][:-1], tmp_path / "eval"]
    assert run(*argv)[0] == 0
    before = manifest_stamp(tmp_path / "eval")
    code, stdout, err = run(*argv, "--force", "--json")
    assert code == 0 and "up to date" not in err and manifest_stamp(tmp_path / "eval") != before
    assert json.loads(stdout)["val_bpb"] == first["eval"][1]["val_bpb"]


def test_resume_of_a_finished_run_is_up_to_date_only_when_it_matches(chain):
    root, first = chain
    argv = first["train"][0]
    before = manifest_stamp(root / "train")
    code, _, err = run(*argv, "--resume")
    assert code == 0 and f"{root / 'train'}: up to date (train, made " in err
    code, _, err = run(*argv, "--resume", "--seed", 7)
    assert code == 3 and "config differs: train.seed 1337 -> 7" in err
    assert manifest_stamp(root / "train") == before
