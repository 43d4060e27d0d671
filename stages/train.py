"""`pgolf train DATA_DIR --preset P --out DIR`: parse, run pgolf.train.train, print.

One process, or `torchrun --nproc_per_node=N -m pgolf train ...` (DDP; the global batch is the same at any N).
"""

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from pgolf import log
from pgolf.errors import UsageError
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, report
from pgolf.train import train as run_train
from pgolf.train_config import COMPILE_MODES, TRAIN_PRESET_KIND, preset_summaries, resolve_configs

EXAMPLE = "pgolf train artifacts/sp1024 --preset seed-11l --wallclock 600 --out artifacts/run1/train"


def list_presets(as_json: bool) -> None:
    """On stdout: the listing is what was asked for (`pgolf train --list-presets | grep seed`)."""
    summaries = preset_summaries()
    if as_json:
        log.emit_json({"kind": TRAIN_PRESET_KIND, "presets": summaries})
        return
    for name, summary in summaries.items():
        typer.echo(f"{name:14s} {summary}")


def progress_bar(unit: str) -> Progress:
    """step/total (or train seconds/wallclock), the last logged loss, tokens/s and ETA; on a terminal only."""
    count = TextColumn(f"{{task.completed:,.0f}}/{{task.total:,.0f}} {unit}")
    figures = TextColumn("loss {task.fields[loss]}  {task.fields[tokens_per_s]:,.0f} tok/s")
    columns = [TextColumn("train"), BarColumn(), count, figures, TimeRemainingColumn()]
    return Progress(*columns, console=log.console, transient=True, disable=not log.progress_enabled())


class TrainProgress:
    """on_step / on_record callbacks of pgolf.train.train drawn on the bar: the loss is the latest written record's
    (records reach the host at log lines, so the device is never waited on for the bar)."""

    def __init__(self, bar: Progress, total: float, use_wallclock: bool, tokens_per_step: int):
        self.bar, self.use_wallclock, self.tokens_per_step = bar, use_wallclock, tokens_per_step
        self.task = bar.add_task("train", total=total, loss="-", tokens_per_s=0.0)
        self.start = None  # (step, train_ms) of the first call: tokens/s over this process's steps

    def on_step(self, step: int, train_ms: float) -> None:
        self.start = self.start or (step, train_ms)
        seconds = (train_ms - self.start[1]) / 1000.0
        tokens_per_s = (step - self.start[0]) * self.tokens_per_step / seconds if seconds > 0 else 0.0
        self.bar.update(self.task, completed=train_ms / 1000.0 if self.use_wallclock else step,
                        tokens_per_s=tokens_per_s)

    def on_record(self, record: dict) -> None:
        if record["event"] == "train":
            self.bar.update(self.task, loss=f"{record['loss']:.4f}")


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
    log_every: int = typer.Option(None, "--log-every", help="A train line (stderr, train.log) every N steps, plus "
                                  "the first and last (0 = about 20 per run); train_log.jsonl has every step."),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every",
                                         help="Resume checkpoint every N steps (0 = on signal only)."),
    compile_mode: str = typer.Option(None, "--compile", help=f"torch.compile: {' | '.join(COMPILE_MODES)}."),
    gptq_batches: int = typer.Option(
        None, "--gptq-calibration-batches", help="After training, save GPTQ Hessians of the exported weights from "
        "this many train micro-batches per rank (quantize then needs no --data; 0 = none)."),
    gptq_reserve: float = typer.Option(
        None, "--gptq-reserve-seconds", help="Stop training this long before --wallclock so the calibration fits "
        "in the budget."),
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
                     log_every=log_every, checkpoint_every=checkpoint_every, compile=compile_mode,
                     gptq_calibration_batches=gptq_batches, gptq_reserve_seconds=gptq_reserve)
    model_config, train_config, _ = resolve_configs(preset, config_file, train_overrides=overrides)
    use_wallclock = train_config.wallclock_seconds > 0
    total = train_config.wallclock_seconds if use_wallclock else train_config.iterations
    with progress_bar("s" if use_wallclock else "steps") as bar:
        progress = TrainProgress(bar, total, use_wallclock, train_config.batch_tokens)
        result = run_train(model_config, train_config, data_dir, out, tokenizer=tokenizer, resume=resume,
                           force=force, preset=preset, config_file=config_file, log=log,
                           on_step=progress.on_step, on_record=progress.on_record)
    report(result.metrics, as_json, summary_lines(result.metrics), out)


def summary_lines(metrics: dict) -> list[str]:
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
    return lines


def register(app: typer.Typer) -> None:
    app.command("train")(train)

