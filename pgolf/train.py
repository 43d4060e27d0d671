"""The train stage: a GPT trained on a shard directory, written as a stage output (checkpoint, logs, manifest).

`pgolf train` and the bundled train_gpt.py both run `train()`. One process, or torchrun's ranks (DDP; the global
batch is the same at any world size): rank 0 writes the output; the caller tears the process group down
(pgolf.dist.finish_distributed).
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgolf.artifacts import StageOutput, file_record, staging_path, up_to_date
from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.checkpoint import save_checkpoint
from pgolf.config import to_dict
from pgolf.dist import PlainLog, init_distributed
from pgolf.errors import InvalidInput, UsageError
from pgolf.gptq import GPTQ_HESSIANS_FILE, save_gptq_hessians
from pgolf.model import ModelConfig
from pgolf.shards import dataset_fingerprint, load_shard, open_dataset, read_header
from pgolf.train_config import TrainConfig
from pgolf.trainer import RESUME_FILE, StopSignal, Trainer, TrainLog


@dataclass
class TrainResult:
    out: Path
    metrics: dict  # steps, tokens, timers, val_loss/val_bpb of the exported weights, ... (the manifest's)


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


def train_model(trainer: Trainer, data: TrainingData, work_dir: Path, *, resume: bool = False, log=PlainLog,
                on_step=None, on_record=None, started: float | None = None) -> dict:
    """Warm up and train (logs and the resumable checkpoint in `work_dir`): the flow `pgolf train` and the bundled
    train_gpt.py share. The metrics carry wall-clock `timers` of this process's phases (the challenge counts
    only train_seconds, but a device call or a job limit pays for all of them) and the exported weights'
    val_loss / val_bpb."""
    started = time.perf_counter() if started is None else started
    config = trainer.config
    resume_path = Path(work_dir) / RESUME_FILE
    train_log = TrainLog(work_dir, trainer.dist.is_main, on_line=log.info, on_record=on_record)
    if resume:
        trainer.load_resume(resume_path)
        if on_step:
            on_step(trainer.step, trainer.train_ms)
        train_log.truncate_after(trainer.step)
        train_log.line(f"resumed at step {trainer.step} ({trainer.train_ms / 1000:.1f}s of training)")
    train_log.line(f"model: {trainer.param_count:,} parameters; world size {trainer.dist.world_size} on "
                   f"{trainer.device}, {trainer.accumulation} micro-batches/step of "
                   f"{config.micro_tokens(trainer.dist.world_size):,} tokens; attention kernel "
                   f"{trainer.attention_kernel}" + (" (auto)" if config.attention_kernel == "auto" else ""))
    graphs = " per graph (depth recurrence off, then on)" if len(trainer.warmup_graphs()) > 1 else ""
    train_log.line(f"warm-up: {config.warmup_steps} steps{graphs} (compile {config.compile}), then restored")
    ready = time.perf_counter()
    trainer.warmup()
    warmed, resumed_ms = time.perf_counter(), trainer.train_ms
    with StopSignal() as stop:
        metrics = trainer.run(data.val_tokens, data.byte_tables.torch(trainer.device), train_log, resume_path,
                              stop, on_step)
    trained_here = (trainer.train_ms - resumed_ms) / 1000.0
    metrics["timers"] = {"setup_seconds": ready - started, "warmup_seconds": warmed - ready,
                         "train_seconds": trained_here,
                         "validation_checkpoint_seconds": max(0.0, time.perf_counter() - warmed - trained_here)}
    exported = metrics.get("ema") or metrics["master"]
    weights = "ema" if "ema" in metrics else "master"
    # The exported weights' score in the digest-covered log too: report reads it from there.
    train_log.record({"event": "final", "step": trainer.step, "weights": weights, **exported})
    metrics |= {"val_loss": exported["val_loss"], "val_bpb": exported["val_bpb"],
                "val_tokens": exported["val_tokens"], "val_bytes": exported["val_bytes"],
                "weights": weights,
                "tokenizer_sha256": data.tokenizer_sha256, "vocab_size": trainer.model_config.vocab_size}
    if config.gptq_calibration_batches:
        metrics["gptq_calibration"] = calibrate_gptq(trainer, metrics, train_log, log)
        metrics["timers"]["gptq_seconds"] = metrics["gptq_calibration"]["seconds"]
    metrics["train_tokens_read"] = trainer.train_tokens_read()
    return metrics


def calibrate_gptq(trainer: Trainer, metrics: dict, train_log: TrainLog, log) -> dict:
    """GPTQ Hessians of the exported weights from the next train batches (trainer.hessians), inside the budget:
    training stopped gptq_reserve_seconds early for them. Warns when they took longer than that."""
    config = trainer.config
    started = time.perf_counter()
    trainer.hessians = trainer.gptq_hessians(exported_state(trainer, metrics))
    seconds = time.perf_counter() - started
    tokens = config.gptq_calibration_batches * config.micro_tokens(trainer.dist.world_size) * trainer.dist.world_size
    train_log.line(f"gptq: Hessians of {len(trainer.hessians)} tensors from {tokens:,} train tokens in "
                   f"{seconds:.2f}s (reserve {config.gptq_reserve_seconds:g}s)")
    if config.wallclock_seconds and seconds > config.gptq_reserve_seconds:
        log.warn(f"gptq calibration took {seconds:.2f}s, over its {config.gptq_reserve_seconds:g}s reserve: "
                 f"training + calibration ran past wallclock_seconds {config.wallclock_seconds:g}")
    return {"batches": config.gptq_calibration_batches, "tokens": tokens, "seconds": seconds,
            "reserve_seconds": config.gptq_reserve_seconds, "weights": metrics["weights"],
            "tensors": len(trainer.hessians)}


def exported_state(trainer: Trainer, metrics: dict, weights: str = "export") -> dict:
    """The weights a train output exports (pgolf.stage_model.TRAIN_WEIGHTS): "export" = the EMA when EMA was on,
    else the master weights; "master" = the master weights."""
    return trainer.ema_state() if metrics["weights"] == "ema" and weights == "export" else trainer.master_state()


def write_train_outputs(stage: StageOutput, trainer: Trainer, data: TrainingData, metrics: dict) -> None:
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
    if trainer.hessians is not None:
        save_gptq_hessians(stage.add_output(GPTQ_HESSIANS_FILE, "gptq_hessians"), trainer.hessians,
                           metrics["gptq_calibration"])
    metrics["timers"]["save_seconds"] = time.perf_counter() - saving
    stage.add_output("train_log.jsonl", "log_jsonl")
    stage.add_output("train.log", "log")
    stage.path(RESUME_FILE).unlink(missing_ok=True)
    stage.inputs = input_records(data, metrics["train_tokens_read"]) + stage.inputs  # + train()'s --config
    stage.metrics = metrics
    stage.finalize()


def train(model_config: ModelConfig, train_config: TrainConfig, data_dir: Path, out: Path, *,
          tokenizer: Path | None = None, resume: bool = False, force: bool = False, preset: str | None = None,
          config_file: Path | None = None, log=PlainLog, on_step=None, on_record=None) -> TrainResult:
    """Train on `data_dir`'s train shards, validate on its val shards, and write `out` (rank 0). `on_step(step,
    train_ms)` follows progress, `on_record(record)` sees each train_log.jsonl record as it is written;
    SIGTERM/SIGINT save a resumable checkpoint in the staging directory and raise TrainingInterrupted (exit
    143/130), which `resume=True` continues. A finished `out` made by this very run (up_to_date) is reported,
    not trained again."""
    if resume and force:
        raise UsageError("--resume and --force contradict each other (--force starts over)")
    started = time.perf_counter()
    data = load_training_data(data_dir, tokenizer, model_config.vocab_size, train_config.seq_len)
    out = Path(out)
    configs = {"preset": preset, "model": to_dict(model_config), "train": to_dict(train_config)}
    inputs = [data_dir, data.tokenizer] + ([config_file] if config_file else [])
    done = up_to_date(out, "train", configs, inputs, force=force, log=log)  # every rank: all return, or none
    if done:
        return TrainResult(out, done["metrics"])
    work_dir = staging_path(out)
    resume_path = work_dir / RESUME_FILE
    if resume and not resume_path.is_file():
        raise UsageError(f"{work_dir}: no resumable checkpoint to continue (run without --resume)")
    if not resume and resume_path.is_file() and not out.exists():
        log.warn(f"{work_dir}: discarding an interrupted run (pass --resume to continue it)")
    dist_info = init_distributed(fast_math=True)
    stage = None
    if dist_info.is_main:  # before the model is built: a second run on this --out fails at once
        stage = StageOutput(out, "train", config=configs, force=force, resume=resume, keep_partial=True,
                            inputs=inputs)
    if dist_info.world_size > 1:
        dist.barrier()
    with stage or nullcontext():
        if stage is not None and config_file:
            stage.add_input(config_file, "config")
        trainer = Trainer(model_config, train_config, data.train, dist_info, data_fingerprint=data.fingerprint)
        metrics = train_model(trainer, data, work_dir, resume=resume, log=log, on_step=on_step, on_record=on_record,
                              started=started)
        if stage is not None:
            write_train_outputs(stage, trainer, data, metrics)
    return TrainResult(out, metrics)
