"""`pgolf eval ARTIFACT --data SHARD_DIR`: exact val_loss / val_bpb of a train, quantize or compress output.

One process, or `torchrun --nproc_per_node=N -m pgolf eval ...`: each rank scores a contiguous share of the
windows and the float64 sums are all-reduced; n-gram counts are fast-forwarded over the earlier ranks' tokens
so every rank mixes exactly as one process would; TTT runs on rank 0 alone (its weights depend on every
earlier chunk, so the order cannot be split).
"""

import contextlib
import dataclasses
import datetime
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import typer

from pgolf import log
from pgolf.artifacts import MANIFEST, StageOutput, atomic_write_json, sha256_json
from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.compliance import check_eval, require
from pgolf.config import resolve, to_dict
from pgolf.errors import ComplianceError, InvalidInput, UsageError
from pgolf.model import build_model
from pgolf.scoring import EvalConfig, EvalModel, EvalPlan, ngram_name, score_stream, warm_up
from pgolf.shards import BOS_ID, load_split, open_dataset
from pgolf.stage_model import load_stage_model
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, report
from pgolf.ttt import TTTConfig

PROGRESS_SECONDS = 15.0
TTT_ENV_PREFIX = "PGOLF_TTT_"  # TTT settings from the environment: PGOLF_TTT_LR=... (PGOLF_LR is training's)


def init_device(choice: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); under torchrun one CUDA device per local rank, NCCL (gloo on the CPU)."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if choice not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {choice}: must be auto, cpu or cuda")
    use_cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        # Ranks > 0 wait in a collective while rank 0 alone runs TTT or the compliance check: allow an hour.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=1))
    return device, rank, world_size


def open_val_data(data: Path, tokenizer: Path | None):
    """The dataset, its val shards (and tokenizer) digest-checked against a tokenize manifest when it has one."""
    dataset = open_dataset(data, tokenizer, verify=("val",))
    if not dataset.val:
        raise InvalidInput(f"{data}: no val shards (fineweb_val_*.bin)")
    if dataset.tokenizer is None:
        raise InvalidInput(f"{data}: no tokenizer (*.model) next to the shards or in ../../tokenizers "
                           f"(pass --tokenizer)")
    return dataset


