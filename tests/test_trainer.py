"""pgolf.trainer on its own: the CUDA dtypes, budget-aware schedules (fractions, wallclock-aware warm-down, the lr
floor, EMA and QAT switches), the resumable train log and resume checkpoints, and the depth-recurrence switch in
tiny CPU runs (where it happens, what the log and metrics say, the compile warm-up of both graphs, resume across
it)."""

import contextlib
import dataclasses
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.dist import init_distributed
from pgolf.errors import UsageError
from pgolf.model import GPT, ModelConfig
from pgolf.shards import list_shards, load_split
from pgolf.train_config import TrainConfig, resolve_configs
from pgolf.trainer import (
    RESUME_FILE,
    Schedule,
    StopSignal,
    Trainer,
    TrainingInterrupted,
    TrainLog,
    bf16_training_dtypes,
)
from tests.demo_data import TOKENIZER_NAME


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




# ---- the 04-16 record's lr floor ------------------------------------------------------------------------


def test_min_lr_floors_the_warmdown_like_the_record():
    """The record's multiplier: 1 before the warm-down, then max((1 - progress) / warmdown_frac, min_lr)."""
    iterations, warmdown_frac, min_lr = 200, 0.4, 0.15
    floored = Schedule(TrainConfig(wallclock_seconds=0, iterations=iterations, warmdown_iters=0,
                                   warmdown_frac=warmdown_frac, min_lr=min_lr))
    for step in range(iterations + 1):
        progress = step / iterations
        expected = max((1 - progress) / warmdown_frac, min_lr) if progress >= 1 - warmdown_frac else 1.0
        assert floored.lr_scale(step, 0.0) == pytest.approx(expected, abs=1e-12), step
    plain = Schedule(TrainConfig(wallclock_seconds=0, iterations=iterations, warmdown_frac=warmdown_frac))
    steps = (0, 120, 150, 180, 194, 200)
    assert [floored.lr_scale(s, 0.0) for s in steps] == pytest.approx([1.0, 1.0, 0.625, 0.25, 0.15, 0.15])
    assert [plain.lr_scale(s, 0.0) for s in steps] == pytest.approx([1.0, 1.0, 0.625, 0.25, 0.075, 0.0])
    # Under the challenge's step warm-down the same floor holds, and so it does under a wallclock cap.
    by_steps = Schedule(TrainConfig(wallclock_seconds=0, iterations=1000, warmdown_iters=200, min_lr=0.25))
    assert [by_steps.lr_scale(s, 0.0) for s in (0, 800, 900, 950, 1000)] == [1.0, 1.0, 0.5, 0.25, 0.25]
    capped = Schedule(TrainConfig(wallclock_seconds=300, warmdown_iters=100, min_lr=0.25))
    assert capped.lr_scale(1000, 100_000) == 1.0 and capped.lr_scale(2990, 299_000) == 0.25


# ---- depth recurrence: the looping switch in real tiny runs ---------------------------------------------

LOOPED_MODEL = dict(num_loops=1, loop_start=0, loop_end=1)  # the tiny preset's 2 blocks run twice when looping


def looping_trainer(data_dir: Path, model_changes: dict | None = None, **train_changes) -> Trainer:
    """The tiny preset (4 micro-batches a step), 8 steps, the loops from half the budget on, no periodic work."""
    train = dict(iterations=8, enable_looping_at=0.5, val_every=0, checkpoint_every=0, warmup_steps=1) | train_changes
    model_config, train_config, _ = resolve_configs("tiny", env={}, model_overrides=model_changes or LOOPED_MODEL,
                                                    train_overrides=train)
    return Trainer(model_config, train_config, list_shards(data_dir, "train"), init_distributed())


def val_inputs(data_dir: Path):
    val_tokens = torch.from_numpy(load_split(list_shards(data_dir, "val"))[:2049].astype(np.int32))
    return val_tokens, build_byte_tables(load_tokenizer(data_dir / TOKENIZER_NAME)).torch()


