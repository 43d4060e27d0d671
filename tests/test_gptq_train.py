"""GPTQ inside the training budget (issue: record-level export): `pgolf train --gptq-calibration-batches N` saves
the Hessians of its exported weights from the next train batches, training stops --gptq-reserve-seconds early,
and `pgolf quantize` uses them without reading train data. Real tiny runs on real FineWeb shards (CPU)."""

import json

import pytest
import torch

from pgolf.artifacts import open_stage
from pgolf.dist import init_distributed
from pgolf.gptq import GPTQ_HESSIANS_FILE, collect_hessians, load_gptq_hessians
from pgolf.model import build_model
from pgolf.train_config import TrainConfig, resolve_configs
from pgolf.trainer import Schedule, Trainer
from tests.test_train import run_cli

STEPS, BATCHES = 6, 3
MICRO = 1024  # the tiny preset's micro-batch: 4 per step
QUANTIZE = ("--plan", "int6", "--clip", "gptq", "--keep-float-numel", "1024")


@pytest.fixture(scope="module")
def calibrated_run(tiny_data_dir, tmp_path_factory):
    from tests.test_train import run_main

    out = tmp_path_factory.mktemp("gptq") / "train"
    assert run_main("train", tiny_data_dir, "--preset", "tiny", "--iterations", STEPS, "--val-every", 0,
                    "--gptq-calibration-batches", BATCHES, "--out", out) == 0
    return out


def test_the_train_stage_saves_hessians_of_every_linear_layer(calibrated_run):
    manifest = open_stage(calibrated_run, "train")
    assert {o["role"]: o["path"] for o in manifest["outputs"]}["gptq_hessians"] == GPTQ_HESSIANS_FILE
    calibration = manifest["metrics"]["gptq_calibration"]
    assert calibration["batches"] == BATCHES and calibration["weights"] == "master"
    assert calibration["tokens"] == BATCHES * MICRO and calibration["seconds"] > 0
    # The calibration batches are read from the train stream after the last step, and counted as read (a
    # micro-batch span holds one extra target token).
    assert manifest["metrics"]["train_tokens_read"] == (STEPS * 4 + BATCHES) * (MICRO + 1)
    hessians, saved = load_gptq_hessians(calibrated_run / GPTQ_HESSIANS_FILE)
    assert saved == calibration
    model = build_model(*open_checkpoint(calibrated_run), "cpu")
    linear = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert set(hessians) == linear | {"tok_emb.weight"}  # the tiny model ties its head to the embedding
    for name, hessian in hessians.items():
        columns = dict(model.named_parameters())[name].size(1)
        assert hessian.shape == (columns, columns)
        torch.testing.assert_close(hessian, hessian.T)
        assert float(torch.linalg.eigvalsh(hessian.double()).min()) > -1e-4 * float(hessian.diagonal().max())


def open_checkpoint(run):
    from pgolf.checkpoint import load_checkpoint

    state, config, _ = load_checkpoint(run / "model.safetensors")
    return state, config


def test_hessians_are_the_exported_weights_inputs_over_the_next_train_batches(tiny_data_dir):
    from pgolf.shards import list_shards

    model_config, train_config, _ = resolve_configs("tiny", None, train_overrides={
        "iterations": 2, "gptq_calibration_batches": 2, "compile": "off"})
    trainer = Trainer(model_config, train_config, list_shards(tiny_data_dir, "train"), init_distributed("cpu"))
    position = trainer.loader.position
    state = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}
    for tensor in state.values():  # other weights than the model holds: the exported ones are what counts
        if tensor.is_floating_point():
            tensor.mul_(0.5)
    hessians = trainer.gptq_hessians(state)
    assert torch.equal(trainer.model.state_dict()["tok_emb.weight"], state["tok_emb.weight"] * 2)  # restored
    loader = trainer._loader(position)
    batches = [loader.next_batch() for _ in range(2)]
    reference = build_model(state, model_config, "cpu")
    linear = [f"{name}.weight" for name, module in reference.named_modules() if isinstance(module, torch.nn.Linear)]
    expected = collect_hessians(reference, linear, batches, "tok_emb.weight")
    assert hessians.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(hessians[name], expected[name], rtol=1e-5, atol=1e-6)


def test_quantize_uses_the_saved_hessians_without_data(calibrated_run, tmp_path, capsys, tiny_data_dir):
    code, _, err = run_cli(capsys, "quantize", calibrated_run, *QUANTIZE, "--out", tmp_path / "q")
    assert code == 0, err
    manifest = open_stage(tmp_path / "q", "quantize")
    assert manifest["metrics"]["calibration"] == {"source": "train", "tokens": BATCHES * MICRO, "weights": "master"}
    assert "gptq_hessians" in {record["role"] for record in manifest["inputs"]}
    assert "no --data read" in err
    # --data asks for sequential calibration on the shards instead: another (valid) export.
    code, _, err = run_cli(capsys, "quantize", calibrated_run, *QUANTIZE, "--data", tiny_data_dir,
                           "--out", tmp_path / "q-data")
    assert code == 0, err
    assert open_stage(tmp_path / "q-data", "quantize")["metrics"]["calibration"]["source"] == "data"
    saved = json.loads((tmp_path / "q" / "plan.json").read_text())["tensors"]
    sequential = json.loads((tmp_path / "q-data" / "plan.json").read_text())["tensors"]
    assert saved.keys() == sequential.keys() and saved != sequential


