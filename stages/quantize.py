"""`pgolf quantize TRAIN_DIR --plan PLAN`: quantize a checkpoint per a plan, optionally under a size cap."""

import dataclasses
import json
from pathlib import Path

import torch
import typer

from pgolf import log
from pgolf.artifacts import ARTIFACT_BYTE_LIMIT, StageOutput, open_stage
from pgolf.checkpoint import load_checkpoint
from pgolf.clips import CLIP_METHODS, CLIPS
from pgolf.codecs import CODECS, parallel_workers
from pgolf.config import resolve, to_dict
from pgolf.errors import InvalidInput, OverBudget, UsageError
from pgolf.gptq import GPTQ_BLOCK, GPTQ_DAMP, calibration_batches, calibration_windows
from pgolf.plans import (
    KEEP_FLOAT_MAX_NUMEL,
    ArtifactSizer,
    PlanQuantizer,
    assign_schemes,
    block_sensitivity,
    center_out_order,
    demotable_blocks,
    fit_plan_to_target,
    gptq_hessians,
    load_plan,
    load_plan_model,
    plan_names,
    quantized_plan,
)
from pgolf.quantized import PLAN_FILE, QUANTIZED_FILE, load_quantized, save_quantized
from pgolf.shards import open_dataset
from pgolf.stage_model import TRAIN_WEIGHTS, train_checkpoint
from pgolf.stages.common import FORCE_OPTION, JSON_OPTION, out_option, report

DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    plan: str = "int8"  # plan preset name or a .toml/.json plan file
    clip: str | None = None  # percentile | gptq-lite | gptq; None = the plan's choice
    target_bytes: int | None = (
        None  # artifact cap; demote plans default to 16,000,000, others are only checked
    )
    code_bytes: int = 100_000  # allowance for the counted code file, added to the blob when sizing
    codec: str = "brotli"  # sizing codec: brotli-11 packed smallest on H100 checkpoints, so fewest blocks demoted
    keep_float_numel: int = KEEP_FLOAT_MAX_NUMEL  # tensors of at most this many elements stay float
    calib_tokens: int = 131_072  # train-shard tokens for GPTQ Hessians and block sensitivity
    calib_seq_len: int = 0  # calibration window length; 0 = the model's max_seq_len
    gptq_damp: float = GPTQ_DAMP  # GPTQ dampening, a fraction of the Hessian's mean diagonal
    gptq_block: int = GPTQ_BLOCK  # GPTQ lazy-update block width (columns)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    weights: str = "export"  # train weights to quantize: export (model.safetensors: EMA when on) | master

    def __post_init__(self):
        if self.weights not in TRAIN_WEIGHTS:
            raise ValueError(f"weights = {self.weights!r}: must be one of {', '.join(TRAIN_WEIGHTS)}")
        if self.clip is not None and self.clip not in CLIP_METHODS:
            raise ValueError(f"clip = {self.clip!r}: must be one of {', '.join(CLIP_METHODS)}")
        if self.target_bytes is not None and self.target_bytes < 1:
            raise ValueError(f"target_bytes = {self.target_bytes}: must be >= 1")
        if self.code_bytes < 0:
            raise ValueError(f"code_bytes = {self.code_bytes}: must be >= 0")
        if self.codec not in (*CODECS, "auto"):
            raise ValueError(f"codec = {self.codec!r}: must be one of {', '.join(CODECS)}, auto")
        if self.keep_float_numel < 0:
            raise ValueError(f"keep_float_numel = {self.keep_float_numel}: must be >= 0")
        if self.calib_tokens < 1:
            raise ValueError(f"calib_tokens = {self.calib_tokens}: must be >= 1")
        if self.calib_seq_len < 0:
            raise ValueError(
                f"calib_seq_len = {self.calib_seq_len}: must be >= 0 (0 = the model's max_seq_len)"
            )
        if not 0.0 < self.gptq_damp <= 1.0:
            raise ValueError(f"gptq_damp = {self.gptq_damp}: must be in (0, 1]")
        if self.gptq_block < 1:
            raise ValueError(f"gptq_block = {self.gptq_block}: must be >= 1")
        if self.device not in DEVICES:
            raise ValueError(f"device = {self.device!r}: must be one of {', '.join(DEVICES)}")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def calibration_data(data: Path, config: QuantizeConfig, model_config, device) -> list:
    """Calibration batches from the TRAIN shards of `data` (validation is never read)."""
    dataset = open_dataset(data, verify=("train",))
    if not dataset.train:
        raise InvalidInput(f"{data}: no fineweb_train_*.bin shards (calibration never uses validation)")
    seq_len = config.calib_seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise UsageError(
            f"--calib-seq-len {seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}"
        )
    try:
        windows = calibration_windows(dataset.train, config.calib_tokens, seq_len)
    except ValueError as e:
        raise InvalidInput(f"{data}: {e}") from None
    if int(windows.max()) >= model_config.vocab_size:
        raise InvalidInput(
            f"{data}: token id {int(windows.max())} >= the checkpoint's vocab_size "
            f"{model_config.vocab_size} (data from another tokenizer?)"
        )
    log.info(
        f"calibration: {windows.numel() - len(windows):,} train tokens in {len(windows)} windows of {seq_len}"
    )
    return calibration_batches(windows, device)


