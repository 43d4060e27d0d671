import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from pgolf.artifacts import (
    StageOutput,
    open_stage,
    output_path,
    read_manifest,
    safetensors_bytes,
    sha256_file,
    upstream,
    verify_outputs,
)
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


# ---- what --force may replace, and how ----------------------------------------------------------------------
def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_force_replaces_an_earlier_output_of_the_same_stage_and_leaves_nothing_beside_it(tmp_path):
    out = make_stage(tmp_path)
    with StageOutput(out, "demo", argv=["again"], force=True) as stage:
        stage.add_output("new.bin", "blob").write_bytes(b"new")
        stage.finalize()
    assert listing(out) == ["manifest.json", "new.bin"] and open_stage(out, "demo")["argv"] == ["again"]
    assert listing(tmp_path) == ["out"]  # no staging directory, lock file or replaced copy left


@pytest.mark.parametrize("case", ["cwd", "ancestor_of_cwd", "root", "input", "inside_input", "holds_input"])
def test_force_never_replaces_the_cwd_an_input_or_their_relatives(tmp_path, monkeypatch, case):
    out = make_stage(tmp_path / "runs")
    source = out / "weights.bin"
    target, inputs = out, []
    if case == "cwd":
        monkeypatch.chdir(out)
    elif case == "ancestor_of_cwd":
        (out / "sub").mkdir()  # (also an unlisted entry, but the cwd rule speaks first)
        monkeypatch.chdir(out / "sub")
        target = tmp_path / "runs" / "out"
    elif case == "root":
        target = Path("/")
    elif case == "input":
        inputs = [out]
    elif case == "inside_input":
        inputs = [tmp_path / "runs"]
    else:
        inputs = [source]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    expected = {"cwd": "is the current directory", "ancestor_of_cwd": "an ancestor of the current directory",
                "root": "filesystem root", "input": "is an input of this run",
                "inside_input": "is inside an input of this run", "holds_input": "holds an input of this run"}
    with pytest.raises(InvalidInput, match=expected[case]):
        StageOutput(target, "demo", force=True, inputs=inputs)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_force_refuses_foreign_directories_other_stages_files_and_links(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInput, match="is not a pgolf stage output"):
        StageOutput(foreign, "demo", force=True)
    out = make_stage(tmp_path)
    with pytest.raises(InvalidInput, match="is a 'demo' output; --force replaces only an earlier 'train'"):
        StageOutput(out, "train", force=True)
    (out / "notes.txt").write_text("added by hand")
    with pytest.raises(InvalidInput, match="notes.txt: not an output its manifest lists"):
        StageOutput(out, "demo", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInput, match="is a file, not a directory"):
        StageOutput(tmp_path / "file", "demo", force=True)
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(InvalidInput, match="symbolic link"):
        StageOutput(tmp_path / "link", "demo", force=True)
    assert (foreign / "notes.txt").read_text() == "keep me" and (out / "notes.txt").is_file()
    assert (tmp_path / "file").read_text() == "x"


def test_a_crash_during_a_forced_run_keeps_the_old_output(tmp_path):
    out = make_stage(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with StageOutput(out, "demo", force=True) as stage:
            stage.add_output("half.bin", "blob").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert open_stage(out, "demo")["metrics"]["answer"] == 42 and listing(tmp_path) == ["out"]


def test_a_replacement_cut_between_its_renames_is_recovered_by_the_next_run(tmp_path, capsys):
    out = make_stage(tmp_path)
    os.replace(out, tmp_path / ".out.replaced")  # where the rename-aside fallback stops if the machine dies
    with pytest.raises(InvalidInput, match="already exists"):
        StageOutput(out, "demo")  # restored first, then (without --force) not replaced
    assert "restored the previous output" in capsys.readouterr().err
    assert open_stage(out, "demo")["metrics"]["answer"] == 42 and listing(tmp_path) == ["out"]


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path):
    first = StageOutput(tmp_path / "out", "demo")
    with pytest.raises(InvalidInput, match=rf"another pgolf run \(pid {os.getpid()}\) is writing this output"):
        StageOutput(tmp_path / "out", "demo")
    first.add_output("a.bin", "blob").write_bytes(b"a")
    first.finalize()
    make_stage(tmp_path, force=True)  # the lock went with the first run
    assert listing(tmp_path) == ["out"]