def default_out(artifact: Path, config: EvalConfig, ttt_settings, weights: str, data: Path,
                tokenizer: Path | None) -> Path:
    """`eval-<mode>[...]-<digest>` beside ARTIFACT: one directory per mode and settings, so evaluations of one
    artifact never collide (the digest covers every setting, the name shows the main ones)."""
    parts = ["eval", f"sliding{config.sliding_stride}" if config.sliding_stride else "flat"]
    if config.seq_len:
        parts.append(f"seq{config.seq_len}")
    if config.doc_isolated:
        parts.append("doc")
    if config.ngram_order:
        parts.append("ngram" + "_".join(map(str, config.ngram_order)) + "-a" + "_".join(f"{a:g}" for a in
                                                                                        config.alpha))
        if config.alpha_mode != "fixed":
            parts.append(config.alpha_mode)
    if ttt_settings is not None:
        parts.append(f"ttt-{ttt_settings.mode}")
    if weights != "export":
        parts.append(weights)
    settings = {"eval": to_dict(config), "ttt": to_dict(ttt_settings) if ttt_settings else None,
                "weights": weights, "data": str(Path(data).resolve()),
                "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None}
    return Path(artifact).parent / ("-".join(parts) + "-" + sha256_json(settings)[:8])


def load_val_tokens(dataset, vocab_size: int) -> np.ndarray:
    """All val shards concatenated; refuses ids the model cannot embed."""
    tokens = load_split(dataset.val)
    if len(tokens) < 2:
        raise InvalidInput(f"{dataset.val[0]}: the val split has {len(tokens)} tokens, nothing to score")
    if int(tokens.max()) >= vocab_size:
        raise InvalidInput(f"{dataset.directory}: val token {int(tokens.max())} >= the model's vocab_size "
                           f"{vocab_size} (shards made with another tokenizer)")
    if tokens[0] != BOS_ID:
        log.warn(f"{dataset.val[0]}: the val stream starts with token {int(tokens[0])}, not BOS")
    return tokens


def compliance_tokens(dataset, count: int, val: np.ndarray) -> tuple[np.ndarray, str]:
    """A prefix for the compliance check: training tokens when there are any (the check never needs val)."""
    if dataset.train:
        train = load_split(dataset.train[:1])
        if len(train) >= count:
            return np.asarray(train[:count], dtype=np.int64), "train"
    return np.asarray(val[:count], dtype=np.int64), "val"


def resolve_ttt(enabled: bool, config_file: Path | None, overrides: dict) -> TTTConfig | None:
    given = {key: value for key, value in overrides.items() if value is not None}
    if not enabled:
        if given or config_file:
            flags = ", ".join(f"--ttt-{key.replace('_', '-')}" for key in given) or "--ttt-config"
            raise UsageError(f"{flags} given without --ttt")
        return None
    config, _ = resolve(TTTConfig, kind="ttt", config_file=config_file, env_prefix=TTT_ENV_PREFIX, overrides=given)
    return config


def sweep_rows(totals: dict, grid) -> list[dict]:
    """One row per grid point, best (lowest val_bpb) first."""
    rows = []
    for config in grid:
        point = totals[ngram_name(config)]
        rows.append({"order": config.order, "alpha": config.alpha, "alpha_mode": config.alpha_mode,
                     "buckets": config.buckets, "val_loss": point.val_loss, "val_bpb": point.val_bpb})
    return sorted(rows, key=lambda row: row["val_bpb"])


def progress_logger(started: float):
    last = [started]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] < PROGRESS_SECONDS:
            return
        last[0] = now
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate else float("inf")
        log.info(f"scored {done:,}/{total:,} targets on this rank, {rate:,.0f} tokens/s, ETA {eta:,.0f} s")

    return progress


