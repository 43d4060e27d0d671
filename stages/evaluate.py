"""`pgolf eval ARTIFACT --data SHARD_DIR`: parse, run pgolf.evaluate.evaluate, print.

One process, or `torchrun --nproc_per_node=N -m pgolf eval ...` (pgolf.evaluate says how ranks share the work).
"""

from pathlib import Path

import typer

from pgolf import log
from pgolf.config import preset_names, resolve
from pgolf.dist import env_rank
from pgolf.errors import UsageError
from pgolf.evaluate import EvalConfig
from pgolf.evaluate import evaluate as run_evaluate
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, report
from pgolf.ttt import TTTConfig

TTT_ENV_PREFIX = "PGOLF_TTT_"  # TTT settings from the environment: PGOLF_TTT_LR=... (PGOLF_LR is training's)


def resolve_ttt(enabled: bool, config_file: Path | None, overrides: dict) -> TTTConfig | None:
    given = {key: value for key, value in overrides.items() if value is not None}
    if not enabled:
        if given or config_file:
            flags = ", ".join(f"--ttt-{key.replace('_', '-')}" for key in given) or "--ttt-config"
            raise UsageError(f"{flags} given without --ttt")
        return None
    # A named setting (pgolf/presets/ttt: record-0416, record-1790) in place of a mode is the base layer: the
    # config file, the environment and the other flags still override it.
    preset = given.pop("mode") if given.get("mode") in preset_names("ttt") else None
    config, _ = resolve(TTTConfig, kind="ttt", preset=preset, config_file=config_file, env_prefix=TTT_ENV_PREFIX,
                        overrides=given)
    return config


