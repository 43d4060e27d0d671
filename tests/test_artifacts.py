import json

import pytest

from pgolf.artifacts import StageOutput, open_stage, output_path, read_manifest, sha256_file, verify_outputs
from pgolf.errors import InvalidInput


def make_stage(tmp_path, name="out", **kwargs):
    with StageOutput(tmp_path / name, "demo", argv=["pgolf", "demo"], config={"a": 1}, **kwargs) as out:
        out.add_output("weights.bin", "blob").write_bytes(b"\x00\x01" * 100)
        out.metrics["answer"] = 42
        out.check("sane", True)
        out.finalize()
    return tmp_path / name


def test_manifest_records_everything_design_asks_for(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("hello")
    with StageOutput(tmp_path / "out", "demo", argv=["x"], config={"k": "v"}) as out:
        out.add_input(source, "corpus")
        out.add_output("a.bin", "blob").write_bytes(b"abc")
        manifest = out.finalize()
    on_disk = read_manifest(tmp_path / "out")
    assert on_disk == json.loads(json.dumps(manifest, default=str))
    for key in ("schema", "stage", "pgolf_version", "git_commit", "argv", "config", "config_sha256", "inputs",
                "outputs", "environment", "metrics", "checks"):
        assert key in on_disk
    assert on_disk["inputs"][0]["sha256"] == sha256_file(source) and on_disk["inputs"][0]["bytes"] == 5
    assert on_disk["outputs"] == [{"path": "a.bin", "role": "blob", "sha256": sha256_file(tmp_path / "out/a.bin"),
                                   "bytes": 3}]
    assert output_path(on_disk, tmp_path / "out", "blob") == tmp_path / "out" / "a.bin"


def test_existing_output_needs_force(tmp_path):
    out = make_stage(tmp_path)
    with pytest.raises(InvalidInput, match="already exists.*--force"):
        StageOutput(out, "demo")
    make_stage(tmp_path, force=True)
    assert open_stage(out, "demo")["metrics"]["answer"] == 42


def test_a_crash_leaves_nothing_that_looks_complete(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with StageOutput(tmp_path / "out", "demo") as out:
            out.add_output("half.bin", "blob").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_tampered_output_is_refused_naming_the_file(tmp_path):
    out = make_stage(tmp_path)
    (out / "weights.bin").write_bytes(b"\x00\x02" * 100)
    with pytest.raises(InvalidInput, match="weights.bin: sha256"):
        open_stage(out)
    (out / "weights.bin").write_bytes(b"short")
    assert verify_outputs(out)[0]["problem"].startswith("size")
    (out / "weights.bin").unlink()
    with pytest.raises(InvalidInput, match="weights.bin: missing"):
        open_stage(out)


def test_wrong_stage_and_missing_manifest(tmp_path):
    out = make_stage(tmp_path)
    with pytest.raises(InvalidInput, match="expected 'train'"):
        open_stage(out, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no manifest.json"):
        open_stage(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidInput, match="not valid JSON"):
        read_manifest(tmp_path / "empty")
