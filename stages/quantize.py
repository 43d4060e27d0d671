"""`pgolf quantize TRAIN_DIR --plan PLAN`: parse, run pgolf.quantize.quantize, print."""

from pathlib import Path

import typer

from pgolf import log
from pgolf.clips import CLIP_METHODS
from pgolf.codecs import CODECS
from pgolf.config import resolve
from pgolf.plans import plan_names
from pgolf.quantize import QuantizeConfig
from pgolf.quantize import quantize as run_quantize
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, out_option, report


def quantize(
    train_dir: Path = typer.Argument(..., help="A `pgolf train` or `pgolf import` output directory (holds "
                                     "model.safetensors)."),
    out: Path = out_option(),
    plan: str = typer.Option(
        None,
        "--plan",
        help=f"Plan preset ({', '.join(plan_names())}) or a .toml/.json plan file (default: int8).",
    ),
    clip: str = typer.Option(
        None, "--clip", help=f"Clip method: {', '.join(CLIP_METHODS)} (default: the plan's)."
    ),
    target_bytes: int = typer.Option(
        None,
        "--target-bytes",
        help="Artifact cap in bytes (blob + --code-bytes); "
        "plans that fit (demote, clip-k, prune) default to 16000000, other plans fail (exit 4) above it.",
    ),
    code_bytes: int = typer.Option(
        None,
        "--code-bytes",
        help="Counted-code allowance added when sizing (default 100000; verify-size counts the real file).",
    ),
    codec: str = typer.Option(
        None, "--codec", help=f"Codec for sizing: {', '.join(CODECS)}, auto (default brotli)."
    ),
    data: Path = typer.Option(
        None,
        "--data",
        help="Token shard directory: its TRAIN shards calibrate --clip gptq "
        "and sensitivity-int5 (validation is never read).",
    ),
    calib_tokens: int = typer.Option(None, "--calib-tokens", help="Calibration tokens (default 131072)."),
    calibration: str = typer.Option(
        None, "--calibration", help="data (--data's train shards, or the train stage's saved Hessians) or "
        "generated (windows the model samples itself; no data read). Default data."
    ),
    calib_temperature: float = typer.Option(
        None, "--calib-temperature", help="Sampling temperature of --calibration generated (default 0.8)."
    ),
    calib_seq_len: int = typer.Option(
        None, "--calib-seq-len", help="Calibration window (default: model max)."
    ),
    keep_float_numel: int = typer.Option(
        None,
        "--keep-float-numel",
        help="Tensors with at most this many elements stay float (default 65536, the challenge's).",
    ),
    gptq_damp: float = typer.Option(None, "--gptq-damp", help="GPTQ dampening (default 0.01)."),
    gptq_block: int = typer.Option(None, "--gptq-block", help="GPTQ block width in columns (default 128)."),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda (default auto)."),
    weights: str = typer.Option(
        None, "--weights", help="Train weights: export (model.safetensors, the EMA when on) or master."
    ),
    config_file: Path = typer.Option(None, "--config", help="TOML file of quantize settings."),
    force: bool = FORCE_OPTION,
    as_json: bool = JSON_OPTION,
):
    """Quantize a checkpoint: int5-int8 per-row levels + fp16 scales, small/control tensors in float.

    Example: pgolf quantize artifacts/run1/train --plan center-out-int5 --target-bytes 16000000
    --out artifacts/run1/q
    """
    overrides = {
        "plan": plan, "clip": clip, "target_bytes": target_bytes, "code_bytes": code_bytes, "codec": codec,
        "calib_tokens": calib_tokens, "calib_seq_len": calib_seq_len, "calibration": calibration,
        "calib_temperature": calib_temperature, "keep_float_numel": keep_float_numel,
        "gptq_damp": gptq_damp, "gptq_block": gptq_block, "device": device, "weights": weights,
    }
    config, _ = resolve(QuantizeConfig, kind="quantize", config_file=config_file, overrides=overrides)
    result = run_quantize(config, train_dir, out, data=data, config_file=config_file, force=force, log=log)
    summarize(out, result.metrics, as_json)


def summarize(out: Path, metrics: dict, as_json: bool) -> None:
    totals = metrics["totals"]
    lines = [
        f"{scheme}: {row['tensors']} tensors, {row['parameters']:,} params, {row['bytes']:,} raw bytes"
        for scheme, row in totals["by_scheme"].items()
    ]
    fit = metrics["fit"] or {}
    if fit.get("demoted"):
        lines.append(f"demoted blocks {fit['demoted']} to fit {metrics['target_bytes']:,} bytes")
    if fit.get("k_scale", 1.0) != 1.0:
        lines.append(f"sdclip k x {fit['k_scale']:.4f} to fit {metrics['target_bytes']:,} bytes")
    if fit.get("pruned"):
        lines.append(f"pruned {fit['pruned']:,} of {fit['prune_candidates']:,} +-1 levels to fit "
                     f"{metrics['target_bytes']:,} bytes")
    if fit.get("lqer"):
        lines.append(f"LQER on {', '.join(fit['lqer'])}")
    lines.append(
        f"mean relative error {totals['mean_rel_error']:.5f}; artifact {metrics['artifact_bytes']:,} bytes "
        f"({metrics['codec']} blob {metrics['blob_bytes']:,} + code {metrics['code_bytes']:,})"
    )
    report({"out": str(out), **metrics}, as_json, lines, out)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