def jsonl(directory: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (directory / "train_log.jsonl").read_text().splitlines())
            if r["event"] == event]


def test_looping_switches_on_at_its_budget_fraction_in_a_real_run(tiny_data_dir, tmp_path):
    trainer = looping_trainer(tiny_data_dir)
    assert not trainer.model.looping and trainer.looping_enabled_step is None
    first_block_runs = []
    trainer.model.blocks[0].register_forward_hook(lambda *_: first_block_runs.append(1))
    runs_per_step = []

    def on_step(step: int, train_ms: float) -> None:
        runs_per_step.append(len(first_block_runs) - sum(runs_per_step))

    trainer.warmup()
    assert not trainer.model.looping  # warm-up ran both graphs, then put the switch back
    first_block_runs.clear()
    result = trainer.run(*val_inputs(tiny_data_dir), TrainLog(tmp_path, enabled=True), tmp_path / RESUME_FILE,
                         StopSignal(), on_step)
    # 4 steps of 4 micro-batches running block 0 once, then 4 running it twice (blocks 0 1 0 1).
    assert runs_per_step == [4] * 4 + [8] * 4
    assert [r["looping"] for r in jsonl(tmp_path, "train")] == [False] * 4 + [True] * 4
    (event,) = jsonl(tmp_path, "looping")
    assert (event["step"], event["progress"]) == (4, 0.5)
    assert result["looping_enabled_step"] == 4 and trainer.model.looping
    assert "step 4: depth recurrence on at progress 0.500" in (tmp_path / "train.log").read_text()


def test_a_budget_ending_before_the_switch_validates_and_exports_the_looped_model(tiny_data_dir, tmp_path):
    trainer = looping_trainer(tiny_data_dir, iterations=4, enable_looping_at=0.9, warmup_steps=0)
    val_tokens, tables = val_inputs(tiny_data_dir)
    result = trainer.run(val_tokens, tables, TrainLog(tmp_path, enabled=True), tmp_path / RESUME_FILE, StopSignal())
    assert [r["looping"] for r in jsonl(tmp_path, "train")] == [False] * 4
    (event,) = jsonl(tmp_path, "looping")
    assert event["step"] == 4 and result["looping_enabled_step"] == 4
    assert "the budget ended first" in (tmp_path / "train.log").read_text()
    assert trainer.validate(val_tokens, tables) == result["master"]  # the final score is the looped model's
    trainer.model.looping = False
    assert trainer.validate(val_tokens, tables)["val_loss"] != result["master"]["val_loss"]


def test_without_loops_the_switch_is_inert(tiny_data_dir, tmp_path):
    trainer = looping_trainer(tiny_data_dir, model_changes={"num_loops": 0}, iterations=3)
    result = trainer.run(*val_inputs(tiny_data_dir), TrainLog(tmp_path, enabled=True), tmp_path / RESUME_FILE,
                         StopSignal())
    assert trainer.model.looping and "looping_enabled_step" not in result
    assert not jsonl(tmp_path, "looping") and all("looping" not in r for r in jsonl(tmp_path, "train"))


def test_warmup_compiles_both_graphs_so_the_switch_does_not_recompile(tiny_data_dir, tmp_path):
    torch._dynamo.reset()
    trainer = looping_trainer(tiny_data_dir, compile="aot_eager", iterations=4)
    start = {name: t.clone() for name, t in trainer.model.state_dict().items()}
    trainer.warmup()
    assert not trainer.model.looping
    assert all(torch.equal(t, start[name]) for name, t in trainer.model.state_dict().items())
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = trainer.run(*val_inputs(tiny_data_dir), TrainLog(tmp_path, enabled=True), tmp_path / RESUME_FILE,
                             StopSignal())
    assert result["looping_enabled_step"] == 2
    # The switch is a guarded attribute: a graph warm-up did not build would be compiled (here: refused).
    torch._dynamo.reset()  # GPT.forward's graphs serve any GPT of the same config: start from none
    looped_only = looping_trainer(tiny_data_dir, compile="aot_eager", iterations=4, enable_looping_at=0.0)
    looped_only.warmup()
    looped_only.model.looping = False
    x, y = looped_only.loader.next_batch()
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="[Rr]ecompil"):
        looped_only.compiled(x, y)
    torch._dynamo.reset()


