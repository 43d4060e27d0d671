"""`pgolf train DATA_DIR --preset P --out DIR`: train a GPT on a shard directory; write checkpoint and logs.

One process, or `torchrun --nproc_per_node=N -m pgolf train ...` (DDP; the global batch is the same at any N).
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pgolf import log
from pgolf.artifacts import StageOutput, file_record
from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.checkpoint import save_checkpoint
from pgolf.errors import InvalidInput, UsageError
from pgolf.shards import dataset_fingerprint, load_shard, open_dataset, read_header
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, report
from pgolf.train_config import COMPILE_MODES, TRAIN_PRESET_KIND, preset_summaries, resolve_configs
from pgolf.trainer import RESUME_FILE, StopSignal, Trainer, TrainLog, init_distributed

EXAMPLE = "pgolf train artifacts/sp1024 --preset seed-11l --wallclock 600 --out artifacts/run1/train"


@dataclass
class TrainingData:
    """A validated shard directory: its shards, tokenizer, val tokens and byte tables."""

    directory: Path
    train: list[Path]
    val: list[Path]
    tokenizer: Path
    tokenizer_sha256: str
    manifest: dict | None
    val_tokens: torch.Tensor
    byte_tables: object
    fingerprint: str  # pgolf.shards.dataset_fingerprint: what a resumed run must read again


def load_training_data(directory: Path, tokenizer: Path | None, vocab_size: int,
                       seq_len: int) -> TrainingData:
    """Check shards, tokenizer and val split against the configs; a one-line InvalidInput (exit 3) if not."""
    directory = Path(directory)
    dataset = open_dataset(directory, tokenizer)
    if not dataset.train:
        raise InvalidInput(f"{directory}: no train shards (fineweb_train_*.bin)")
    if not dataset.val:
        raise InvalidInput(f"{directory}: no val shards (fineweb_val_*.bin)")
    if dataset.tokenizer is None:
        raise InvalidInput(f"{directory}: no tokenizer (*.model) next to the shards or in ../../tokenizers "
                           f"(pass --tokenizer)")
    sp = load_tokenizer(dataset.tokenizer)
    if sp.GetPieceSize() != vocab_size:
        raise InvalidInput(f"{dataset.tokenizer}: tokenizer has {sp.GetPieceSize()} pieces but the model's "
                           f"vocab_size is {vocab_size} (set [model] vocab_size or VOCAB_SIZE)")
    splits = []
    for path in dataset.val:
        tokens = np.asarray(load_shard(path))
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise InvalidInput(f"{path}: token {int(tokens.max())} >= vocab_size {vocab_size} "
                               f"(shards were made with another tokenizer)")
        splits.append(tokens)
    val = np.concatenate(splits)
    if len(val) < seq_len + 1:
        raise InvalidInput(f"{directory}: the val split has {len(val)} tokens, fewer than seq_len + 1 = "
                           f"{seq_len + 1}")
    return TrainingData(directory, dataset.train, dataset.val, dataset.tokenizer, dataset.tokenizer_sha256(),
                        dataset.manifest, torch.from_numpy(val.astype(np.int32)),
                        build_byte_tables(sp, vocab_size), dataset_fingerprint(dataset))


def input_records(data: TrainingData, train_tokens_read: int) -> list[dict]:
    """Tokenizer, val shards and the train shards training read; digests from the tokenize manifest when there
    is one (open_dataset verified them), else hashed now."""
    known = {}
    for out in (data.manifest or {}).get("outputs", []):
        known[(data.directory / out["path"]).resolve()] = out
    records = []

    def add(path: Path, role: str) -> None:
        resolved = Path(path).resolve()
        if resolved in known:
            records.append({**known[resolved], "path": str(resolved), "role": role})
        else:
            records.append(file_record(path, role))

    add(data.tokenizer, "tokenizer")
    for path in data.val:
        add(path, "val_shard")
    for path in train_shards_read(data.train, train_tokens_read):
        add(path, "train_shard")
    return records


def train_shards_read(paths: list[Path], tokens_read: int) -> list[Path]:
    """The prefix of the (in-order, wrapping) train stream that `tokens_read` tokens touched."""
    used, total = [], 0
    for path in paths:
        if total >= tokens_read:
            break
        used.append(path)
        total += read_header(path)
    return used


def staging_dir(out: Path) -> Path:
    # StageOutput's staging directory; ranks other than 0 read the resume checkpoint from it.
    return out.parent / f".{out.name}.partial"


def list_presets(as_json: bool) -> None:
    """On stdout: the listing is what was asked for (`pgolf train --list-presets | grep seed`)."""
    summaries = preset_summaries()
    if as_json:
        log.emit_json({"kind": TRAIN_PRESET_KIND, "presets": summaries})
        return
    for name, summary in summaries.items():
        typer.echo(f"{name:14s} {summary}")


def progress_bar(total: float, unit: str):
    count = TextColumn(f"{{task.completed:,.0f}}/{{task.total:,.0f}} {unit}")
    columns = [TextColumn("train"), BarColumn(), count, TimeRemainingColumn()]
    return Progress(*columns, console=log.console, transient=True, disable=not log.is_main_process())


def train(
    data_dir: Path = typer.Argument(None, help="Shard directory: `pgolf tokenize` output or fineweb10B_spV."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (written atomically)."),
    preset: str = typer.Option("baseline", "--preset", help="Train preset (see --list-presets)."),
    config_file: Path = typer.Option(None, "--config", help="TOML [model]/[train] over the preset."),
    iterations: int = typer.Option(None, "--iterations", help="Optimizer steps at most."),
    wallclock: float = typer.Option(None, "--wallclock", help="Training-time cap in seconds (0 = none); "
                                    "compile warm-up, validation and checkpoints are not counted."),
    seed: int = typer.Option(None, "--seed", help="Seed of the model init."),
    batch_tokens: int = typer.Option(None, "--batch-tokens", help="Tokens per optimizer step, all ranks."),
    seq_len: int = typer.Option(None, "--seq-len", help="Tokens per training sequence."),
    micro_batch_tokens: int = typer.Option(None, "--micro-batch-tokens",
                                           help="Tokens per rank per forward/backward (0 = batch / 8)."),
    val_every: int = typer.Option(None, "--val-every", help="Validate every N steps (0 = only at the end)."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every",
                                         help="Resume checkpoint every N steps (0 = on signal only)."),
    compile_mode: str = typer.Option(None, "--compile", help=f"torch.compile: {' | '.join(COMPILE_MODES)}."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model (default: found)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of --out."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
    list_only: bool = typer.Option(False, "--list-presets", help="List the train presets and exit."),
):
    """Train a GPT; writes model.safetensors (EMA weights when EMA is on), master.safetensors (with EMA),
    train_log.jsonl, train.log and manifest.json. SIGTERM/SIGINT save a checkpoint that --resume continues.

    Example: pgolf train artifacts/sp1024 --preset seed-11l --wallclock 600 --out artifacts/run1/train
    """
    if list_only:
        list_presets(as_json)
        return
    if data_dir is None or out is None:
        raise UsageError(f"DATA_DIR and --out are required (example: {EXAMPLE})")
    if resume and force:
        raise UsageError("--resume and --force contradict each other (--force starts over)")
    overrides = dict(iterations=iterations, wallclock_seconds=wallclock, seed=seed, batch_tokens=batch_tokens,
                     seq_len=seq_len, micro_batch_tokens=micro_batch_tokens, val_every=val_every,
                     checkpoint_every=checkpoint_every, compile=compile_mode)
    started = time.perf_counter()
    model_config, train_config, _ = resolve_configs(preset, config_file, train_overrides=overrides)
    data = load_training_data(data_dir, tokenizer, model_config.vocab_size, train_config.seq_len)
    out = Path(out)
    resume_path = staging_dir(out) / RESUME_FILE
    if resume and not resume_path.is_file():
        raise UsageError(f"{staging_dir(out)}: no resumable checkpoint to continue (run without --resume)")
    if not resume and resume_path.is_file() and not out.exists():
        log.warn(f"{staging_dir(out)}: discarding an interrupted run (pass --resume to continue it)")

    dist_info = init_distributed()
    trainer = Trainer(model_config, train_config, data.train, dist_info, data_fingerprint=data.fingerprint)
    configs = {"preset": preset, **trainer.configs_json()}
    stage = None
    if dist_info.is_main:
        inputs = [data_dir, data.tokenizer] + ([config_file] if config_file else [])
        stage = StageOutput(out, "train", config=configs, force=force, resume=resume, keep_partial=True,
                            inputs=inputs)
    if dist_info.world_size > 1:
        dist.barrier()
    with stage or nullcontext():
        metrics = run_training(trainer, data, stage, resume, resume_path, staging_dir(out), started)
        if stage is not None:
            write_outputs(stage, trainer, data, metrics)
    if dist_info.world_size > 1:
        dist.barrier()  # tear down together, once rank 0 has written (as in stages/evaluate.py)
        dist.destroy_process_group()
    report(metrics, as_json, summary_lines(metrics, out))


def run_training(trainer: Trainer, data: TrainingData, stage, resume: bool, resume_path: Path,
                 work_dir: Path, started: float) -> dict:
    """Warm up and train; the metrics carry wall-clock `timers` of this process's phases (the challenge counts
    only train_seconds, but a device call or a job limit pays for all of them)."""
    config = trainer.config
    use_wallclock = config.wallclock_seconds > 0
    bar = progress_bar(config.wallclock_seconds if use_wallclock else config.iterations,
                       "s" if use_wallclock else "steps")
    task = bar.add_task("train", total=config.wallclock_seconds if use_wallclock else config.iterations)

    def on_step(step: int, train_ms: float) -> None:
        bar.update(task, completed=train_ms / 1000.0 if use_wallclock else step)

    train_log = TrainLog(work_dir, trainer.dist.is_main, on_line=log.info)
    if resume:
        trainer.load_resume(resume_path)
        bar.update(task, completed=trainer.train_ms / 1000.0 if use_wallclock else trainer.step)
        train_log.truncate_after(trainer.step)
        train_log.line(f"resumed at step {trainer.step} ({trainer.train_ms / 1000:.1f}s of training)")
    train_log.line(f"model: {trainer.param_count:,} parameters; world size {trainer.dist.world_size} on "
                   f"{trainer.device}, {trainer.accumulation} micro-batches/step of "
                   f"{config.micro_tokens(trainer.dist.world_size):,} tokens")
    train_log.line(f"warm-up: {config.warmup_steps} steps (compile {config.compile}), then restored")
    ready = time.perf_counter()
    trainer.warmup()
    warmed, resumed_ms = time.perf_counter(), trainer.train_ms
    with StopSignal() as stop, bar:
        metrics = trainer.run(data.val_tokens, data.byte_tables.torch(trainer.device), train_log, resume_path,
                              stop, on_step)
    trained_here = (trainer.train_ms - resumed_ms) / 1000.0
    metrics["timers"] = {"setup_seconds": ready - started, "warmup_seconds": warmed - ready,
                         "train_seconds": trained_here,
                         "validation_checkpoint_seconds": max(0.0, time.perf_counter() - warmed - trained_here)}
    exported = metrics.get("ema") or metrics["master"]
    metrics |= {"val_loss": exported["val_loss"], "val_bpb": exported["val_bpb"],
                "val_tokens": exported["val_tokens"], "val_bytes": exported["val_bytes"],
                "weights": "ema" if "ema" in metrics else "master",
                "tokenizer_sha256": data.tokenizer_sha256, "vocab_size": trainer.model_config.vocab_size,
                "train_tokens_read": trainer.train_tokens_read()}
    return metrics


def write_outputs(stage: StageOutput, trainer: Trainer, data: TrainingData, metrics: dict) -> None:
    if not all(math.isfinite(metrics[key]) for key in ("val_loss", "val_bpb")):
        raise InvalidInput(f"{stage.out}: training diverged (val_loss {metrics['val_loss']} after "
                           f"{metrics['steps']} steps); nothing written, the logs are in {stage.dir}")
    saving = time.perf_counter()
    checkpoint_metadata = {"vocab_size": str(trainer.model_config.vocab_size),
                           "tokenizer_sha256": data.tokenizer_sha256, "step": str(metrics["steps"])}
    if metrics["weights"] == "ema":
        save_checkpoint(stage.add_output("model.safetensors", "checkpoint"), trainer.ema_state(),
                        trainer.model_config, checkpoint_metadata | {"weights": "ema"})
        save_checkpoint(stage.add_output("master.safetensors", "checkpoint_master"), trainer.master_state(),
                        trainer.model_config, checkpoint_metadata | {"weights": "master"})
    else:
        save_checkpoint(stage.add_output("model.safetensors", "checkpoint"), trainer.master_state(),
                        trainer.model_config, checkpoint_metadata | {"weights": "master"})
    metrics["timers"]["save_seconds"] = time.perf_counter() - saving
    stage.add_output("train_log.jsonl", "log_jsonl")
    stage.add_output("train.log", "log")
    stage.path(RESUME_FILE).unlink(missing_ok=True)
    stage.inputs = input_records(data, metrics["train_tokens_read"])
    stage.metrics = metrics
    stage.finalize()


def summary_lines(metrics: dict, out: Path) -> list[str]:
    lines = [f"{metrics['steps']:,} steps ({metrics['stop_reason']}), {metrics['tokens_seen']:,} tokens, "
             f"{metrics['train_seconds']:.1f}s training, {metrics['ms_per_step']:.1f} ms/step",
             f"val_loss {metrics['val_loss']:.4f}  val_bpb {metrics['val_bpb']:.4f} "
             f"({metrics['weights']} weights)"]
    if metrics["weights"] == "ema":
        lines.append(f"master weights: val_loss {metrics['master']['val_loss']:.4f}  "
                     f"val_bpb {metrics['master']['val_bpb']:.4f}")
    timers = metrics["timers"]
    lines.append(f"timers: setup {timers['setup_seconds']:.1f} s, compile warm-up {timers['warmup_seconds']:.1f} s, "
                 f"training {timers['train_seconds']:.1f} s, validation + checkpoints "
                 f"{timers['validation_checkpoint_seconds']:.1f} s, save {timers.get('save_seconds', 0.0):.1f} s")
    lines.append(f"{out}: model.safetensors, train_log.jsonl, train.log, manifest.json")
    return lines


def register(app: typer.Typer) -> None:
    app.command("train")(train)

