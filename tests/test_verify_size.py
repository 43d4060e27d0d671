"""`pgolf verify-size`: exact counted bytes, exit 4 over the cap, the thin-margin warning, and refusals."""

import json

import pytest

from pgolf.artifacts import StageOutput, atomic_write_bytes
from pgolf.codecs import pack_blob
from tests.test_codecs import run_cli, tiny_quantized_state


def write_stage(out, stage, files: dict[str, tuple[str, bytes]]):
    """A stage directory holding `files` (name -> (role, bytes)) and its manifest."""
    with StageOutput(out, stage, argv=["test"]) as output:
        for name, (role, data) in files.items():
            atomic_write_bytes(output.add_output(name, role), data)
        output.finalize()
    return out


@pytest.fixture(scope="module")
def blob_bytes():
    return pack_blob(*tiny_quantized_state(), "zstd", shuffle=True, bitpack=False)


@pytest.fixture(scope="module")
def blob_dir(blob_bytes, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "blob"
    return write_stage(out, "compress", {"model.blob": ("blob", blob_bytes)})


@pytest.fixture(scope="module")
def code_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("code") / "train_gpt.py"
    path.write_text("print('hello!')\n" * 100)  # 1,600 bytes
    return path


def test_counts_blob_plus_code(blob_dir, blob_bytes, code_file, capsys):
    result = run_cli(capsys, "verify-size", blob_dir, "--code", code_file, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    total = len(blob_bytes) + code_file.stat().st_size
    assert summary["blob_bytes"] == len(blob_bytes) and summary["code_bytes"] == 1600
    assert summary["total_bytes"] == total and summary["margin"] == 16_000_000 - total and summary["ok"]
    assert f"{total:,}" in result.stderr and "warning" not in result.stderr


def test_over_the_cap_exits_4(blob_dir, blob_bytes, code_file, capsys):
    total = len(blob_bytes) + 1600
    result = run_cli(capsys, "verify-size", blob_dir, "--code", code_file, "--cap", total - 1)
    assert result.returncode == 4
    assert f"exceed the {total - 1:,}-byte cap by 1" in result.stderr
    assert run_cli(capsys, "verify-size", blob_dir, "--code", code_file, "--cap", total).returncode == 0


def test_thin_margin_warns(blob_dir, blob_bytes, code_file, capsys):
    total = len(blob_bytes) + 1600
    near = run_cli(capsys, "verify-size", blob_dir, "--code", code_file, "--cap", total + 9_999)
    assert near.returncode == 0 and "margin 9,999 B is under 10,000 B" in near.stderr
    clear = run_cli(capsys, "verify-size", blob_dir, "--code", code_file, "--cap", total + 10_000)
    assert clear.returncode == 0 and "warning" not in clear.stderr


def test_code_must_be_accounted_for(blob_dir, capsys):
    missing = run_cli(capsys, "verify-size", blob_dir)
    assert missing.returncode == 2 and "--blob-only" in missing.stderr
    blob_only = run_cli(capsys, "verify-size", blob_dir, "--blob-only", "--json")
    assert blob_only.returncode == 0 and "code bytes are not counted" in blob_only.stderr
    assert json.loads(blob_only.stdout)["code_bytes"] == 0


def test_bundle_dir_counts_its_own_code(blob_dir, blob_bytes, tmp_path, capsys):
    code = b"import torch\n" * 50
    bundle = write_stage(tmp_path / "bundle", "bundle",
                         {"train_gpt.py": ("code", code), "final_model.blob": ("blob", blob_bytes)})
    for args in ((bundle,), (blob_dir, "--bundle", bundle)):
        result = run_cli(capsys, "verify-size", *args, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["total_bytes"] == len(blob_bytes) + len(code)
    other_blob = blob_bytes[:-1] + b"\0"
    other = write_stage(tmp_path / "other", "bundle",
                        {"train_gpt.py": ("code", code), "final_model.blob": ("blob", other_blob)})
    mismatch = run_cli(capsys, "verify-size", blob_dir, "--bundle", other)
    assert mismatch.returncode == 3 and "ships a different blob" in mismatch.stderr


def test_damaged_or_foreign_blobs_exit_3(blob_dir, blob_bytes, code_file, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for path in blob_dir.iterdir():
        (tampered / path.name).write_bytes(path.read_bytes())
    (tampered / "model.blob").write_bytes(blob_bytes[:100] + bytes([blob_bytes[100] ^ 1]) + blob_bytes[101:])
    result = run_cli(capsys, "verify-size", tampered, "--code", code_file)
    assert result.returncode == 3 and "model.blob: sha256 does not match" in result.stderr

    foreign = write_stage(tmp_path / "foreign", "compress", {"model.blob": ("blob", b"\x78\xda" + bytes(64))})
    result = run_cli(capsys, "verify-size", foreign, "--code", code_file)
    assert result.returncode == 3 and "model.blob: not a pgolf blob" in result.stderr

    truncated = write_stage(tmp_path / "truncated", "compress", {"model.blob": ("blob", blob_bytes[:-10])})
    result = run_cli(capsys, "verify-size", truncated, "--code", code_file)
    assert result.returncode == 3 and "model.blob: blob truncated" in result.stderr
