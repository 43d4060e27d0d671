"""pgolf.train_config: the presets, the challenge's env aliases and precedence, config files and their errors."""

import dataclasses
import re

import pytest

from pgolf.errors import UsageError
from pgolf.model import GPT, ModelConfig
from pgolf.train_config import TrainConfig, resolve_configs


def test_baseline_preset_is_the_challenge_configuration():
    model, train, _ = resolve_configs("baseline", env={})
    assert model == ModelConfig()
    # log_every is the one deliberate difference: the challenge prints every 200 steps, pgolf's default ~20 lines a run
    assert train == dataclasses.replace(TrainConfig(), log_every=200) and TrainConfig().log_every == 0
    assert (train.matrix_lr, train.scalar_lr, train.tied_embed_lr, train.batch_tokens, train.seq_len,
            train.warmup_steps, train.warmdown_iters, train.muon_momentum, train.muon_momentum_warmup_start,
            train.muon_momentum_warmup_steps) == (0.04, 0.04, 0.05, 524_288, 1024, 20, 1200, 0.95, 0.85, 500)
    assert train.accumulation_steps(1) == 8 and train.accumulation_steps(8) == 1
    big_micro = dataclasses.replace(train, micro_batch_tokens=262_144)  # sized for one GPU: capped on eight
    assert big_micro.accumulation_steps(1) == 2 and big_micro.accumulation_steps(8) == 1
    assert big_micro.micro_tokens(8) == 65_536
    small_batch = dataclasses.replace(big_micro, batch_tokens=65_536)  # a smaller --batch-tokens alone works
    assert small_batch.micro_tokens(1) == 65_536 and small_batch.accumulation_steps(1) == 1
    with pytest.raises(UsageError, match="not a multiple of world size 3"):
        train.accumulation_steps(3)


def test_seed_preset_uses_budget_fractions_and_the_seed_stack():
    model, train, _ = resolve_configs("seed-11l", env={})
    assert (model.num_layers, model.mlp_mult, model.activation, model.xsa_last_n, model.rope_dims,
            model.bigram_buckets, model.bigram_dim) == (11, 3.0, "leaky_relu2", -1, 16, 4096, 128)
    assert model.smear_gate and model.ln_scale and model.value_residual and model.gated_attention
    assert min(train.warmdown_frac, train.muon_momentum_warmup_frac) > 0
    assert min(train.ema_start_frac, train.qat_start_frac) > 0
    assert train.ema_decay > 0 and train.qat_bits == 6 and train.muon_weight_decay > 0
    GPT(dataclasses.replace(model, num_layers=1))  # the combination builds


def test_short_budget_preset_is_the_seed_stack_with_the_measured_training_changes():
    seed_model, seed_train, _ = resolve_configs("seed-11l", env={})
    model, train, _ = resolve_configs("seed-11l-300s", env={})
    assert model == seed_model
    changed = {f.name for f in dataclasses.fields(train) if getattr(train, f.name) != getattr(seed_train, f.name)}
    assert changed == {"batch_tokens", "muon_weight_decay", "ema_decay", "ema_start_frac"}
    assert (train.batch_tokens, train.muon_weight_decay, train.ema_decay) == (131_072, 0.15, 0.0)
    assert train.accumulation_steps(1) == 1 and train.accumulation_steps(8) == 1


def test_record_presets_are_the_04_16_stack():
    """record-0416: 35,945,671 parameters (the record's 35.9 M), 17 block runs once the loops are on, the record's
    per-GPU micro-batch; record-1790 differs in the output gate's width only."""
    model, train, _ = resolve_configs("record-0416", env={})
    built = GPT(model, init_weights=False)
    assert sum(p.numel() for p in built.parameters()) == 35_945_671
    assert built.layout.execution == (0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10)
    assert built.skip_weights.shape == built.skip_gates.shape == (8, 512)
    assert (model.vocab_size, model.mlp_mult, model.qk_gain_init, model.smear_gate_width, model.attn_out_gate_width,
            model.parallel_start_layer, model.bos_isolation) == (8192, 4.0, 5.25, 12, 12, 8, False)
    assert (train.batch_tokens, train.micro_tokens(1), train.seq_len, train.warmdown_frac, train.ema_decay,
            train.muon_weight_decay, train.grad_clip_norm) == (786_432, 98_304, 2048, 0.75, 0.9965, 0.095, 0.3)
    assert (train.isolate_documents, train.muon_row_normalize, train.embed_weight_decay, train.scalar_weight_decay,
            train.enable_looping_at) == (True, True, 0.085, 0.02, 0.35)
    assert train.accumulation_steps(1) == 8 and train.accumulation_steps(8) == 1
    model_1790, train_1790, _ = resolve_configs("record-1790", env={})
    assert train_1790 == train
    assert dataclasses.replace(model_1790, attn_out_gate_width=12) == model and model_1790.attn_out_gate_width == 24


def test_sp8192_300s_is_record_0416_with_the_one_gpu_changes():
    record_model, record_train, _ = resolve_configs("record-0416", env={})
    model, train, _ = resolve_configs("sp8192-300s", env={})
    assert model == record_model
    changed = {f.name for f in dataclasses.fields(train) if getattr(train, f.name) != getattr(record_train, f.name)}
    assert changed == {"wallclock_seconds", "batch_tokens", "isolate_documents",
                       "muon_momentum_warmup_frac", "muon_weight_decay", "ema_decay", "gptq_calibration_batches",
                       "gptq_reserve_seconds", "val_every", "log_every"}
    assert (train.batch_tokens, train.accumulation_steps(1), train.wallclock_seconds, train.ema_decay) == \
        (98_304, 1, 300.0, 0.0)