def train_losses(directory: Path) -> list[float]:
    return [r["loss"] for r in jsonl(directory, "train")]


@pytest.fixture(scope="module")
def uninterrupted_looping_run(tiny_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = looping_trainer(tiny_data_dir).run(*val_inputs(tiny_data_dir), TrainLog(directory, enabled=True),
                                                directory / RESUME_FILE, StopSignal())
    return directory, result


@pytest.mark.parametrize("interrupted_at", [2, 4, 6])
def test_resume_across_the_switch_matches_an_uninterrupted_run(tiny_data_dir, tmp_path, uninterrupted_looping_run,
                                                               interrupted_at):
    """The switch happens before step 5 (progress 4/8); a checkpoint at step 4 is written just before it."""
    reference, expected = uninterrupted_looping_run
    val_tokens, tables = val_inputs(tiny_data_dir)
    work = tmp_path
    first, stop = looping_trainer(tiny_data_dir), StopSignal()

    def signal_before(step: int, train_ms: float) -> None:  # seen at the next step, which checkpoints and stops
        if step == interrupted_at - 1:
            stop.signum = signal.SIGTERM

    with pytest.raises(TrainingInterrupted):
        first.run(val_tokens, tables, TrainLog(work, enabled=True), work / RESUME_FILE, stop, signal_before)
    assert first.step == interrupted_at
    resumed = looping_trainer(tiny_data_dir)
    resumed.load_resume(work / RESUME_FILE)
    assert resumed.model.looping == (interrupted_at > 4)
    assert resumed.looping_enabled_step == (4 if interrupted_at > 4 else None)
    log = TrainLog(work, enabled=True)
    log.truncate_after(resumed.step)
    resumed.warmup()
    assert resumed.model.looping == (interrupted_at > 4)
    result = resumed.run(val_tokens, tables, log, work / RESUME_FILE, StopSignal())
    assert result["looping_enabled_step"] == expected["looping_enabled_step"] == 4
    assert [r["step"] for r in jsonl(work, "looping")] == [4]
    assert [r["step"] for r in jsonl(work, "train")] == list(range(1, 9))
    assert train_losses(work) == pytest.approx(train_losses(reference), rel=1e-6)
    assert result["master"]["val_loss"] == pytest.approx(expected["master"]["val_loss"], rel=1e-6)


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


def test_attention_kernel_restricts_sdpa_on_cuda_only():
    from pgolf.model import attention_kernels

    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.cudnn_sdp_enabled,
             torch.backends.cuda.mem_efficient_sdp_enabled)
    before = [flag() for flag in flags]
    caches = lambda: torch.compiler.config.cache_key_tag  # noqa: E731
    caches_before = caches()
    with attention_kernels("cudnn", torch.device("cuda")):
        assert [flag() for flag in flags] == [False, True, False]
        # a compile cache keyed without the kernel would serve another kernel's graph (pytorch#185449)
        assert caches() == (f"{caches_before}|" if caches_before else "") + "pgolf-sdpa-cudnn"
    assert caches() == caches_before
    with attention_kernels("efficient", torch.device("cuda")):
        assert [flag() for flag in flags] == [False, False, True]
    for name, device in (("auto", "cuda"), ("torch", "cuda"), ("cudnn", "cpu")):
        with attention_kernels(name, torch.device(device)):
            assert [flag() for flag in flags] == before and caches() == caches_before
    assert [flag() for flag in flags] == before


