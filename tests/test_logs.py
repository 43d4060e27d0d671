"""Quiet logs: train prints a line every --log-every steps (plus the first and last) while train_log.jsonl keeps
every step; a terminal gets a progress bar instead of nothing; every stage ends listing what it wrote."""

import io
import json
import re
from pathlib import Path
from unittest import mock

import pytest
from rich.console import Console

from pgolf import log
from pgolf.artifacts import StageOutput
from pgolf.stages.common import output_lines
from pgolf.train_config import TrainConfig
from pgolf.trainer import LINES_PER_RUN, Schedule
from tests.test_train import run_cli

STEP_LINE = re.compile(r"^step (\d+)/(\d+): loss \d+\.\d{4} lr x", re.M)
# One micro-batch a step, no periodic validation or checkpoint: a tiny run takes about a second.
QUICK = ("--preset", "tiny", "--batch-tokens", "1024", "--val-every", "0", "--checkpoint-every", "0")


def train(capsys, data_dir: Path, out: Path, *flags, env: dict | None = None) -> str:
    with mock.patch.dict("os.environ", env or {}):
        code, _, err = run_cli(capsys, "train", data_dir, *QUICK, "--out", out, *flags)
    assert code == 0, err
    return err


def train_records(out: Path) -> list[dict]:
    records = map(json.loads, (out / "train_log.jsonl").read_text().splitlines())
    return [r for r in records if r["event"] == "train"]


def test_a_line_every_k_steps_while_the_jsonl_keeps_every_step(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "train"
    err = train(capsys, tiny_data_dir, out, "--iterations", 12, "--log-every", 5)
    assert [int(m[1]) for m in STEP_LINE.finditer(err)] == [1, 5, 10, 12]  # first, every 5th, last
    assert "\x1b[" not in err  # not a terminal: no progress bar drawn
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(r["loss"] > 0 for r in records)
    # ms/step and tokens/s are measured over the steps since the previous line, so they sit on the lines' steps.
    assert [r["step"] for r in records if "ms_per_step" in r] == [1, 5, 10, 12]
    assert STEP_LINE.findall((out / "train.log").read_text()) == STEP_LINE.findall(err)
    assert "tokens; attention kernel torch (auto)\n" in err  # the kernel the run forces (none on CPU)


@pytest.mark.parametrize("flags, env, logged", [
    ((), {"PGOLF_LOG_EVERY": "3"}, [1, 3, 6, 7]),
    (("--log-every", "4"), {"PGOLF_LOG_EVERY": "3"}, [1, 4, 7]),  # the flag wins over the env
    ((), {"TRAIN_LOG_EVERY": "6"}, [1, 6, 7]),  # the challenge's name
])
def test_log_every_from_the_flag_or_the_environment(tiny_data_dir, tmp_path, capsys, flags, env, logged):
    err = train(capsys, tiny_data_dir, tmp_path / "train", "--iterations", 7, *flags, env=env)
    assert [int(m[1]) for m in STEP_LINE.finditer(err)] == logged


def test_log_every_0_gives_about_20_lines_whatever_the_budget():
    by_steps = Schedule(TrainConfig(iterations=1000, log_every=0))
    logged = [s for s in range(1, 1001) if by_steps.log_due(s, 0.0, 0.0)]
    assert logged == list(range(50, 1001, 50)) and len(logged) == LINES_PER_RUN
    # Under a wallclock cap the lines follow train time (100 ms/step here), not the unreachable iterations.
    by_time = Schedule(TrainConfig(iterations=10**6, wallclock_seconds=60, log_every=0))
    logged = [s for s in range(1, 601) if by_time.log_due(s, 100.0 * s, 100.0 * (s - 1))]
    assert logged == list(range(30, 601, 30))
    assert [s for s in range(1, 20) if Schedule(TrainConfig(log_every=7)).log_due(s, 0.0, 0.0)] == [7, 14]


def test_a_terminal_gets_the_progress_bar(tiny_data_dir, tmp_path, capsys, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(log, "console", Console(file=screen, force_terminal=True, width=160))
    train(capsys, tiny_data_dir, tmp_path / "train", "--iterations", 6, "--log-every", 3)
    drawn = screen.getvalue()
    assert re.search(r"train .*\d/6 steps loss \d+\.\d{4} +[\d,]+ tok/s", drawn), drawn[-2000:]
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn).replace("\r", "\n")  # the text without redraws
    assert [int(m[1]) for m in STEP_LINE.finditer(lines)] == [1, 3, 6]  # the lines print above the bar


def test_train_ends_listing_its_outputs_with_their_bytes(tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "train"
    err = train(capsys, tiny_data_dir, out, "--iterations", 2)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = dict(re.findall(r"^  (\S+) +([\d,]+) B$", err, re.M))
    expected = {o["path"]: o["bytes"] for o in manifest["outputs"]} | {
        "manifest.json": (out / "manifest.json").stat().st_size}
    assert {name: int(size.replace(",", "")) for name, size in listed.items()} == expected
    assert set(expected) == {"model.safetensors", "train_log.jsonl", "train.log", "manifest.json"}
    assert f"wrote {out} (4 files, {sum(expected.values()):,} B):" in err
    # The lines benchmarks/protocol_seed.sh greps are still the summary's last matches.
    summary = [line for line in err.splitlines() if re.search(r"steps \(|val_bpb|timers:", line)][-3:]
    assert summary[0].startswith("2 steps (iterations)") and summary[2].startswith("timers: setup")


def test_many_files_of_one_role_are_one_line(tmp_path):
    out = tmp_path / "data"
    with StageOutput(out, "tokenize", argv=["test"]) as stage:
        for index in range(5):
            stage.add_output(f"fineweb_train_{index:06d}.bin", "train_shard").write_bytes(b"x" * (index + 1))
        stage.add_output("tok.model", "tokenizer").write_bytes(b"m" * 7)
        stage.finalize()
    lines = output_lines(out)
    assert lines[1].split() == ["fineweb_train_000000.bin", "...", "fineweb_train_000004.bin", "15", "B",
                                "(5", "train_shard", "files)"]
    assert lines[2].split() == ["tok.model", "7", "B"] and lines[3].split()[0] == "manifest.json"
    assert lines[0].startswith(f"wrote {out} (7 files, ")