def test_a_lock_held_by_another_process_is_respected(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pgolf.artifacts import StageOutput; "
        f"stage = StageOutput({str(tmp_path / 'out')!r}, 'demo'); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InvalidInput, match=f"pid {holder.pid}"):
            StageOutput(tmp_path / "out", "demo")
    finally:
        holder.kill()
        holder.wait()
    StageOutput(tmp_path / "out", "demo").lock.release()  # a killed holder's lock is free again


def test_a_staging_directory_pgolf_did_not_make_is_never_removed(tmp_path):
    staging = tmp_path / ".out.partial"
    staging.mkdir()
    (staging / "data.txt").write_text("someone's")
    with pytest.raises(InvalidInput, match="was not made by pgolf"):
        StageOutput(tmp_path / "out", "demo")
    assert (staging / "data.txt").read_text() == "someone's"


# ---- manifests that cannot drift -------------------------------------------------------------------------------
def edit_manifest(out, change):
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["outputs"][0].update(path="/etc/hostname"), "leaves the stage directory"),
    (lambda m: m["outputs"][0].update(path="../other/weights.bin"), "leaves the stage directory"),
    (lambda m: m["outputs"][0].update(bytes="200"), r"outputs\[0\].bytes '200' is not a byte count"),
    (lambda m: m["outputs"][0].update(sha256="abc"), "is not a sha256 hex digest"),
    (lambda m: m.update(outputs={"path": "x"}), "'outputs' must be a list"),
    (lambda m: m.update(inputs=[{"path": "rel.txt", "role": "x", "sha256": "0" * 64, "bytes": 1}]),
     "is not an absolute path"),
    (lambda m: m["metrics"].update(answer=41), "'metrics' does not match metrics_sha256"),
    (lambda m: m["config"].update(a=2), "'config' does not match config_sha256"),
    (lambda m: m.update(schema=1), "manifest schema 1"),
    (lambda m: m.update(stage=7), "'stage' is not a stage name"),
])
def test_malformed_or_edited_manifests_are_refused_naming_the_field(tmp_path, change, message):
    out = make_stage(tmp_path)
    edit_manifest(out, change)
    with pytest.raises(InvalidInput, match=message):
        open_stage(out)
    result = subprocess.run([sys.executable, "-m", "pgolf", "verify", out], capture_output=True, text=True)
    assert result.returncode == 3 and len(result.stderr.strip().splitlines()) == 1
    assert re.search(message, result.stderr), result.stderr


def test_an_output_symlinked_outside_the_stage_directory_is_refused(tmp_path):
    out = make_stage(tmp_path)
    outside = tmp_path / "host_file"
    outside.write_bytes((out / "weights.bin").read_bytes())
    (out / "weights.bin").unlink()
    (out / "weights.bin").symlink_to(outside)
    with pytest.raises(InvalidInput, match="resolves outside the stage directory"):
        open_stage(out)


