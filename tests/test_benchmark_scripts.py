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


def test_protocol_sweep_runs_variants_one_per_gpu_and_summarizes(tmp_path):
    """benchmarks/protocol_sweep.sh on a stand-in machine: two GPUs (an nvidia-smi on PATH), a gpu_setup.sh that
    logs each vocabulary it prepares, and a protocol_seed.sh that writes the result files a real run writes, from
    its settings. Three variants go round-robin over the GPUs, sp8192 presets get the sp8192 shards, each
    variant's VAR=VALUE list reaches it, the float run is the default (EXPORT=0), and the summary reads them."""
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "protocol_sweep.sh").write_text((SCRIPT.parent / "protocol_sweep.sh").read_text())
    (bench / "gpu_setup.sh").write_text('echo "$VOCAB" >> setup.txt; DATA=data-$VOCAB\n')
    (bench / "protocol_seed.sh").write_text(
        'R=artifacts/$RUN-results; mkdir -p $R; echo "$CUDA_VISIBLE_DEVICES $VOCAB $EXPORT $PGOLF_SEED" > $R/env\n'
        'echo "{\\"metrics\\": {\\"steps\\": 10$PGOLF_SEED, \\"ms_per_step\\": 9.5}}" > $R/s_train.json\n'
        'echo "{\\"val_bpb\\": 1.$PGOLF_SEED}" > $R/s_eval_pre.json; echo "$RUN done"\n')
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text('#!/bin/sh\ncase "$*" in *-L*) printf "GPU 0\\nGPU 1\\n";; '
                                         '*) echo "Fake H100";; esac\n')
    (fake_bin / "nvidia-smi").chmod(0o755)
    out = tmp_path / "returned"
    env = {"PATH": f"{fake_bin}:{Path(sys.executable).parent}:/usr/bin:/bin", "OUT": str(out)}  # its python3
    specs = ["a:sp8192-300s:PGOLF_SEED=1", "b:seed-11l-300s:PGOLF_SEED=2,EXPORT=1", "c:sp8192-300s:PGOLF_SEED=3"]
    result = subprocess.run(["bash", str(bench / "protocol_sweep.sh"), *specs], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {"a": 1.1, "b": 1.2, "c": 1.3}
    assert sorted((tmp_path / "setup.txt").read_text().split()) == ["1024", "8192"]  # once per vocabulary
    ran = {run: (tmp_path / "artifacts" / f"{run}-results" / "env").read_text().split() for run in "abc"}
    assert ran == {"a": ["0", "8192", "0", "1"], "b": ["1", "1024", "1", "2"], "c": ["0", "8192", "0", "3"]}
    summary = json.loads((out / "sweep" / "summary.json").read_text())
    assert summary["b"] == {"spec": specs[1], "steps": 102, "ms_per_step": 9.5, "pre_quant_val_bpb": 1.2,
                            "gpu": "1 Fake H100"}
    bad = subprocess.run(["bash", str(bench / "protocol_sweep.sh"), "no spec"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "bad spec 'no spec'" in bad.stderr
