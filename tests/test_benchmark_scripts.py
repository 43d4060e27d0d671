"""Benchmark scripts that are tools as well: benchmarks/background.sh (a device job that outlives one command, started
in its own session, followed by later `wait` commands that return its files) and benchmarks/gptq_round.py."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "background.sh"


def background(cwd: Path, *args: str, out: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"OUT": str(out)} if out else {}), **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_background_job_runs_on_and_wait_returns_its_status_and_files(tmp_path):
    out = tmp_path / "returned"
    out.mkdir()
    gate = tmp_path / "gate"  # the job ends only once the test creates this file
    job = (f'echo started; while [ ! -f {gate} ]; do sleep 0.1; done; echo done > "$OUT/result.txt"; '
           'head -c 5000000 /dev/zero > "$OUT/big.tgz"; exit 3')
    assert background(tmp_path, "start", "j", "bash", "-c", job).returncode == 0
    try:
        assert background(tmp_path, "start", "j", "true").returncode == 2  # one job of a name at a time
        still = background(tmp_path, "wait", "j", "1", out=out)
        assert still.returncode == 124 and "still running" in still.stdout
    finally:
        gate.touch()  # a failed assertion must not leave the job waiting for ever
    ended = background(tmp_path, "wait", "j", "30", out=out)
    assert ended.returncode == 3 and "j exited 3" in ended.stdout
    with tarfile.open(out / "j-bg.tgz") as archive:
        assert archive.extractfile("j/out/result.txt").read() == b"done\n"
        assert archive.extractfile("j/log").read() == b"started\n"
        assert "j/out/big.tgz" not in archive.getnames()  # a big file comes back only with `take`
        assert archive.extractfile("j/big.txt").read() == b"5000000 j/out/big.tgz\n"
    assert sorted(path.name for path in out.iterdir()) == ["j-bg.tgz"]
    taken = tmp_path / "taken"
    taken.mkdir()
    assert background(tmp_path, "take", "j", out=taken, PART_BYTES="2000000").returncode == 0
    parts = sorted(taken.iterdir())
    assert [path.name for path in parts] == ["big.tgz.part00", "big.tgz.part01", "big.tgz.part02"]
    assert b"".join(path.read_bytes() for path in parts) == bytes(5_000_000)  # cat FILE.part* rebuilds it
    whole = tmp_path / "whole"
    whole.mkdir()
    assert background(tmp_path, "take", "j", out=whole).returncode == 0  # under PART_BYTES: as itself
    assert (whole / "big.tgz").read_bytes() == bytes(5_000_000)
    assert background(tmp_path, "wait", "nope").returncode == 2
    assert background(tmp_path, "start", "j").returncode == 2  # no command


def test_gptq_round_benchmark_times_both_ways_and_they_agree():
    """benchmarks/gptq_round.py on the CPU at tiny size: one JSON line, both ways timed, the same levels."""
    script = SCRIPT.parent / "gptq_round.py"
    result = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--factors", "3", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["factors"] == 3 and row["tensors"] > 0 and row["threads_s"] > 0 and row["stacked_s"] > 0
    assert row["levels_differ"] <= 1e-3


def test_benchmark_plan_files_load_as_plans():
    """benchmarks/plans/*.toml are passed to `pgolf quantize --plan` on the device: a field the plan loader
    refuses would cost a device call to find out."""
    from pgolf.plans import load_plan

    files = sorted((SCRIPT.parent / "plans").glob("*.toml"))
    assert files
    for path in files:
        load_plan(str(path))  # UsageError names the file and the field
