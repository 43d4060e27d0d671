"""pgolf.trainer on its own: the CUDA dtypes, budget-aware schedules (fractions, wallclock-aware warm-down, EMA
and QAT switches), the resumable train log and resume checkpoints."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pgolf.dist import init_distributed
from pgolf.errors import UsageError
from pgolf.model import GPT, ModelConfig
from pgolf.shards import list_shards
from pgolf.train_config import TrainConfig, resolve_configs
from pgolf.trainer import RESUME_FILE, Schedule, Trainer, TrainLog, bf16_training_dtypes


def test_cuda_dtypes_are_the_challenges():
    config = ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, gated_attention=True)
    model = bf16_training_dtypes(GPT(config))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    # Everything else fp32: matrices, and the 2-D scalars (resid_mix, skip_weights, gates) too.
    assert {"blocks.0.resid_mix", "skip_weights", "blocks.0.attn.head_gate.weight"} <= set(dtypes)
    assert set(dtypes.values()) == {torch.float32}
    assert model.rope_cos.dtype == torch.bfloat16 and model.blocks[0].attn.c_q.qat_on.dtype == torch.bool


# ---- budget-aware schedules ------------------------------------------------------------------------

SEED_LIKE = dict(warmdown_frac=0.6, muon_momentum_warmup_frac=0.25, ema_decay=0.997, ema_start_frac=0.5,
                 qat_bits=6, qat_start_frac=0.85, muon_momentum_warmup_start=0.92, muon_momentum=0.99)


def schedule_at(schedule: Schedule, fraction: float, ms_per_step: float) -> tuple:
    elapsed_ms = fraction * schedule.wallclock_ms
    step = int(elapsed_ms / ms_per_step)
    return (round(schedule.lr_scale(step, elapsed_ms), 9), round(schedule.muon_momentum(step, elapsed_ms), 9),
            schedule.ema_on(step, elapsed_ms), schedule.qat_on(step, elapsed_ms))


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.45, 0.55, 0.8, 0.9, 0.99])
def test_budget_fractions_scale_with_the_budget(fraction):
    # 8 x H100 x 600 s at 90 ms/step vs 1 x H100 x 300 s at 813 ms/step: the same point of the run gets the
    # same schedule values although the step counts differ ~20x.
    big = Schedule(TrainConfig(wallclock_seconds=600, **SEED_LIKE))
    small = Schedule(TrainConfig(wallclock_seconds=300, **SEED_LIKE))
    assert schedule_at(big, fraction, ms_per_step=90) == schedule_at(small, fraction, ms_per_step=813)
    steps_only = Schedule(TrainConfig(wallclock_seconds=0, iterations=369, **SEED_LIKE))
    step = round(fraction * 369)
    assert steps_only.lr_scale(step, 0.0) == pytest.approx(big.lr_scale(0, fraction * 600_000), abs=0.01)


def test_fraction_schedules_reach_their_targets_where_step_counts_do_not():
    # The record's step-keyed momentum warm-up (1500 steps) never finished in a 369-step run.
    steps = TrainConfig(wallclock_seconds=300, muon_momentum_warmup_steps=1500,
                        muon_momentum_warmup_start=0.92, muon_momentum=0.99)
    fractions = dataclasses.replace(steps, muon_momentum_warmup_frac=0.25)
    at_end = (369, 299_000.0)
    assert Schedule(steps).muon_momentum(*at_end) < 0.94
    assert Schedule(fractions).muon_momentum(*at_end) == pytest.approx(0.99)
    schedule = Schedule(fractions)
    assert schedule.muon_momentum(0, 0.0) == pytest.approx(0.92)
    assert schedule.muon_momentum(10, 0.125 * 300_000) == pytest.approx(0.955)


def test_challenge_warmdown_is_wallclock_aware_and_step_based_without_a_cap():
    capped = Schedule(TrainConfig(wallclock_seconds=300, warmdown_iters=1200))
    # 100 steps in 30 s = 300 ms/step, so the warm-down (1200 x 300 ms = 360 s) spans the whole budget.
    assert capped.lr_scale(100, 30_000) == pytest.approx(270_000 / 360_000)
    assert capped.lr_scale(500, 150_000) == pytest.approx(0.5 * 300_000 / 360_000)
    fast = Schedule(TrainConfig(wallclock_seconds=300, warmdown_iters=100))
    assert fast.lr_scale(1000, 100_000) == 1.0  # 100 ms/step: warm-down starts at 290 s
    assert fast.lr_scale(2950, 295_000) == pytest.approx(0.5)
    uncapped = Schedule(TrainConfig(wallclock_seconds=0, iterations=1000, warmdown_iters=200))
    assert [uncapped.lr_scale(s, 0.0) for s in (0, 800, 900, 1000)] == [1.0, 1.0, 0.5, 0.0]
    momentum = Schedule(TrainConfig())
    momenta = [momentum.muon_momentum(s, 0.0) for s in (0, 250, 500, 900)]
    assert momenta == pytest.approx([0.85, 0.9, 0.95, 0.95])


def test_ema_and_qat_switch_on_at_their_fraction():
    schedule = Schedule(TrainConfig(wallclock_seconds=0, iterations=200, **SEED_LIKE))
    assert [schedule.ema_on(s, 0.0) for s in (99, 100)] == [False, True]
    assert [schedule.qat_on(s, 0.0) for s in (169, 170)] == [False, True]
    off = Schedule(TrainConfig(iterations=200))
    assert not off.ema_on(200, 0.0) and not off.qat_on(200, 0.0)


# ---- the resumable train log ----------------------------------------------------------------------


def test_resumed_log_keeps_what_happened_before_the_checkpoint(tmp_path):
    log = TrainLog(tmp_path, enabled=True)
    for step in (7, 8, 9):
        log.record({"event": "train", "step": step})
        log.record({"event": "val", "step": step})
    with open(log.jsonl, "a") as f:
        f.write('{"event": "train", "st')  # a line cut short by a crash
    log.truncate_after(8)
    kept = [(r["event"], r["step"]) for r in map(json.loads, log.jsonl.read_text().splitlines())]
    assert kept == [("train", 7), ("val", 7), ("train", 8)]




def test_resume_reads_a_setting_missing_from_an_older_checkpoint_as_its_default(tiny_data_dir, tmp_path):
    """A checkpoint written before a TrainConfig field existed ran that field's default."""
    model_config, train_config, _ = resolve_configs("tiny", env={})
    trainer = Trainer(model_config, train_config, list_shards(tiny_data_dir, "train"), init_distributed())
    path = tmp_path / RESUME_FILE
    trainer.save_resume(path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    loop = json.loads(metadata["loop"])
    del loop["configs"]["train"]["muon_row_normalize"]
    save_file(tensors, path, metadata=metadata | {"loop": json.dumps(loop)})
    trainer.load_resume(path)
    changed = Trainer(model_config, dataclasses.replace(train_config, muon_row_normalize=True),
                      list_shards(tiny_data_dir, "train"), init_distributed())
    with pytest.raises(UsageError, match="was written with train muon_row_normalize = False, this run has True"):
        changed.load_resume(path)