def test_a_preset_builds_on_its_base_key_by_key(tmp_path, monkeypatch):
    import pgolf.config

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "parent.toml").write_text('[model]\nnum_layers = 3\nmodel_dim = 64\n[train]\nseed = 4\n')
    (tmp_path / "train" / "child.toml").write_text('base = "parent"\n[model]\nmodel_dim = 32\n')
    (tmp_path / "train" / "loop.toml").write_text('base = "loop2"\n')
    (tmp_path / "train" / "loop2.toml").write_text('base = "loop"\n')
    (tmp_path / "train" / "orphan.toml").write_text('base = "nowhere"\n')
    monkeypatch.setattr(pgolf.config, "PRESETS", tmp_path)
    assert pgolf.config.load_preset("train", "child") == {"model": {"num_layers": 3, "model_dim": 32},
                                                          "train": {"seed": 4}}
    with pytest.raises(UsageError, match="loop2.toml: base = 'loop' is not another train preset's name"):
        pgolf.config.load_preset("train", "loop")
    with pytest.raises(UsageError, match="unknown train preset 'nowhere'"):
        pgolf.config.load_preset("train", "orphan")


def test_challenge_env_names_and_precedence():
    env = {"ITERATIONS": "77", "NUM_LAYERS": "3", "MAX_WALLCLOCK_SECONDS": "300", "PGOLF_SEED": "5",
           "TRAIN_SEQ_LEN": "2048", "MATRIX_LR": "0.02"}
    model, train, sources = resolve_configs("baseline", env=env, train_overrides={"iterations": 9})
    assert (train.iterations, train.wallclock_seconds, train.seed, train.matrix_lr) == (9, 300.0, 5, 0.02)
    assert model.num_layers == 3 and sources["model.num_layers"] == "env NUM_LAYERS"
    assert model.max_seq_len == 2048  # raised to the training length


def test_config_file_tables_and_errors(tmp_path):
    good = tmp_path / "run.toml"
    good.write_text("[model]\nnum_layers = 4\n[train]\nema_decay = 0.99\n")
    model, train, _ = resolve_configs("tiny", config_file=good, env={})
    assert model.num_layers == 4 and train.ema_decay == 0.99 and train.iterations == 60
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nnum_layers = 4\n")
    with pytest.raises(UsageError, match="bad.toml: unknown table"):
        resolve_configs("tiny", config_file=bad, env={})
    with pytest.raises(UsageError, match="warmdown_frac = 1.5: must be in"):
        resolve_configs("tiny", env={}, train_overrides={"warmdown_frac": 1.5})


def test_record_env_names_set_the_optimizer_and_schedule_fields():
    env = {"MUON_WD": "0.095", "EMBED_WD": "0.085", "ADAM_WD": "0.02", "MIN_LR": "0.05", "WARMDOWN_FRAC": "0.75",
           "ENABLE_LOOPING_AT": "0.35", "MUON_ROW_NORMALIZE": "1"}
    _, train, sources = resolve_configs("baseline", env=env)
    assert (train.muon_weight_decay, train.embed_weight_decay, train.scalar_weight_decay, train.min_lr,
            train.warmdown_frac, train.enable_looping_at, train.muon_row_normalize) == (
        0.095, 0.085, 0.02, 0.05, 0.75, 0.35, True)
    assert sources["train.scalar_weight_decay"] == "env ADAM_WD"
    assert sources["train.muon_row_normalize"] == "env MUON_ROW_NORMALIZE"
    _, polar, _ = resolve_configs("baseline", env={"PGOLF_MUON_NS_COEFFICIENTS": "polar-express"})
    assert polar.muon_ns_coefficients == "polar-express"


def test_record_fields_default_to_todays_behaviour():
    train = TrainConfig()
    assert not train.muon_row_normalize and train.muon_ns_coefficients == "standard"
    assert train.embed_weight_decay == train.scalar_weight_decay == train.min_lr == train.enable_looping_at == 0.0


@pytest.mark.parametrize("changes, message", [
    ({"muon_ns_coefficients": "polar"}, "muon_ns_coefficients = 'polar': must be one of standard, polar-express"),
    ({"muon_ns_coefficients": "polar-express", "muon_backend_steps": 6}, "muon_backend_steps = 6: must be <= 5"),
    ({"embed_weight_decay": -0.1}, "embed_weight_decay = -0.1: must be >= 0"),
    ({"scalar_weight_decay": -1.0}, "scalar_weight_decay = -1.0: must be >= 0"),
    ({"min_lr": 1.5}, "min_lr = 1.5: must be in [0, 1]"),
    ({"enable_looping_at": -0.1}, "enable_looping_at = -0.1: must be in [0, 1]"),
    ({"attention_kernel": "fa3"}, "attention_kernel = 'fa3': must be one of auto, torch, flash, cudnn, efficient"),
    ({"attention_kernel": "flash", "isolate_documents": True}, "attention_kernel = 'flash': must be other than flash"),
])
def test_record_fields_are_validated(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**changes)
