"""scripts/demo.sh (what `make demo` runs), shortened: the real pipeline end to end, its quantize step really
quantizes, a second run skips every stage as up to date, and it never deletes a folder it did not make. Needs no
shared data (CPython's own docs)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "scripts" / "demo.sh"
STAGES = ("data", "train", "q", "blob", "eval", "eval-ngram", "submission")
RESULT = re.compile(r"^demo: val_bpb (\d+\.\d{4}) \(sliding window\), val_loss \d+\.\d{4}; artifact ([\d,]+) bytes "
                    r"\(blob [\d,]+ \+ code [\d,]+\); tensors (.+)$", re.M)


def run_demo(out: Path) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this checkout's pgolf first
    env = {**os.environ, "PATH": path, "OUT": str(out), "STEPS": "20", "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", DEMO], capture_output=True, text=True, env=env, timeout=900)


def test_the_demo_runs_the_pipeline_and_really_quantizes(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out)
    assert result.returncode == 0, result.stderr[-3000:]
    bpb, artifact, tensors = RESULT.search(result.stdout).groups()
    assert 1.0 < float(bpb) < 8.0 and int(artifact.replace(",", "")) < 16_000_000
    by_scheme = json.loads((out / "q" / "manifest.json").read_text())["metrics"]["totals"]["by_scheme"]
    assert by_scheme["int6"]["tensors"] >= 8 and by_scheme["int8"]["tensors"] == 1  # blocks int6, embedding int8
    assert f"{by_scheme['int6']['tensors']} int6" in tensors
    train_manifest = out / "train" / "manifest.json"
    stamp = (train_manifest.stat().st_mtime_ns, train_manifest.read_bytes())
    rerun = run_demo(out)  # its own earlier output: every stage up to date, nothing recomputed
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    skipped = [line.split(": up to date")[0] for line in rerun.stderr.splitlines() if ": up to date (" in line]
    assert skipped == [str(out / stage) for stage in STAGES]
    assert RESULT.search(rerun.stdout).group(0) == RESULT.search(result.stdout).group(0)
    assert (train_manifest.stat().st_mtime_ns, train_manifest.read_bytes()) == stamp


def test_the_demo_never_deletes_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    result = run_demo(tmp_path / "mine")
    assert result.returncode == 3 and "is not an earlier demo's output" in result.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