def evaluate(
    artifact: Path = typer.Argument(..., help="A `pgolf train`, `import`, `quantize` or `compress` output directory."),
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
    tilt_order: str = typer.Option(
        None, "--tilt-order", help="Token tilt: longest hint context order(s), e.g. 8 or 4,8,12 (a list sweeps)."),
    tilt_boost: str = typer.Option(None, "--tilt-boost", help="Tilt boost(s) b, e.g. 1 or 0.5,1,2 (default 1)."),
    tilt_threshold: str = typer.Option(
        None, "--tilt-threshold", help="Tilt gate(s): the hint's least share of its context's counts (0.5)."),
    tilt_min_count: int = typer.Option(
        None, "--tilt-min-count", help="Tilt gate: least counted followers of the hint's context (2)."),
    tilt_gamma: float = typer.Option(
        None, "--tilt-gamma", help="Adaptive tilt b * (1 - p(hint))^gamma (default 0: fixed boost)."),
    ttt: bool = typer.Option(None, "--ttt/--no-ttt", help="Score-first test-time training."),
    ttt_mode: str = typer.Option(None, "--ttt-mode", help="sgd, adamw, lora, phased or batched (default sgd), or the "
                                  "records' settings: record-0416, record-1790."),
    ttt_lr: float = typer.Option(None, "--ttt-lr", help="TTT learning rate (default per mode)."),
    ttt_epochs: int = typer.Option(None, "--ttt-epochs", help="Passes over each scored chunk."),
    ttt_chunk_tokens: int = typer.Option(None, "--ttt-chunk-tokens", help="Targets scored per TTT update."),
    ttt_config: Path = typer.Option(None, "--ttt-config", help="TOML of further TTT settings (pgolf.ttt)."),
    time_budget: float = typer.Option(
        None, "--time-budget", help="Eval time budget in seconds on --budget-gpus GPUs (the challenge: 600); warns "
        "when the estimate exceeds it (default 0: none)."),
    budget_gpus: int = typer.Option(
        None, "--budget-gpus", help="GPUs the budget is for; the estimate scales the scored pass by ranks / this "
        "(default 8)."),
    enforce_time_budget: bool = typer.Option(
        None, "--enforce-time-budget/--no-enforce-time-budget",
        help="Exit 5 when the estimate exceeds --time-budget (results are still written)."),
    check_compliance: bool = typer.Option(
        False, "--check-compliance", help="Check C1-C4 on a float64 CPU copy first; exit 5 on a failure."),
    device_choice: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    config_file: Path = typer.Option(None, "--config", help="TOML file of eval settings."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Exact val_loss and val_bpb of an artifact: flat, sliding-window or document-isolated windows, with an
    optional n-gram cache or token tilt (lists sweep the grid from one model pass) and score-first TTT.

    Exit codes: 2 bad flags (or --seq-len over the model's max_seq_len), 3 bad artifact or data (digests,
    missing val shards, tokenizer/vocab mismatch), 5 a compliance check failed (or, with --enforce-time-budget,
    the estimated eval time on --budget-gpus GPUs exceeds --time-budget).

    Example: pgolf eval artifacts/run1/blob --data artifacts/sp1024 --sliding-stride 64 --ngram-order 7
    """
    if alpha is not None and not ngram_order:
        raise UsageError("--alpha needs --ngram-order (it weights the n-gram cache)")
    tilt_flags = {"tilt_boost": tilt_boost, "tilt_threshold": tilt_threshold, "tilt_min_count": tilt_min_count,
                  "tilt_gamma": tilt_gamma}
    if not tilt_order and any(value is not None for value in tilt_flags.values()):
        given = ", ".join(f"--{key.replace('_', '-')}" for key, value in tilt_flags.items() if value is not None)
        raise UsageError(f"{given} given without --tilt-order")
    config, _ = resolve(EvalConfig, kind="eval", config_file=config_file, overrides={
        "seq_len": seq_len, "sliding_stride": sliding_stride, "doc_isolated": doc_isolated,
        "batch_seqs": batch_seqs, "compile": compile_model, "ngram_order": ngram_order, "alpha": alpha,
        "alpha_mode": alpha_mode, "ngram_buckets": ngram_buckets, "tilt_order": tilt_order, **tilt_flags,
        "ttt": ttt, "time_budget_seconds": time_budget,
        "budget_gpus": budget_gpus, "enforce_time_budget": enforce_time_budget})
    ttt_flags = {"mode": ttt_mode, "lr": ttt_lr, "epochs": ttt_epochs, "chunk_tokens": ttt_chunk_tokens}
    ttt_settings = resolve_ttt(config.ttt, ttt_config, ttt_flags)
    config_files = tuple(p for p in (config_file, ttt_config) if p is not None)
    result = run_evaluate(config, ttt_settings, artifact, data, out, tokenizer=tokenizer, weights=weights,
                          check_compliance=check_compliance, device=device_choice, config_files=config_files,
                          force=force, log=log)
    if env_rank() == 0:
        metrics = result.metrics
        report({"out": str(result.out), **metrics}, as_json, summary_lines(metrics), result.out)


def log_name(result: dict) -> str:
    """`final_<kind>_<mode>[_ngram][_ttt]`, after the challenge's `final_int8_zlib_roundtrip`."""
    name = f"final_{result['kind']}_{result['mode']}"
    if result["ngram"]:
        name += "_" + result["ngram"].get("kind", "ngram")
    return name + ("_ttt" if result["ttt"] else "")


def summary_lines(result: dict) -> list[str]:
    name = log_name(result)
    eval_ms = 1000.0 * result["timers"]["eval_seconds"]
    lines = []
    if result["sweep"]:
        lines.append(f"{'point':<28} {'val_loss':>10} {'val_bpb':>10}")
        lines += [f"{row['name']:<28} {row['val_loss']:>10.6f} {row['val_bpb']:>10.6f}" for row in result["sweep"]]
        lines.append(f"model alone: val_loss {result['model_val_loss']:.6f} "
                     f"val_bpb {result['model_val_bpb']:.6f} (a sweep tunes on validation: its best row is "
                     "not a single-pass score)")
    timers = result["timers"]
    lines.append(f"timers: load {timers['load_seconds']:.2f} s, warm-up {timers['warmup_seconds']:.2f} s, "
                 f"eval {timers['eval_seconds']:.2f} s ({result['tokens_per_second']:,.0f} tokens/s)")
    lines.append(timing_line(result["timing"]))
    lines.append(f"{name} val_loss:{result['val_loss']:.4f} val_bpb:{result['val_bpb']:.4f} "
                 f"eval_time:{eval_ms:.0f}ms")
    lines.append(f"{name}_exact val_loss:{result['val_loss']:.8f} val_bpb:{result['val_bpb']:.8f}")
    return lines


def timing_line(timing: dict) -> str:
    line = (f"timing: measured {timing['measured_seconds']:.2f} s on {timing['world_size']} rank(s), estimated "
            f"{timing['estimated_seconds']:.2f} s on {timing['gpus']} GPU(s)")
    if timing["budget_seconds"] is None:
        return line + ", no budget"
    verdict = "within" if timing["within_budget"] else "OVER"
    return line + f", budget {timing['budget_seconds']:g} s: {verdict}"


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