def test_inputs_are_recorded_resolved_and_found_again_by_digest_after_a_move(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = make_stage(tmp_path / "run", "first")
    with StageOutput(Path("run/second"), "second") as stage:  # a cwd-relative input path
        stage.add_input(Path("run/first/weights.bin"), "blob")
        stage.add_output("x.bin", "x").write_bytes(b"x")
        stage.finalize()
    recorded = read_manifest(tmp_path / "run/second")["inputs"][0]
    assert recorded["path"] == str(first.resolve() / "weights.bin")
    assert recorded["relative"] == "../first/weights.bin"
    monkeypatch.chdir("/")
    found = upstream(read_manifest(tmp_path / "run/second"), tmp_path / "run/second", "demo")
    assert found[0] == first.resolve()
    os.replace(tmp_path / "run", tmp_path / "moved")  # the whole run folder, elsewhere
    found = upstream(read_manifest(tmp_path / "moved/second"), tmp_path / "moved/second", "demo")
    assert found[0] == (tmp_path / "moved/first").resolve()
    make_stage(tmp_path / "moved", "first", force=True)  # re-run upstream: same name, new manifest...
    edit_manifest(tmp_path / "moved/first", lambda m: m["outputs"][0].update(sha256="1" * 64))
    with pytest.raises(InvalidInput, match="changed since"):
        upstream(read_manifest(tmp_path / "moved/second"), tmp_path / "moved/second", "demo")


def test_non_finite_metrics_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InvalidInput, match="metrics: sweep.1.val_bpb is not a finite number"):
        with StageOutput(tmp_path / "out", "demo") as stage:
            stage.add_output("a.bin", "blob").write_bytes(b"a")
            stage.metrics = {"sweep": [{"val_bpb": 1.0}, {"val_bpb": float("nan")}]}
            stage.finalize()
    assert listing(tmp_path) == []


def test_a_new_output_inside_an_input_or_holding_one_is_refused_before_anything_is_made(tmp_path):
    data = make_stage(tmp_path, "data")
    with pytest.raises(InvalidInput, match=r"sub/eval: is inside an input of this run .*; pgolf never writes there"):
        StageOutput(data / "sub" / "eval", "demo", inputs=[data])
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json", "weights.bin"]
    with pytest.raises(InvalidInput, match="holds an input of this run"):
        StageOutput(tmp_path, "demo", inputs=[data / "weights.bin"])


def test_an_output_below_a_file_or_a_dangling_link_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidInput, match=r"afile/x: cannot create it: .*afile is not a directory"):
        StageOutput(tmp_path / "afile" / "x", "demo")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InvalidInput, match=r"cannot create it: .*dangling is a dangling symbolic link"):
        StageOutput(tmp_path / "dangling" / "x", "demo")
    too_long = tmp_path / "new" / "deeper" / ("n" * 300)  # the lock's name is too long: the run cannot start
    with pytest.raises(InvalidInput, match="File name too long"):
        StageOutput(too_long, "demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling"]  # the parents it made are gone


def test_force_never_deletes_what_a_listed_output_turned_into(tmp_path):
    out = make_stage(tmp_path)
    (out / "weights.bin").unlink()
    (out / "weights.bin").mkdir()
    (out / "weights.bin" / "mine.txt").write_text("keep me")
    with pytest.raises(InvalidInput, match="weights.bin: is not the file its manifest lists"):
        StageOutput(out, "demo", force=True)
    assert (out / "weights.bin" / "mine.txt").read_text() == "keep me"


def test_a_lock_that_cannot_be_written_names_its_file_and_is_not_left_behind(tmp_path):
    """A disk with no byte left: the lock's pid cannot be written (RLIMIT_FSIZE 0 fails that write the same way)."""
    script = ("import resource; from pgolf.artifacts import StageOutput; from pgolf.errors import InvalidInput\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
              f"try:\n    StageOutput({str(tmp_path / 'out')!r}, 'demo')\n"
              "except InvalidInput as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == f"{tmp_path / '.out.lock'}: cannot write (File too large); nothing written to " \
        f"{tmp_path / 'out'}", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_safetensors_bytes_are_the_same_for_the_same_state():
    """The library writes its header's metadata in a random order per call; pgolf's files sort it, so one state
    saves to one byte string (a digest and a blob size that do not depend on the run), and reads back whole."""
    tensors = {"b.weight": torch.arange(12, dtype=torch.int8).view(3, 4), "a.scale": torch.ones(3)}
    metadata = {f"key{i}": f"value {i} × ü" for i in range(12)} | {"format": "pgolf-test"}
    saved = {safetensors_bytes(tensors, metadata) for _ in range(20)}
    assert len(saved) == 1
    data = saved.pop()
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + length])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(metadata)
    assert header["__metadata__"] == metadata
    restored = load(data)
    assert restored.keys() == tensors.keys() and all(torch.equal(restored[k], t) for k, t in tensors.items())
