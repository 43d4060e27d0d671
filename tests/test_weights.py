"""`--weights export|master`: a run trained with EMA exports or scores either weight set without retraining."""

import json
import subprocess
import sys

import pytest
import torch

from pgolf.artifacts import open_stage, output_path
from pgolf.checkpoint import load_checkpoint
from pgolf.stage_model import load_stage_model


def pgolf(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True,
                            env=env)
    return result


@pytest.fixture(scope="module")
def ema_run(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "train"
    env = {"OMP_NUM_THREADS": "1", "PGOLF_EMA_DECAY": "0.9", "PGOLF_VAL_EVERY": "0", "PGOLF_LOG_EVERY": "0",
           "PGOLF_CHECKPOINT_EVERY": "0", "PATH": "/usr/bin:/bin"}
    result = pgolf("train", tiny_data_dir, "--preset", "tiny", "--iterations", 12, "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    return out


def sha_of(manifest: dict, role: str) -> str:
    return next(o["sha256"] for o in manifest["outputs"] if o["role"] == role)


def test_load_artifact_picks_the_weight_set(ema_run):
    manifest = open_stage(ema_run, "train")
    exported, _, _ = load_stage_model(ema_run)
    master, _, _ = load_stage_model(ema_run, weights="master")
    master_file, _, _ = load_checkpoint(output_path(manifest, ema_run, "checkpoint_master"))
    assert all(torch.equal(master[name], tensor.float()) for name, tensor in master_file.items())
    assert any(not torch.equal(exported[name], master[name]) for name in master)  # the EMA lags the master


def test_quantize_and_eval_use_the_master_weights_when_asked(ema_run, tiny_data_dir, tmp_path):
    train = open_stage(ema_run, "train")
    for weights, role in (("export", "checkpoint"), ("master", "checkpoint_master")):
        out = tmp_path / f"q-{weights}"
        result = pgolf("quantize", ema_run, "--plan", "int8", "--weights", weights, "--out", out)
        assert result.returncode == 0, result.stderr
        quantized_from = next(i for i in open_stage(out, "quantize")["inputs"] if i["role"] == "checkpoint")
        assert quantized_from["sha256"] == sha_of(train, role)
    scores = {}
    for weights in ("export", "master"):
        result = pgolf("eval", ema_run, "--data", tiny_data_dir, "--weights", weights, "--json",
                       "--out", tmp_path / f"eval-{weights}")
        assert result.returncode == 0, result.stderr
        scores[weights] = json.loads(result.stdout)
        assert scores[weights]["weights"] == weights
    assert scores["export"]["val_loss"] != scores["master"]["val_loss"]


def test_bundle_lineage_accepts_a_blob_of_the_master_weights(ema_run, tmp_path):
    from pgolf.bundle import bundle_lineage

    assert pgolf("quantize", ema_run, "--plan", "int8", "--weights", "master", "--out", tmp_path / "q").returncode == 0
    assert pgolf("compress", tmp_path / "q", "--codec", "zlib", "--out", tmp_path / "blob").returncode == 0
    _, quantize, _, _ = bundle_lineage(ema_run, tmp_path / "blob")
    assert quantize["config"]["weights"] == "master"


def test_master_weights_need_a_train_output(ema_run, tiny_data_dir, tmp_path):
    assert pgolf("quantize", ema_run, "--plan", "int8", "--out", tmp_path / "q").returncode == 0
    result = pgolf("eval", tmp_path / "q", "--data", tiny_data_dir, "--weights", "master", "--out", tmp_path / "e")
    assert result.returncode == 2 and "needs a train output" in result.stderr
    bad = pgolf("quantize", ema_run, "--weights", "ema", "--out", tmp_path / "q2")
    assert bad.returncode == 2 and "weights = 'ema'" in bad.stderr