def evaluate(
    artifact: Path = typer.Argument(..., help="A `pgolf train`, `quantize` or `compress` output directory."),
    data: Path = typer.Option(..., "--data", help="Shard directory with fineweb_val_*.bin."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="SentencePiece model (default: by the shards)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: eval-<mode>-...-<settings digest> "
                             "beside ARTIFACT)."),
    weights: str = typer.Option(
        "export", "--weights", help="A train output's weights: export (the EMA when on) or master."),
    seq_len: int = typer.Option(None, "--seq-len", help="Window length (default: model max_seq_len)."),
    sliding_stride: int = typer.Option(
        None, "--sliding-stride", help="Targets scored per window after the first (default: flat)."),
    doc_isolated: bool = typer.Option(
        None, "--doc-isolated/--no-doc-isolated", help="Never read context from before a target's document."),
    batch_seqs: int = typer.Option(None, "--batch-seqs", help="Windows per forward pass (default 32)."),
    compile_model: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile on CUDA."),
    ngram_order: str = typer.Option(
        None, "--ngram-order", help="N-gram cache order(s), e.g. 7 or 3,5,7 (a list sweeps the grid)."),
    alpha: str = typer.Option(None, "--alpha", help="N-gram weight(s), e.g. 0.4 or 0.2,0.4 (default 0.4)."),
    alpha_mode: str = typer.Option(None, "--alpha-mode", help="fixed, or entropy (alpha is the ceiling)."),
    ngram_buckets: int = typer.Option(None, "--ngram-buckets", help="Hashed context rows per order (65536)."),
    ttt: bool = typer.Option(None, "--ttt/--no-ttt", help="Score-first test-time training."),
    ttt_mode: str = typer.Option(None, "--ttt-mode", help="sgd, adamw, lora or phased (default sgd)."),
    ttt_lr: float = typer.Option(None, "--ttt-lr", help="TTT learning rate (default per mode)."),
    ttt_epochs: int = typer.Option(None, "--ttt-epochs", help="Passes over each scored chunk."),
    ttt_chunk_tokens: int = typer.Option(None, "--ttt-chunk-tokens", help="Targets scored per TTT update."),
    ttt_config: Path = typer.Option(None, "--ttt-config", help="TOML of further TTT settings (pgolf.ttt)."),
    check_compliance: bool = typer.Option(
        False, "--check-compliance", help="Check C1-C4 on a float64 CPU copy first; exit 5 on a failure."),
    device_choice: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    config_file: Path = typer.Option(None, "--config", help="TOML file of eval settings."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Exact val_loss and val_bpb of an artifact: flat, sliding-window or document-isolated windows, with an
    optional n-gram cache (lists sweep the grid from one model pass) and score-first TTT.

    Exit codes: 2 bad flags (or --seq-len over the model's max_seq_len), 3 bad artifact or data (digests,
    missing val shards, tokenizer/vocab mismatch), 5 a compliance check failed.

    Example: pgolf eval artifacts/run1/blob --data artifacts/sp1024 --sliding-stride 64 --ngram-order 7
    """
    if alpha is not None and not ngram_order:
        raise UsageError("--alpha needs --ngram-order (it weights the n-gram cache)")
    config, _ = resolve(EvalConfig, kind="eval", config_file=config_file, overrides={
        "seq_len": seq_len, "sliding_stride": sliding_stride, "doc_isolated": doc_isolated,
        "batch_seqs": batch_seqs, "compile": compile_model, "ngram_order": ngram_order, "alpha": alpha,
        "alpha_mode": alpha_mode, "ngram_buckets": ngram_buckets, "ttt": ttt})
    ttt_flags = {"mode": ttt_mode, "lr": ttt_lr, "epochs": ttt_epochs, "chunk_tokens": ttt_chunk_tokens}
    ttt_settings = resolve_ttt(config.ttt, ttt_config, ttt_flags)
    out = Path(out) if out else default_out(artifact, config, ttt_settings, weights, data, tokenizer)
    resolved = {"eval": to_dict(config), "ttt": to_dict(ttt_settings) if ttt_settings else None,
                "weights": weights}
    rank = int(os.environ.get("RANK", "0"))
    stage = None
    if rank == 0:  # before any work: a second run on this --out, or an output --force may not replace, fails now
        inputs = [artifact, data] + [p for p in (tokenizer, config_file, ttt_config) if p is not None]
        stage = StageOutput(out, "eval", config=resolved, force=force, inputs=inputs)
    try:
        with stage or contextlib.nullcontext():
            device, rank, world_size = init_device(device_choice)
            result, inputs = run(artifact, data, tokenizer, config, ttt_settings, check_compliance, device, rank,
                                 world_size, weights)
            if stage is not None:
                write_outputs(stage, result, inputs)
        if rank == 0:
            report({"out": str(out), **result}, as_json, summary_lines(result) + [f"wrote {out}"])
        if dist.is_initialized():
            # Tear gloo down together: a rank that destroyed its group while rank 0 was still writing aborted
            # ("terminate called without an active exception") in ~1 of 6 two-rank CPU runs.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def resolve_plan(config: EvalConfig, max_seq_len: int) -> EvalPlan:
    seq_len = config.seq_len or max_seq_len
    if seq_len > max_seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's max_seq_len {max_seq_len}")
    if config.stride(seq_len) > seq_len:
        raise UsageError(f"--sliding-stride {config.sliding_stride} exceeds --seq-len {seq_len}")
    return EvalPlan(seq_len, config.stride(seq_len), config.doc_isolated, config.batch_seqs)


def run(artifact: Path, data: Path, tokenizer: Path | None, config: EvalConfig, ttt_settings,
        check_compliance: bool, device, rank: int, world_size: int,
        weights: str = "export") -> tuple[dict, list[tuple[Path, str]]]:
    """Load, check, warm up and score; returns (result, input files)."""
    dataset = open_val_data(data, tokenizer)
    state, model_config, info = load_stage_model(artifact, dataset.tokenizer, weights)
    tokens = load_val_tokens(dataset, model_config.vocab_size)
    plan = resolve_plan(config, model_config.max_seq_len)
    mode, grid = config.mode(plan.seq_len), config.ngram_grid()
    tables = build_byte_tables(load_tokenizer(dataset.tokenizer), model_config.vocab_size)
    started = time.perf_counter()
    model = build_model(state, model_config, device)
    load_seconds = info["load_seconds"] + time.perf_counter() - started
    log.info(f"{artifact}: {info['kind']} artifact, {sum(t.numel() for t in state.values()):,} parameters; "
             f"{len(tokens):,} val tokens; mode {mode} (seq_len {plan.seq_len}, stride {plan.stride}); "
             f"{world_size} rank(s) on {device}")

    checks, compliance_seconds = [], 0.0
    if check_compliance:
        started = time.perf_counter()
        checks = run_compliance(model, dataset, tokens, plan, tables, grid, ttt_settings, rank, device)
        compliance_seconds = time.perf_counter() - started

    eval_model = EvalModel(model, compile=config.compile and device.type == "cuda")
    warmup_seconds = warm_up(eval_model, model_config.vocab_size, plan.seq_len, plan.batch_seqs, device)
    passed = score_stream(eval_model, tokens, plan, tables, device, ngram=grid, ttt_config=ttt_settings,
                      rank=rank, world_size=world_size, progress=progress_logger(time.perf_counter()))
    totals = passed.totals
    primary = totals[ngram_name(grid[0])] if len(grid) == 1 else totals["model"]
    result = {
        "artifact": str(Path(artifact).resolve()), "kind": info["kind"], "weights": weights,
        "data": str(Path(data).resolve()), "mode": mode,
        "seq_len": plan.seq_len, "stride": plan.stride, "doc_isolated": plan.doc_isolated,
        "world_size": world_size, "device": str(device),
        "val_loss": primary.val_loss, "val_bpb": primary.val_bpb, "tokens": primary.targets,
        "bytes": primary.bytes, "model_val_loss": totals["model"].val_loss,
        "model_val_bpb": totals["model"].val_bpb,
        "ngram": dataclasses.asdict(grid[0]) if len(grid) == 1 else None,
        "sweep": sweep_rows(totals, grid) if len(grid) > 1 else None,
        "ttt": ttt_summary(ttt_settings, passed.ttt),
        "timers": {"load_seconds": load_seconds, "warmup_seconds": warmup_seconds,
                   "eval_seconds": passed.eval_seconds, "compliance_seconds": compliance_seconds},
        "tokens_per_second": primary.targets / max(passed.eval_seconds, 1e-9),
        "checks": checks,
    }
    inputs = [(dataset.tokenizer, "tokenizer"), *((path, "val_shard") for path in dataset.val)]
    return result, inputs


def run_compliance(model, dataset, tokens, plan: EvalPlan, tables, grid, ttt_settings, rank, device):
    """C1-C4 on rank 0 (a float64 CPU copy, a short prefix); every rank learns the outcome, so all exit 5."""
    failure, checks = None, []
    if rank == 0:
        prefix, source = compliance_tokens(dataset, plan.seq_len + 8 * plan.stride + 1, tokens)
        # The prefix holds a few windows: score them one per batch (and TTT in quarters), so the n-gram
        # counts and TTT weights update several times inside it.
        check_plan = dataclasses.replace(plan, batch_seqs=1)
        if ttt_settings is not None:
            chunk_tokens = min(ttt_settings.chunk_tokens, max(1, len(prefix) // 4))
            ttt_settings = dataclasses.replace(ttt_settings, chunk_tokens=chunk_tokens)
        log.info(f"compliance: checking C1-C4 on {len(prefix):,} {source} tokens (float64, CPU)")
        results = check_eval(model, prefix, check_plan, tables, grid, ttt_settings)
        for r in results:
            (log.info if r.ok else log.warn)(f"compliance {r.name}: {'ok' if r.ok else 'FAILED'}: {r.detail}")
            checks.append({"name": r.name, "ok": r.ok, "detail": r.detail, "tokens": len(prefix),
                           "source": source})
        try:
            require(results)
        except ComplianceError as e:
            failure = e
    if dist.is_initialized():
        failed = torch.tensor([int(failure is not None)], device=device)
        dist.all_reduce(failed)
        if failed.item() and failure is None:
            failure = ComplianceError("a compliance check failed on rank 0")
    if failure is not None:
        raise failure
    return checks


def ttt_summary(settings: TTTConfig | None, result) -> dict | None:
    if settings is None:
        return None
    summary = {"config": to_dict(settings)}
    if result is not None:
        summary.update(train_seconds=result.train_seconds, score_seconds=result.score_seconds,
                       steps=result.steps, updates=sum(1 for event in result.events if event[0] == "update"))
    return summary


def log_name(result: dict) -> str:
    """`final_<kind>_<mode>[_ngram][_ttt]`, after the challenge's `final_int8_zlib_roundtrip`."""
    name = f"final_{result['kind']}_{result['mode']}"
    if result["ngram"]:
        name += "_ngram"
    return name + ("_ttt" if result["ttt"] else "")


def summary_lines(result: dict) -> list[str]:
    name = log_name(result)
    eval_ms = 1000.0 * result["timers"]["eval_seconds"]
    lines = []
    if result["sweep"]:
        lines.append(f"{'order':>5} {'alpha':>6} {'mode':>8} {'val_loss':>10} {'val_bpb':>10}")
        lines += [f"{row['order']:>5} {row['alpha']:>6g} {row['alpha_mode']:>8} "
                  f"{row['val_loss']:>10.6f} {row['val_bpb']:>10.6f}" for row in result["sweep"]]
        lines.append(f"model alone: val_loss {result['model_val_loss']:.6f} "
                     f"val_bpb {result['model_val_bpb']:.6f} (a sweep tunes on validation: its best row is "
                     "not a single-pass score)")
    timers = result["timers"]
    lines.append(f"timers: load {timers['load_seconds']:.2f} s, warm-up {timers['warmup_seconds']:.2f} s, "
                 f"eval {timers['eval_seconds']:.2f} s ({result['tokens_per_second']:,.0f} tokens/s)")
    lines.append(f"{name} val_loss:{result['val_loss']:.4f} val_bpb:{result['val_bpb']:.4f} "
                 f"eval_time:{eval_ms:.0f}ms")
    lines.append(f"{name}_exact val_loss:{result['val_loss']:.8f} val_bpb:{result['val_bpb']:.8f}")
    return lines


def write_outputs(stage: StageOutput, result: dict, inputs) -> None:
    """results.json and the manifest (metrics: val_loss, val_bpb, tokens, bytes, mode, timers, ...)."""
    stage.add_input(Path(result["artifact"]) / MANIFEST, "artifact_manifest")
    for path, role in inputs:
        stage.add_input(path, role)
    atomic_write_json(stage.add_output("results.json", "results"), result)
    stage.metrics = {key: result[key] for key in (
        "val_loss", "val_bpb", "tokens", "bytes", "mode", "seq_len", "stride", "model_val_loss",
        "model_val_bpb", "ngram", "sweep", "ttt", "timers", "kind", "world_size")}
    for check in result["checks"]:
        stage.check(check["name"], check["ok"], check["detail"])
    stage.finalize()


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