def scheme_totals(records: dict) -> dict:
    """Per scheme and overall: tensors, parameters, raw bytes; plus the parameter-weighted mean rel_error."""
    by_scheme: dict[str, dict] = {}
    for record in records.values():
        row = by_scheme.setdefault(record["scheme"], {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += int(torch.Size(record["shape"]).numel())
        row["bytes"] += record["bytes"]
    parameters = sum(row["parameters"] for row in by_scheme.values())
    weighted = sum(r["rel_error"] * torch.Size(r["shape"]).numel() for r in records.values())
    return {
        "tensors": len(records),
        "parameters": parameters,
        "raw_bytes": sum(row["bytes"] for row in by_scheme.values()),
        "mean_rel_error": weighted / max(parameters, 1),
        "by_scheme": dict(sorted(by_scheme.items())),
    }


def demotion_order(spec, schemes, model_config, quantizer, batches) -> tuple[list[int], dict | None]:
    """Blocks in the order the plan demotes them, and the measured sensitivities (sensitivity plans only)."""
    blocks = demotable_blocks(schemes)
    if spec.demote == "center-out":
        return [b for b in center_out_order(model_config.num_layers) if b in blocks], None
    sensitivity = block_sensitivity(model_config, quantizer, schemes, spec.demote_to, batches, log.info)
    return sorted(sensitivity, key=lambda block: (sensitivity[block], block)), sensitivity


def fit_schemes(where, spec, schemes, size_of, target, config, model_config, quantizer, batches, confirm=None):
    """(schemes, fit record, sensitivities, artifact bytes): demote plans demote blocks until `target` fits
    (`confirm`: fit_plan_to_target's thorough sizing), other plans are only checked against it; OverBudget
    (exit 4) naming `where` when it cannot fit."""
    allowance = f"{config.codec} blob + {config.code_bytes:,}-byte code allowance, --code-bytes"
    if not spec.demote:
        artifact = size_of(schemes)
        if target is not None and artifact > target:
            raise OverBudget(
                f"{where}: plan '{spec.name}' makes a {artifact:,}-byte artifact ({allowance}), over "
                f"--target-bytes {target:,}; a demote plan such as center-out-int5 can fit it"
            )
        return schemes, None, None, artifact
    order, sensitivity = demotion_order(spec, schemes, model_config, quantizer, batches)
    try:
        schemes, steps = fit_plan_to_target(schemes, order, spec.demote_to, size_of, target, log.info,
                                            workers=parallel_workers(len(order) + 1), confirm=confirm)
    except OverBudget as e:
        raise OverBudget(f"{where}: {e} ({allowance})") from None
    fit = {"order": order, "steps": steps, "demoted": steps[-1]["demoted"]}
    return schemes, fit, sensitivity, steps[-1]["bytes"]


def quantize(
    train_dir: Path = typer.Argument(..., help="A `pgolf train` output directory (holds model.safetensors)."),
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
        "demote plans default to 16000000, other plans fail (exit 4) above it.",
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
        "plan": plan,
        "clip": clip,
        "target_bytes": target_bytes,
        "code_bytes": code_bytes,
        "codec": codec,
        "calib_tokens": calib_tokens,
        "calib_seq_len": calib_seq_len,
        "keep_float_numel": keep_float_numel,
        "gptq_damp": gptq_damp,
        "gptq_block": gptq_block,
        "device": device,
        "weights": weights,
    }
    config, _ = resolve(QuantizeConfig, kind="quantize", config_file=config_file, overrides=overrides)
    spec = load_plan(config.plan)
    clip_method = config.clip or spec.clip
    manifest = open_stage(train_dir, "train")
    checkpoint = train_checkpoint(manifest, train_dir, config.weights)
    needs_data = CLIPS[clip_method].needs_calibration or spec.demote == "sensitivity"
    if needs_data and data is None:
        why = f"--clip {clip_method}" if CLIPS[clip_method].needs_calibration else f"plan '{spec.name}'"
        raise UsageError(f"{why} needs --data DIR (its train shards calibrate; e.g. --data artifacts/sp1024)")
    target = config.target_bytes or (ARTIFACT_BYTE_LIMIT if spec.demote else None)
    inputs = [train_dir] + [path for path in (data, config_file) if path is not None]
    with StageOutput(out, "quantize", config=to_dict(config), force=force, inputs=inputs) as stage:
        state, model_config, metadata = load_checkpoint(checkpoint)
        stage.add_input(checkpoint, "checkpoint")
        schemes = assign_schemes_logged(spec, state, config.keep_float_numel)
        run_device = pick_device(config.device)
        quantizer = PlanQuantizer(
            state,
            clip=clip_method,
            scale_floor=spec.scale_floor,
            gptq_damp=config.gptq_damp,
            gptq_block=config.gptq_block,
            device=run_device,
        )
        batches = calibration_data(data, config, model_config, run_device) if needs_data else None
        if CLIPS[clip_method].needs_calibration:
            gptq_hessians(
                load_plan_model(model_config, state, run_device), quantizer, schemes, batches, log.info
            )
        source = {
            "train_dir": str(Path(train_dir).resolve()),
            "checkpoint": checkpoint.name,
            "sha256": stage.inputs[0]["sha256"],
            "data": str(Path(data).resolve()) if data else None,
        }

        def build(assignment: dict) -> tuple[dict, dict]:
            tensors, records = quantizer.quantize(assignment)
            plan_json = quantized_plan(
                dataclasses.asdict(model_config),
                source,
                spec,
                clip_method,
                records,
                metadata.get("tokenizer_sha256"),
            )
            return tensors, json.loads(json.dumps(plan_json))  # exactly what plan.json will read back as

        sizer = ArtifactSizer(config.codec, config.code_bytes)

        def size_of(assignment: dict) -> int:
            return sizer(*build(assignment))

        schemes, fit, sensitivity, artifact = fit_schemes(
            train_dir, spec, schemes, size_of, target, config, model_config, quantizer, batches,
            confirm=lambda assignment: sizer.every_layout(*build(assignment)),
        )
        if target is not None and artifact > target:
            raise OverBudget(f"{train_dir}: the fitted plan makes a {artifact:,}-byte artifact, over --target-bytes "
                             f"{target:,}")
        tensors, plan_json = build(schemes)
        save_quantized(stage.dir, tensors, plan_json)
        stage.add_output(QUANTIZED_FILE, "quantized")
        stage.add_output(PLAN_FILE, "plan")
        reloaded, _ = load_quantized(stage.dir)
        stage.check(
            "round_trip",
            reloaded.keys() == tensors.keys()
            and all(torch.equal(reloaded[n], t) for n, t in tensors.items()),
            "quantized.safetensors reads back bit-exactly",
        )
        stage.check(
            "fits_target",
            target is None or artifact <= target,
            f"{artifact:,} bytes (blob + {config.code_bytes:,} code allowance) vs target {target}",
        )
        stage.metrics = {
            "plan": spec.name,
            "clip": clip_method,
            "scale_floor": spec.scale_floor,
            "codec": config.codec,
            "code_bytes": config.code_bytes,
            "artifact_bytes": artifact,
            "blob_bytes": artifact - config.code_bytes,
            "target_bytes": target,
            "fit": fit,
            "sensitivity": sensitivity,
            "totals": scheme_totals(plan_json["tensors"]),
            "tensors": {
                name: {key: r[key] for key in ("scheme", "bits", "clip", "rel_error", "bytes")}
                for name, r in plan_json["tensors"].items()
            },
        }
        stage.finalize()
    summarize(out, stage.metrics, as_json)


def assign_schemes_logged(spec, state: dict, keep_float_numel: int) -> dict:
    schemes = assign_schemes(spec, state, keep_float_numel)
    log.info(
        f"plan {spec.name}: "
        + ", ".join(f"{list(schemes.values()).count(s)} {s}" for s in sorted(set(schemes.values())))
    )
    return schemes


def summarize(out: Path, metrics: dict, as_json: bool) -> None:
    totals = metrics["totals"]
    lines = [
        f"{scheme}: {row['tensors']} tensors, {row['parameters']:,} params, {row['bytes']:,} raw bytes"
        for scheme, row in totals["by_scheme"].items()
    ]
    if metrics["fit"] and metrics["fit"]["demoted"]:
        lines.append(f"demoted blocks {metrics['fit']['demoted']} to fit {metrics['target_bytes']:,} bytes")
    lines.append(
        f"mean relative error {totals['mean_rel_error']:.5f}; artifact {metrics['artifact_bytes']:,} bytes "
        f"({metrics['codec']} blob {metrics['blob_bytes']:,} + code {metrics['code_bytes']:,})"
    )
    lines.append(f"wrote {out}")
    report({"out": str(out), **metrics}, as_json, lines)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)