def test_a_compile_cache_scope_keeps_its_graphs_to_itself(tmp_path):
    """Graphs compiled inside compile_cache_scope(tag) are served from torch.compile's on-disk caches to the same
    tag only: a rerun under the tag hits them, a compile under another tag (another forced SDPA kernel) or
    none compiles afresh, and a tag already set by the user stays part of the key."""
    import torch._functorch.config as aot_config
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    from pgolf.model import compile_cache_scope

    def step(x):
        return (torch.relu(x) * 2 + 1).sum()

    x = torch.linspace(-1, 1, 64, requires_grad=True)

    def compiled_under(tag: str | None) -> tuple[int, int]:
        """(FX graph cache hits, AOTAutograd cache hits) of one fresh compile of `step`, forward and backward."""
        torch._dynamo.reset()
        counters.clear()
        with compile_cache_scope(tag) if tag else contextlib.nullcontext():
            torch.compile(step)(x).backward()
        return counters["inductor"]["fxgraph_cache_hit"], counters["aot_autograd"]["autograd_cache_hit"]

    with temporary_cache_dir(str(tmp_path)), inductor_config.patch(fx_graph_cache=True), \
            aot_config.patch(enable_autograd_cache=True):
        assert compiled_under("pgolf-sdpa-cudnn") == (0, 0)
        assert compiled_under("pgolf-sdpa-cudnn")[1] == 1  # served whole from the cache
        assert compiled_under("pgolf-sdpa-flash") == (0, 0)
        assert compiled_under(None) == (0, 0)
        with torch.compiler.config.patch(cache_key_tag="user"):
            assert compiled_under("pgolf-sdpa-cudnn") == (0, 0)
            assert torch.compiler.config.cache_key_tag == "user"
    torch._dynamo.reset()


def test_an_attention_kernel_that_cannot_run_the_model_is_named_before_training():
    """The probe forces the kernel on any device: on CPU torch has no cuDNN or memory-efficient SDPA kernel (the
    refusal names the kernel, the model's heads and torch's reason), and its own flash kernel runs GQA. The
    trainer asks only on CUDA, where attention_kernels forces the kernel."""
    from pgolf.model import attention_kernel_problem, require_attention_kernel

    config = ModelConfig(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2)
    cpu = torch.device("cpu")
    assert attention_kernel_problem("auto", config, cpu, torch.float32) is None
    assert attention_kernel_problem("flash", config, cpu, torch.float32) is None
    problem = attention_kernel_problem("cudnn", config, cpu, torch.float32)
    assert problem.startswith(f"torch {torch.__version__} has no CUDNN_ATTENTION kernel for this model's attention "
                              "(4 query / 2 key-value heads of 16, torch.float32) on cpu: ")
    assert "EFFICIENT_ATTENTION" in attention_kernel_problem("efficient", config, cpu, torch.float32)
    require_attention_kernel("attention_kernel", "cudnn", config, cpu)  # not forced on CPU: nothing to refuse


def test_auto_picks_cudnn_only_where_it_runs_mask_free_causal_attention():
    """"auto" is cuDNN on CUDA for training without document masks when the probe passes; on a device where it is
    not forced (CPU) or with isolate_documents it is torch's own pick; a named kernel stays as it is (refused on
    CUDA when it cannot run, as above)."""
    from pgolf.model import attention_kernel_problem, pick_attention_kernel

    config = ModelConfig(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2)
    cpu = torch.device("cpu")
    assert pick_attention_kernel("attention_kernel", "auto", config, cpu, masked=False) == "torch"
    assert pick_attention_kernel("attention_kernel", "auto", config, cpu, masked=True) == "torch"
    for name in ("torch", "flash", "cudnn", "efficient"):
        assert pick_attention_kernel("attention_kernel", name, config, cpu, masked=False) == name
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs = attention_kernel_problem("cudnn", config, cuda, torch.bfloat16) is None
        assert pick_attention_kernel("attention_kernel", "auto", config, cuda, masked=False) == \
            ("cudnn" if runs else "torch")
        assert pick_attention_kernel("attention_kernel", "auto", config, cuda, masked=True) == "torch"
