"""scripts/pipeline.sh (README, "A worked pipeline") on the tiny model, run twice: the second run skips every
stage as up to date, rewrites nothing, and its closing `pgolf show` prints the same table of every eval."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "scripts" / "pipeline.sh"
PLANS = ("int8", "int6")  # two of the script's three: the loop, at two thirds of the cost


def run_pipeline(out: Path, data: Path) -> subprocess.CompletedProcess:
    # This interpreter's pgolf first on PATH: the one of this checkout, not another install.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "OUT": str(out), "STEPS": "4", "PLANS": " ".join(PLANS),
           "DATA": str(data), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", PIPELINE], capture_output=True, text=True, env=env, timeout=900)


def manifests(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(path.relative_to(out)): (path.stat().st_mtime_ns, path.read_bytes())
            for path in sorted(out.rglob("manifest.json"))}


def test_the_worked_pipeline_runs_and_a_rerun_skips_every_stage(tiny_data_dir, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data_dir, data)
    first = run_pipeline(out, data)
    assert first.returncode == 0, first.stderr[-3000:]
    written = manifests(out)
    stages = ["train"] + [f"{plan}/{stage}" for plan in PLANS for stage in ("q", "blob", "eval-flat", "eval-sliding")]
    assert sorted(written) == sorted(f"{stage}/manifest.json" for stage in stages)
    assert "up to date" not in first.stderr
    table = shown_rows(first.stderr, out)
    assert sorted(table) == sorted(f"{plan}/{kind}" for plan in PLANS for kind in ("eval-flat", "eval-sliding"))
    bpbs = [float(re.search(r"val_bpb (\d+\.\d+)", row)[1]) for row in table.values()]
    assert bpbs == sorted(bpbs)  # --sort bpb
    second = run_pipeline(out, data)
    assert second.returncode == 0, second.stderr[-3000:]
    skipped = [line for line in second.stderr.splitlines() if ": up to date (" in line]
    assert sorted(line.split(": up to date")[0] for line in skipped) == sorted(str(out / s) for s in stages)
    assert manifests(out) == written
    assert shown_rows(second.stderr, out) == table


def shown_rows(stderr: str, out: Path) -> dict[str, str]:
    """`pgolf show`'s table rows by eval (plan/eval-kind), in the order printed."""
    rows = {}
    for line in stderr.splitlines():
        found = re.search(r"(\w[\w-]*/eval-(?:flat|sliding))\b", line)
        if found and "val_bpb" in line:
            rows[found[1]] = line
    return rows
