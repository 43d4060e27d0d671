"""Pieces of `pgolf train` on their own: Muon and the optimizer groups, budget-aware schedules, the train
token stream, and config resolution (presets, challenge env aliases, validation)."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from pgolf.errors import InvalidInput, UsageError
from pgolf.model import GPT, ModelConfig, param_groups
from pgolf.optim import Muon, build_optimizers, zeropower_via_newtonschulz5
from pgolf.shards import write_shard
from pgolf.train_config import TrainConfig, resolve_configs
from pgolf.train_loader import TokenStream, TrainLoader
from pgolf.trainer import Schedule, TrainLog, bf16_training_dtypes

# ---- Muon and the optimizer groups ---------------------------------------------------------------


def test_newton_schulz_batches_match_one_matrix_at_a_time_and_orthogonalize():
    torch.manual_seed(0)
    stack = torch.randn(3, 64, 32)
    batched = zeropower_via_newtonschulz5(stack, steps=5)
    for matrix, result in zip(stack, batched, strict=True):
        assert torch.equal(zeropower_via_newtonschulz5(matrix[None], steps=5)[0], result)
    assert batched.dtype == torch.bfloat16 and batched.shape == stack.shape
    # The quintic iteration pushes every singular value into roughly [0.7, 1.2] (not exactly 1, by design).
    singular = torch.linalg.svdvals(batched.float())
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert torch.linalg.svdvals(stack).max() / torch.linalg.svdvals(stack).min() > 3


def test_muon_step_is_nesterov_momentum_then_scaled_orthogonal_update_with_decoupled_decay():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 16))
    start = weight.detach().clone()
    grads = [torch.randn(48, 16) for _ in range(2)]
    lr, momentum, decay = 0.05, 0.9, 0.1
    muon = Muon([weight], lr=lr, momentum=momentum, weight_decay=decay)
    expected, buffer = start.clone(), torch.zeros_like(start)
    for grad in grads:
        weight.grad = grad.clone()
        muon.step()
        buffer = momentum * buffer + grad
        # Scaled in bf16 (as Muon does), then applied in the parameter's dtype.
        orthogonal = zeropower_via_newtonschulz5((grad + momentum * buffer)[None])[0]
        update = (orthogonal * math.sqrt(48 / 16)).float()
        expected = expected * (1 - lr * decay) - lr * update
    assert torch.allclose(weight.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_equals_one_matrix_at_a_time_bit_for_bit(nesterov):
    """Same-shape matrices share one stacked Newton-Schulz batch; the result must not depend on that."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (48, 16), (32, 32), (48, 16)]
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    expected = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in expected]
    lr, momentum, decay = 0.05, 0.9, 0.1
    muon = Muon(params, lr=lr, momentum=momentum, weight_decay=decay, nesterov=nesterov)
    for _ in range(3):
        grads = [torch.randn(*shape) for shape in shapes]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        muon.step()
        for i, (grad, (rows, cols)) in enumerate(zip(grads, shapes, strict=True)):
            buffers[i] = buffers[i] * momentum + grad
            direction = torch.add(grad, buffers[i], alpha=momentum) if nesterov else buffers[i]
            update = zeropower_via_newtonschulz5(direction[None])[0] * max(1.0, rows / cols) ** 0.5
            expected[i] = torch.add(expected[i] * (1 - lr * decay), update.float(), alpha=-lr)
    for param, want in zip(params, expected, strict=True):
        assert torch.equal(param.detach(), want)


def test_optimizer_groups_cover_every_parameter_once_with_the_baselines_rates():
    model = GPT(ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    optimizers = build_optimizers(model, TrainConfig(), fused=False)
    seen = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    adam_embed, muon, adam_scalar = optimizers
    assert isinstance(muon, Muon) and muon.param_groups[0]["lr"] == 0.04 == muon.param_groups[0]["base_lr"]
    assert muon.param_groups[0]["params"] == param_groups(model)["matrix"]
    assert adam_embed.param_groups[0]["lr"] == 0.05 and adam_scalar.param_groups[0]["lr"] == 0.04
    assert adam_embed.param_groups[0]["betas"] == (0.9, 0.95) and adam_embed.param_groups[0]["eps"] == 1e-8
    untied = GPT(ModelConfig(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2, tie_embeddings=False))
    rates = [opt.param_groups[0]["lr"] for opt in build_optimizers(untied, TrainConfig(), fused=False)]
    assert rates == [0.6, 0.008, 0.04, 0.04]


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


# ---- the train token stream ----------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path):
    stream = np.arange(2, 2 + 2600, dtype=np.uint16) % 1000
    paths = [tmp_path / f"fineweb_train_{i:06d}.bin" for i in range(3)]
    for path, part in zip(paths, np.split(stream, [1000, 1700]), strict=True):
        write_shard(path, part)
    return paths, stream.astype(np.int64)


def test_stream_reads_shards_in_order_wraps_and_resumes_from_its_position(shards):
    paths, expected = shards
    stream = TokenStream(paths, vocab_size=1024)
    assert np.array_equal(stream.take(1500), expected[:1500])
    position = stream.position
    assert position == (1, 500)
    rest = stream.take(1500)
    assert np.array_equal(rest, np.concatenate([expected[1500:], expected[:400]]))
    assert np.array_equal(TokenStream(paths, 1024, position).take(1500), rest)


def test_loader_slices_ranks_like_the_challenge(shards):
    paths, expected = shards
    seq_len, local = 4, 8
    single = TrainLoader(paths, 1024, seq_len, local, rank=0, world_size=1, device="cpu")
    ranks = [TrainLoader(paths, 1024, seq_len, local, rank=r, world_size=2, device="cpu") for r in range(2)]
    for _ in range(3):
        per_rank = [loader.next_batch() for loader in ranks]
        for rank in range(2):
            x, y = single.next_batch()
            assert torch.equal(per_rank[rank][0], x) and torch.equal(per_rank[rank][1], y)
    x, y = TrainLoader(paths, 1024, seq_len, local, 0, 1, "cpu").next_batch()
    assert x.shape == (2, 4) and x.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.from_numpy(expected[:8])) and torch.equal(y.flatten(),
                                                                                  torch.from_numpy(expected[1:9]))
    assert single.position == (0, 6 * 9)


def test_stream_refuses_tokens_outside_the_vocab(shards):
    paths, _ = shards
    with pytest.raises(InvalidInput, match=f"{paths[0]}: token 999 at position 997 >= model vocab_size 999"):
        TokenStream(paths, vocab_size=999)
    with pytest.raises(InvalidInput, match="no train shards"):
        TokenStream([], vocab_size=1024)


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


# ---- configs -------------------------------------------------------------------------------------


def test_baseline_preset_is_the_challenge_configuration():
    model, train, _ = resolve_configs("baseline", env={})
    assert model == ModelConfig()
    assert train == TrainConfig()
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