def test_a_run_without_hessians_still_needs_data_for_gptq(tiny_checkpoint_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint_dir, *QUANTIZE, "--out", tmp_path / "q")
    assert code == 2 and "needs --data DIR" in err and "--gptq-calibration-batches" in err and "generated" in err
    assert not (tmp_path / "q").exists()


def test_generated_windows_are_the_models_own_samples_from_bos():
    from pgolf.gptq import generated_windows
    from pgolf.model import BOS_ID, GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, max_seq_len=32))
    windows = generated_windows(model, 5, 12, 0.8, "cpu", batch=2)
    assert windows.shape == (5, 13) and windows.dtype == torch.int64
    assert bool((windows[:, 0] == BOS_ID).all()) and int(windows.max()) < 64 and int(windows.min()) >= 0
    assert torch.equal(windows, generated_windows(model, 5, 12, 0.8, "cpu", batch=2))  # deterministic
    # The samples follow the model's logits: a head that always prefers token 7 by 4 nats writes only 7s at a low
    # temperature (exp(-4 / 0.05) per other token) and mostly others at a high one (63 others vs e^(4 / 8) = 1.6).
    preferred = torch.zeros(64)
    preferred[7] = 4.0
    model.logits_from_hidden = lambda hidden: preferred.expand(hidden.size(0), 64)
    assert bool((generated_windows(model, 2, 12, 0.05, "cpu")[:, 1:] == 7).all())
    assert float((generated_windows(model, 8, 12, 8.0, "cpu")[:, 1:] == 7).float().mean()) < 0.5


def test_generated_calibration_quantizes_gptq_without_any_data(tiny_checkpoint_dir, tiny_data_dir, tmp_path,
                                                               capsys):
    generated = ("--calibration", "generated", "--calib-tokens", "512", "--calib-temperature", "0.9")
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint_dir, *QUANTIZE, *generated, "--out", tmp_path / "q")
    assert code == 0, err
    manifest = open_stage(tmp_path / "q", "quantize")
    assert manifest["metrics"]["calibration"] == {"source": "generated", "tokens": 512, "temperature": 0.9}
    assert {record["role"] for record in manifest["inputs"]} == {"checkpoint"}  # no shard was read
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint_dir, *QUANTIZE, "--data", tiny_data_dir,
                           "--calib-tokens", "512", "--out", tmp_path / "q-data")
    assert code == 0, err
    own = json.loads((tmp_path / "q" / "plan.json").read_text())["tensors"]
    shards = json.loads((tmp_path / "q-data" / "plan.json").read_text())["tensors"]
    assert own.keys() == shards.keys() and own != shards  # other Hessians, another valid export
    code, _, err = run_cli(capsys, "quantize", tiny_checkpoint_dir, *QUANTIZE, *generated, "--data", tiny_data_dir,
                           "--out", tmp_path / "both")
    assert code == 2 and "--calibration generated reads no data" in err and not (tmp_path / "both").exists()


def test_a_corrupt_hessians_file_is_refused_naming_it(calibrated_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "train"
    shutil.copytree(calibrated_run, run)
    (run / GPTQ_HESSIANS_FILE).write_bytes(b"not safetensors")
    code, _, err = run_cli(capsys, "quantize", run, *QUANTIZE, "--out", tmp_path / "q")
    assert code == 3 and GPTQ_HESSIANS_FILE in err
    assert not (tmp_path / "q").exists()


def test_the_reserve_comes_off_the_training_clock():
    config = TrainConfig(wallclock_seconds=600, gptq_calibration_batches=16, gptq_reserve_seconds=12)
    assert Schedule(config).wallclock_ms == 588_000
    with pytest.raises(ValueError, match="gptq_reserve_seconds"):
        TrainConfig(gptq_reserve_seconds=5)  # a reserve without calibration
    with pytest.raises(ValueError, match="gptq_reserve_seconds"):
        TrainConfig(wallclock_seconds=10, gptq_calibration_batches=1, gptq_reserve_seconds=10)
    # Without a wallclock budget (an iteration count ends the run) a preset's reserve is simply unused.
    unbounded = TrainConfig(wallclock_seconds=0, gptq_calibration_batches=1, gptq_reserve_seconds=10)
    assert Schedule(unbounded).wallclock_ms == 0
