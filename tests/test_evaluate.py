"""`pgolf eval` end to end: JSON, the challenge's log line, the manifest, sweeps, all three artifact kinds,
torchrun, and a clear exit code for each bad input."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.artifacts import StageOutput, sha256_file
from pgolf.checkpoint import load_checkpoint
from pgolf.codecs import pack_blob
from pgolf.quantized import quantize_state, save_quantized
from tests.demo_data import write_demo_tokenizer

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
LOG_LINE = re.compile(r"^final_(\w+) val_loss:(\d+\.\d{4}) val_bpb:(\d+\.\d{4}) eval_time:\d+ms$", re.M)


def pgolf_eval(*args, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `pgolf eval ARGS` in this process through the real entry point; (exit code, stdout, stderr)."""
    from pgolf.cli import main

    monkeypatch.setattr(sys, "argv", ["pgolf", "eval", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def tree_digest(directory) -> dict:
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    return {str(path.relative_to(directory)): sha256_file(path) for path in files}


def test_json_log_line_and_manifest(tiny_checkpoint_dir, tiny_data_dir, tmp_path):
    before = tree_digest(tiny_checkpoint_dir), tree_digest(tiny_data_dir)
    out = tmp_path / "eval"
    command = [sys.executable, "-m", "pgolf", "eval", tiny_checkpoint_dir, "--data", tiny_data_dir,
               "--sliding-stride", "64", "--json", "--out", out]
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    data_manifest = json.loads((tiny_data_dir / "manifest.json").read_text())
    assert summary["tokens"] == data_manifest["metrics"]["val"]["tokens"] - 1
    assert summary["bytes"] == data_manifest["metrics"]["val"]["bytes"]
    assert summary["mode"] == "sliding" and summary["stride"] == 64 and summary["seq_len"] == 128
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] * summary["tokens"] /
                                               (np.log(2) * summary["bytes"]))
    assert set(summary["timers"]) == {"load_seconds", "warmup_seconds", "eval_seconds", "compliance_seconds"}
    name, loss, bpb = LOG_LINE.search(result.stderr).groups()
    assert name == "train_sliding" and float(bpb) == pytest.approx(summary["val_bpb"], abs=5e-5)
    assert f"final_train_sliding_exact val_loss:{summary['val_loss']:.8f}" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval"
    assert manifest["metrics"]["val_bpb"] == summary["val_bpb"] and manifest["metrics"]["mode"] == "sliding"
    assert {i["role"] for i in manifest["inputs"]} == {"artifact_manifest", "tokenizer", "val_shard"}
    assert json.loads((out / "results.json").read_text())["val_loss"] == summary["val_loss"]
    assert manifest["config"]["eval"]["sliding_stride"] == 64
    assert (tree_digest(tiny_checkpoint_dir), tree_digest(tiny_data_dir)) == before  # inputs untouched


def test_sweep_prints_the_grid_sorted_by_val_bpb(tiny_checkpoint_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                 capsys):
    code, out, err = pgolf_eval(tiny_checkpoint_dir, "--data", tiny_data_dir, "--ngram-order", "2,4",
                                "--alpha", "0.1,0.5", "--ngram-buckets", "2048", "--json", "--out",
                                tmp_path / "sweep", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    summary = json.loads(out)
    rows = summary["sweep"]
    assert sorted((r["order"], r["alpha"]) for r in rows) == [(2, 0.1), (2, 0.5), (4, 0.1), (4, 0.5)]
    assert [r["val_bpb"] for r in rows] == sorted(r["val_bpb"] for r in rows)
    assert summary["val_bpb"] == summary["model_val_bpb"]  # a sweep never reports its best row as the score
    table = [line.split()[0] for line in err.splitlines() if re.match(r"^ngram[24]_a0\.[15]\s", line)]
    assert table == [r["name"] for r in rows] and rows[0]["name"] == f"ngram{rows[0]['order']}_a{rows[0]['alpha']}"


@pytest.fixture(scope="module")
def artifact_kinds(tiny_checkpoint_dir, tmp_path_factory):
    """quantize and compress outputs of the tiny checkpoint: fp32 passthrough (exact) and int8."""
    state, config, _ = load_checkpoint(tiny_checkpoint_dir / "model.safetensors")
    root = tmp_path_factory.mktemp("kinds")
    kinds = {}
    for name, matrix_scheme in (("fp32", "fp32"), ("int8", "int8")):
        schemes = {key: matrix_scheme if tensor.dim() == 2 else "fp32" for key, tensor in state.items()}
        tensors, records = quantize_state(state, schemes)
        plan = {"model_config": dataclasses.asdict(config), "tensors": records}
        with StageOutput(root / f"q_{name}", "quantize", argv=["test"]) as stage:
            save_quantized(stage.dir, tensors, plan)
            stage.add_output("quantized.safetensors", "quantized")
            stage.add_output("plan.json", "plan")
            stage.finalize()
        with StageOutput(root / f"blob_{name}", "compress", argv=["test"]) as stage:
            stage.add_output("model.blob", "blob").write_bytes(pack_blob(tensors, plan, "zlib"))
            stage.finalize()
        kinds[name] = root / f"q_{name}", root / f"blob_{name}"
    return kinds


def test_train_quantize_and_compress_outputs_all_evaluate(tiny_checkpoint_dir, tiny_data_dir, artifact_kinds,
                                                          tmp_path, monkeypatch, capsys):
    results = {}
    artifacts = {"train": tiny_checkpoint_dir, "q_fp32": artifact_kinds["fp32"][0],
                 "blob_fp32": artifact_kinds["fp32"][1], "q_int8": artifact_kinds["int8"][0],
                 "blob_int8": artifact_kinds["int8"][1]}
    for name, artifact in artifacts.items():
        code, out, err = pgolf_eval(artifact, "--data", tiny_data_dir, "--json", "--out", tmp_path / name,
                                    monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        results[name] = json.loads(out)
    assert results["q_fp32"]["kind"] == "quantize" and results["blob_fp32"]["kind"] == "compress"
    # fp32 passthrough restores the weights bit for bit, so the scores are the checkpoint's exactly.
    assert results["q_fp32"]["val_loss"] == results["blob_fp32"]["val_loss"] == results["train"]["val_loss"]
    assert results["q_int8"]["val_loss"] == results["blob_int8"]["val_loss"] != results["train"]["val_loss"]
    assert results["q_int8"]["val_bpb"] == pytest.approx(results["train"]["val_bpb"], abs=0.01)


def test_torchrun_two_ranks_match_one_process(tiny_checkpoint_dir, tiny_data_dir, tmp_path):
    common = [tiny_checkpoint_dir, "--data", tiny_data_dir, "--sliding-stride", "64", "--ngram-order", "3",
              "--ngram-buckets", "1024", "--batch-seqs", "8", "--device", "cpu", "--json"]
    single = subprocess.run([sys.executable, "-m", "pgolf", "eval", *common, "--out", tmp_path / "one"],
                            capture_output=True, text=True, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ranks = subprocess.run([*torchrun, "-m", "pgolf", "eval", *common, "--out", tmp_path / "two"],
                           capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    one, two = json.loads(single.stdout), json.loads(ranks.stdout)  # rank 0 alone prints
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["tokens"] == one["tokens"] and two["bytes"] == one["bytes"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-12)
    assert two["model_val_loss"] == pytest.approx(one["model_val_loss"], rel=1e-12)


BATCHED_TTT = """
mode = "batched"
chunk_tokens = 32
lora_rank = 4
lora_alpha = 6.0
lora_batch_docs = 4
eval_seq_len = 128
lora_warm_start = false
prefix_docs = 0
"""


@pytest.mark.parametrize("phases", [False, True], ids=["no-phases", "phases"])
def test_batched_ttt_splits_its_document_batches_over_two_ranks(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                                  phases):
    """Without phases every batch starts from the same weights and seeded adapters whichever rank runs it, so two
    ranks give one process's totals; with phases (gradients averaged over ranks between rounds) the run still
    scores each target once, before any update that uses it (run_ttt's own C3/C4 checks would exit 5)."""
    settings = tmp_path / "ttt.toml"
    settings.write_text(BATCHED_TTT.replace("prefix_docs = 0", "prefix_docs = 12\nphases = 2") if phases
                        else BATCHED_TTT)
    common = [tiny_checkpoint_dir, "--data", tiny_data_dir, "--ttt", "--ttt-config", settings, "--device", "cpu",
              "--json"]
    single = subprocess.run([sys.executable, "-m", "pgolf", "eval", *common, "--out", tmp_path / "one"],
                            capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ranks = subprocess.run([*torchrun, "-m", "pgolf", "eval", *common, "--out", tmp_path / "two"],
                           capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert ranks.returncode == 0, ranks.stderr
    one, two = json.loads(single.stdout), json.loads(ranks.stdout)
    assert two["world_size"] == 2 and two["tokens"] == one["tokens"] and two["bytes"] == one["bytes"]
    # Batched TTT's pass is split over ranks, so the 8-GPU estimate scales it (2 / 8), as a plain eval's.
    assert two["timing"]["estimated_seconds"] < two["timing"]["measured_seconds"]
    if phases:
        assert two["ttt"]["steps"] > 0 and math.isfinite(two["val_loss"])
        assert two["val_loss"] != pytest.approx(one["val_loss"], rel=1e-12)  # larger phase batches: other weights
    else:
        assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-12)


@pytest.fixture
def broken_inputs(tiny_checkpoint_dir, tiny_data_dir, tmp_path):
    no_val = tmp_path / "no_val"
    shutil.copytree(tiny_data_dir, no_val, ignore=shutil.ignore_patterns("fineweb_val_*", "manifest.json"))
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_checkpoint_dir, tampered)
    weights = bytearray((tampered / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (tampered / "model.safetensors").write_bytes(bytes(weights))
    existing = tmp_path / "existing"
    existing.mkdir()
    return {"no_val": no_val, "tampered": tampered, "existing": existing}


@pytest.mark.parametrize("case, args, code, message", [
    ("vocab", ["--tokenizer", "SP512"], 3, "vocabulary is 512 but the model's vocab_size is 1024"),
    ("no val", ["--data", "no_val"], 3, "no val shards"),
    ("digest", ["ARTIFACT=tampered"], 3, "sha256 does not match"),
    ("not an artifact", ["ARTIFACT=data"], 3, "is a 'tokenize' output, expected"),
    ("exists", ["--out", "existing"], 3, "already exists and is not a pgolf stage output"),
    ("seq len", ["--seq-len", "256"], 2, "--seq-len 256 exceeds the model's max_seq_len 128"),
    ("stride", ["--seq-len", "64", "--sliding-stride", "100"], 2, "sliding_stride"),
    ("alpha alone", ["--alpha", "0.3"], 2, "--alpha needs --ngram-order"),
    ("ttt flags", ["--ttt-lr", "0.1"], 2, "--ttt-lr given without --ttt"),
    ("ttt mode", ["--ttt", "--ttt-mode", "magic"], 2, "mode = 'magic'"),
    ("order", ["--ngram-order", "1"], 2, "order = 1"),
])
def test_bad_input_exits_with_its_code_and_one_line(case, args, code, message, broken_inputs,
                                                    tiny_checkpoint_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                    capsys):
    places = {**broken_inputs, "SP512": write_demo_tokenizer(tmp_path, 512), "data": tiny_data_dir}
    artifact = tiny_checkpoint_dir
    resolved = []
    for arg in args:
        if arg.startswith("ARTIFACT="):
            artifact = places[arg.split("=")[1]]
        else:
            resolved.append(places.get(arg, arg))
    if "--data" not in resolved:
        resolved = ["--data", tiny_data_dir, *resolved]
    if "--out" not in resolved:
        resolved += ["--out", tmp_path / "out"]
    exit_code, out, err = pgolf_eval(artifact, *resolved, monkeypatch=monkeypatch, capsys=capsys)
    assert exit_code == code, err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists()


def test_ttt_runs_from_the_cli_with_compliance(tiny_checkpoint_dir, tiny_data_dir, tmp_path, monkeypatch,
                                               capsys):
    code, out, err = pgolf_eval(tiny_checkpoint_dir, "--data", tiny_data_dir, "--ttt", "--ttt-mode", "sgd",
                                "--ttt-chunk-tokens", "4096", "--ttt-epochs", "1", "--check-compliance",
                                "--json", "--out", tmp_path / "ttt", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ttt"]["steps"] > 0 and summary["ttt"]["updates"] >= 4
    assert [c["ok"] for c in summary["checks"]] == [True] * 4 and summary["checks"][0]["source"] == "train"
    assert re.search(r"^final_train_flat_ttt val_loss:", err, re.M)
    manifest = json.loads((tmp_path / "ttt" / "manifest.json").read_text())
    assert [c["name"] for c in manifest["checks"]] == ["C1 causality", "C2 normalization",
                                                       "C3 score before update", "C4 single pass"]
    assert torch.isfinite(torch.tensor(summary["val_bpb"]))


def test_eval_speed_benchmark_runs_and_reports_each_measurement(tiny_checkpoint_dir, tiny_data_dir):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_speed.py"
    command = [sys.executable, script, "--data", tiny_data_dir, "--artifact", tiny_checkpoint_dir, "--device",
               "cpu", "--val-tokens", "3000", "--stride", "32", "--orders", "2,3", "--alphas", "0.2,0.4",
               "--buckets", "512", "--ttt-chunk-tokens", "1024", "--profile", "--log-every", "0"]
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    lines = {json.loads(line)["measurement"]: json.loads(line) for line in result.stdout.splitlines()}
    assert list(lines) == ["flat", "sliding", "ngram_sweep", "ngram_best", "sweep_cost", "ttt"]
    assert lines["flat"]["targets"] == lines["sliding"]["targets"] == 2999
    flat, sliding = lines["flat"]["val_bpb"], lines["sliding"]["val_bpb"]
    assert sliding != flat and lines["sliding"]["gain_bpb_vs_flat"] == pytest.approx(flat - sliding, abs=1e-12)
    points, best = lines["ngram_sweep"]["points"], lines["ngram_best"]
    assert len(points) == 4 and best["val_bpb"] == pytest.approx(min(points.values()), rel=1e-5)  # scored alone
    assert best["gain_bpb_vs_sliding"] == pytest.approx(lines["sliding"]["val_bpb"] - best["val_bpb"], abs=1e-12)
    assert lines["ttt"]["steps"] > 0
    profile = lines["ttt"]["profile"]  # the TTT pass ran under the profiler: its ops and their time came back
    assert profile["ops"] > 0 and 0 < profile["busy_seconds"] and "Self CPU" in result.stderr
    assert "/2,999 targets scored in" in result.stderr  # the TTT pass's progress lines (a cut-short run's speed)


def test_default_outputs_are_one_directory_per_mode_and_settings(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                                 monkeypatch, capsys):
    artifact = tmp_path / "train"
    shutil.copytree(tiny_checkpoint_dir, artifact)
    runs = {"flat": [], "sliding": ["--sliding-stride", "64"], "ngram": ["--ngram-order", "2", "--alpha", "0.3"]}
    written = {}
    for name, flags in runs.items():
        code, out, err = pgolf_eval(artifact, "--data", tiny_data_dir, *flags, "--json", monkeypatch=monkeypatch,
                                    capsys=capsys)
        assert code == 0, err
        written[name] = Path(json.loads(out)["out"])
        assert json.loads((written[name] / "manifest.json").read_text())["stage"] == "eval"
    assert [path.parent for path in written.values()] == [tmp_path] * 3
    assert written["flat"].name.startswith("eval-train-flat-")
    assert written["sliding"].name.startswith("eval-train-sliding64-")
    assert written["ngram"].name.startswith("eval-train-flat-ngram2-a0.3-")
    code, _, err = pgolf_eval(artifact, "--data", tiny_data_dir, "--sliding-stride", "64",
                              monkeypatch=monkeypatch, capsys=capsys)  # the same settings: the same directory
    assert code == 0 and f"{written['sliding']}: up to date (eval, made " in err
    other = tmp_path / "q"  # another artifact of the same run folder: its own directory, never the train's
    shutil.copytree(artifact, other)
    code, out, err = pgolf_eval(other, "--data", tiny_data_dir, "--sliding-stride", "64", "--json",
                                monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert Path(json.loads(out)["out"]).name.startswith("eval-q-sliding64-")


def test_a_shard_the_data_manifest_does_not_list_is_never_scored(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                                 monkeypatch, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    shards = sorted(data.glob("fineweb_val_*.bin"))
    extra = data / f"fineweb_val_{len(shards):06d}.bin"
    shutil.copy(shards[0], extra)  # the kind of copy that would double the scored tokens
    code, _, err = pgolf_eval(tiny_checkpoint_dir, "--data", data, "--out", tmp_path / "eval",
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 3 and f"{extra}: a shard {data / 'manifest.json'} does not list" in err
    assert not (tmp_path / "eval").exists()


def test_a_model_without_a_tokenizer_digest_is_scored_with_a_warning(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                                      monkeypatch, capsys):
    from pgolf.checkpoint import save_checkpoint

    state, config, _ = load_checkpoint(tiny_checkpoint_dir / "model.safetensors")
    with StageOutput(tmp_path / "train", "train", argv=["test"]) as stage:  # as an older pgolf wrote it
        save_checkpoint(stage.add_output("model.safetensors", "checkpoint"), state, config, {})
        stage.finalize()
    code, _, err = pgolf_eval(tmp_path / "train", "--data", tiny_data_dir, "--out", tmp_path / "e",
                              monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    assert "warning: the model records no tokenizer digest" in " ".join(err.split())


def test_the_records_batched_ttt_runs_from_the_cli_with_compliance(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                                   monkeypatch, capsys):
    code, out, err = pgolf_eval(tiny_checkpoint_dir, "--data", tiny_data_dir, "--ttt", "--ttt-mode", "record-0416",
                                "--ttt-chunk-tokens", "64", "--check-compliance", "--json", "--out",
                                tmp_path / "ttt", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ttt"]["config"]["mode"] == "batched" and summary["ttt"]["config"]["lora_rank"] == 96
    assert summary["ttt"]["steps"] > 0 and summary["ttt"]["updates"] > 0
    assert [c["ok"] for c in summary["checks"]] == [True] * 4, summary["checks"]
    assert torch.isfinite(torch.tensor(summary["val_bpb"]))


def test_the_estimate_scales_the_scored_pass_and_not_the_fixed_costs():
    from pgolf.evaluate import EvalConfig, estimate_eval_seconds, eval_timing

    timers = {"load_seconds": 2.0, "warmup_seconds": 3.0, "eval_seconds": 80.0, "compliance_seconds": 50.0}
    assert estimate_eval_seconds(timers, 1, 8) == 5.0 + 10.0  # one GPU did all 8 GPUs' shares
    assert estimate_eval_seconds(timers, 8, 8) == 85.0
    assert estimate_eval_seconds(timers, 2, 8, serial=True) == 85.0  # TTT runs on rank 0 alone: no scaling
    timing = eval_timing(EvalConfig(time_budget_seconds=12.0), timers, world_size=1, serial=False)
    assert timing == {"measured_seconds": 85.0, "world_size": 1, "estimated_seconds": 15.0, "gpus": 8,
                      "budget_seconds": 12.0, "within_budget": False}  # compliance is not counted
    assert eval_timing(EvalConfig(), timers, 1, False)["within_budget"] is None
    with pytest.raises(ValueError, match="enforce_time_budget: needs time_budget_seconds > 0"):
        EvalConfig(enforce_time_budget=True)
    # Batched TTT: its schedule's own estimate (the busiest GPU's batches) replaces an even share of its 70 s.
    schedule = {"measured_seconds": 70.0, "estimated_seconds": 30.0}
    assert estimate_eval_seconds(timers, 1, 8, schedule=schedule) == 5.0 + 10.0 / 8 + 30.0
    ttt = {"schedule": schedule}
    assert eval_timing(EvalConfig(), timers, 1, False, ttt)["estimated_seconds"] == 5.0 + 10.0 / 8 + 30.0


def test_batched_ttt_reports_its_schedule_and_the_estimate_uses_it(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                                   monkeypatch, capsys):
    from pgolf.evaluate import estimate_eval_seconds

    settings = tmp_path / "ttt.toml"
    settings.write_text(BATCHED_TTT.replace("prefix_docs = 0", "prefix_docs = 12\nphases = 2"))
    code, out, err = pgolf_eval(tiny_checkpoint_dir, "--data", tiny_data_dir, "--ttt", "--ttt-config", settings,
                                "--device", "cpu", "--budget-gpus", "2", "--json", "--out", tmp_path / "ttt",
                                monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0, err
    summary = json.loads(out)
    schedule = summary["ttt"]["schedule"]
    assert schedule["segments"] >= 2 and schedule["gpus"] == 2 and schedule["phase_seconds"] > 0  # a pause ran
    assert 0 < schedule["measured_seconds"] <= summary["timers"]["eval_seconds"]
    # Two GPUs share the batches: at most the one GPU's time, at least about half of it (the busiest GPU's share;
    # the loop's bookkeeping between batches is not in the estimate).
    assert 0.45 * schedule["measured_seconds"] <= schedule["estimated_seconds"] <= schedule["measured_seconds"]
    assert summary["timing"]["estimated_seconds"] == pytest.approx(
        estimate_eval_seconds(summary["timers"], 1, 2, schedule=schedule))


@pytest.mark.parametrize("budget, enforce, code", [(None, False, 0), ("1e-6", False, 0), ("1e-6", True, 5)])
def test_time_budget_reports_warns_and_exits_5_only_when_enforced(budget, enforce, code, tiny_checkpoint_dir,
                                                                   tiny_data_dir, tmp_path, monkeypatch, capsys):
    from pgolf.evaluate import estimate_eval_seconds

    flags = (["--time-budget", budget, "--budget-gpus", "4"] if budget else []) + \
        (["--enforce-time-budget"] if enforce else [])
    exit_code, out, err = pgolf_eval(tiny_checkpoint_dir, "--data", tiny_data_dir, "--device", "cpu", *flags,
                                     "--out", tmp_path / "e", monkeypatch=monkeypatch, capsys=capsys)
    assert exit_code == code, err
    results = json.loads((tmp_path / "e" / "results.json").read_text())  # written in every case
    timing, timers = results["timing"], results["timers"]
    gpus = 4 if budget else 8
    assert timing["estimated_seconds"] == estimate_eval_seconds(timers, 1, gpus)
    assert timing["measured_seconds"] == timers["load_seconds"] + timers["warmup_seconds"] + timers["eval_seconds"]
    assert timing["gpus"] == gpus and timing["world_size"] == 1
    flat = " ".join(err.split())
    if not budget:
        assert timing["budget_seconds"] is None and timing["within_budget"] is None
        assert "exceeds" not in flat and ", no budget" in flat
        return
    assert timing["budget_seconds"] == 1e-6 and timing["within_budget"] is False
    warning = (f"eval time: estimated {timing['estimated_seconds']:.2f} s on 4 GPU(s) (measured "
               f"{timing['measured_seconds']:.2f} s on 1 rank(s)) exceeds the 1e-06 s budget")
    assert f"warning: {warning}" in flat
    if enforce:
        assert f"error: {warning} (--enforce-time-budget; results in {tmp_path / 'e'})" in flat
        assert out == "" and "Traceback" not in err
    else:
        assert "budget 1e-06 s: OVER" in flat


def test_enforcing_without_a_budget_is_a_usage_error(tiny_checkpoint_dir, tiny_data_dir, tmp_path, monkeypatch,
                                                     capsys):
    code, _, err = pgolf_eval(tiny_checkpoint_dir, "--data", tiny_data_dir, "--enforce-time-budget", "--out",
                              tmp_path / "e", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "needs time_budget_seconds > 0" in err
    assert not (tmp_path / "e").exists()
