"""The quantize stage: a checkpoint's tensors under a plan's schemes, optionally fitted under a byte target.

`quantize_model` is the flow both `pgolf quantize` and the bundled train_gpt.py run: assign schemes, calibrate
on train tokens when the clip method or the plan needs it (never on validation tokens), GPTQ in forward order,
then demote blocks (center-out or by measured sensitivity) until the artifact fits. `quantize` wraps it as a
stage: it reads a train output and writes quantized.safetensors + plan.json with a manifest.
"""

import dataclasses
import json
import time
from pathlib import Path

import torch

from pgolf.artifacts import ARTIFACT_BYTE_LIMIT, StageOutput, open_stage, output_path, output_sha256, up_to_date
from pgolf.checkpoint import load_checkpoint
from pgolf.clips import CLIP_METHODS, CLIPS
from pgolf.codecs import CODECS, parallel_workers
from pgolf.config import to_dict
from pgolf.dist import DEVICE_CHOICES, PlainLog, pick_device
from pgolf.errors import InvalidInput, OverBudget, UsageError
from pgolf.fit import ArtifactSizer, fit_clip_k, fit_plan_to_target, fit_prune, prune_candidates, prune_levels
from pgolf.gptq import (
    GPTQ_BLOCK,
    GPTQ_DAMP,
    calibration_batches,
    calibration_windows,
    generated_windows,
    gptq_hessians,
    load_gptq_hessians,
    saved_hessians,
)
from pgolf.model import ModelConfig, block_layout, build_model
from pgolf.plans import (
    KEEP_FLOAT_MAX_NUMEL,
    PlanQuantizer,
    PlanSpec,
    assign_schemes,
    demotable_blocks,
    demote_blocks,
    load_plan,
    lqer_assign,
    quantized_plan,
)
from pgolf.quant import relative_error
from pgolf.quantized import PLAN_FILE, QUANTIZED_FILE, load_quantized, save_quantized
from pgolf.schemes import SCHEMES
from pgolf.shards import open_dataset
from pgolf.stage_model import CHECKPOINT_STAGES, TRAIN_WEIGHTS, train_checkpoint

CALIBRATIONS = ("data", "generated")  # QuantizeConfig.calibration


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    plan: str = "int8"  # plan preset name or a .toml/.json plan file
    clip: str | None = None  # a clip method (pgolf.clips: percentile | gptq-lite | gptq); None = the plan's
    target_bytes: int | None = None  # artifact cap; demote plans default to 16,000,000, others are only checked
    code_bytes: int = 100_000  # allowance for the counted code file, added to the blob when sizing
    codec: str = "brotli"  # sizing codec: brotli-11 packed smallest on H100 checkpoints, so fewest blocks demoted
    keep_float_numel: int = KEEP_FLOAT_MAX_NUMEL  # tensors of at most this many elements stay float
    calib_tokens: int = 131_072  # calibration tokens for GPTQ Hessians and block sensitivity
    # data: train shards (--data) or the train stage's saved Hessians | generated: windows the model samples
    # itself from BOS (pgolf.gptq.generated_windows; no data read)
    calibration: str = "data"
    calib_temperature: float = 0.8  # generated calibration's sampling temperature
    calib_seq_len: int = 0  # calibration window length; 0 = the model's max_seq_len
    gptq_damp: float = GPTQ_DAMP  # GPTQ dampening, a fraction of the Hessian's mean diagonal
    gptq_block: int = GPTQ_BLOCK  # GPTQ lazy-update block width (columns)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    weights: str = "export"  # train weights to quantize: export (model.safetensors: EMA when on) | master

    def __post_init__(self):
        def need(ok: bool, field: str, allowed: str):
            if not ok:
                raise ValueError(f"{field} = {getattr(self, field)!r}: must be {allowed}")

        need(self.weights in TRAIN_WEIGHTS, "weights", f"one of {', '.join(TRAIN_WEIGHTS)}")
        need(self.clip is None or self.clip in CLIP_METHODS, "clip", f"one of {', '.join(CLIP_METHODS)}")
        need(self.target_bytes is None or self.target_bytes >= 1, "target_bytes", ">= 1")
        need(self.code_bytes >= 0, "code_bytes", ">= 0")
        need(self.codec in (*CODECS, "auto"), "codec", f"one of {', '.join(CODECS)}, auto")
        need(self.keep_float_numel >= 0, "keep_float_numel", ">= 0")
        need(self.calib_tokens >= 1, "calib_tokens", ">= 1")
        need(self.calib_seq_len >= 0, "calib_seq_len", ">= 0 (0 = the model's max_seq_len)")
        need(self.calibration in CALIBRATIONS, "calibration", f"one of {', '.join(CALIBRATIONS)}")
        need(self.calib_temperature > 0, "calib_temperature", "> 0")
        need(0.0 < self.gptq_damp <= 1.0, "gptq_damp", "in (0, 1]")
        need(self.gptq_block >= 1, "gptq_block", ">= 1")
        need(self.device in DEVICE_CHOICES, "device", f"one of {', '.join(DEVICE_CHOICES)}")

    def target(self, spec: PlanSpec) -> int | None:
        """The byte target: the one given, else the challenge's cap for a plan that fits (demote, clip-k,
        prune); none otherwise."""
        return self.target_bytes or (ARTIFACT_BYTE_LIMIT if spec.fit_mode else None)


@dataclasses.dataclass
class QuantizedModel:
    """What quantize_model made: the stored tensors and plan.json, and how the plan was fitted."""

    tensors: dict[str, torch.Tensor]
    plan: dict  # plan.json, exactly as it reads back
    schemes: dict[str, str]  # tensor name -> scheme, after any demotion
    clip: str
    artifact_bytes: int  # sized blob + code allowance
    target: int | None
    fit: dict | None  # how the plan was fitted and every size measured (demote: blocks; clip-k: k factors;
    # prune: +-1 levels zeroed), and the LQER tensors
    sensitivity: dict | None  # per-block calibration-loss increase (sensitivity plans)


SDCLIP_METHODS = ("sdclip", "gptq-sdclip")  # the clip methods whose k the clip-k fit scales


def require_calibration_data(spec: PlanSpec, clip: str, have_data: bool, have_hessians: bool = False) -> bool:
    """Whether quantizing under `spec` reads train tokens (GPTQ's Hessians unless the train stage saved them, or
    measured block sensitivity); UsageError (exit 2) when it does and there are none."""
    gptq = CLIPS[clip].needs_calibration and not have_hessians
    calibrate = gptq or spec.demote == "sensitivity"
    if calibrate and not have_data:
        why = f"--clip {clip}" if gptq else f"plan '{spec.name}'"
        raise UsageError(f"{why} needs --data DIR (its train shards calibrate; e.g. --data artifacts/sp1024), "
                         f"Hessians saved by the train stage (--gptq-calibration-batches), or --calibration "
                         f"generated")
    return calibrate


def calibration_data(train_shards: list[Path] | None, where: str, config: QuantizeConfig,
                     model_config: ModelConfig, device, log, state: dict | None = None) -> list:
    """Calibration batches from train shards (validation is never read), or with config.calibration generated
    sampled by the model of `state`; `where` names the shards in errors."""
    seq_len = config.calib_seq_len or model_config.max_seq_len
    if seq_len > model_config.max_seq_len:
        raise UsageError(f"--calib-seq-len {seq_len} exceeds the model's max_seq_len {model_config.max_seq_len}")
    if config.calibration == "generated":
        count = max(1, config.calib_tokens // seq_len)
        windows = generated_windows(build_model(state, model_config, device), count, seq_len,
                                    config.calib_temperature, device)
        log.info(f"calibration: {windows.numel() - len(windows):,} tokens the model generated (temperature "
                 f"{config.calib_temperature:g}) in {len(windows)} windows of {seq_len}")
        return calibration_batches(windows, device)
    if not train_shards:
        raise InvalidInput(f"{where}: no fineweb_train_*.bin shards (calibration never uses validation)")
    try:
        windows = calibration_windows(train_shards, config.calib_tokens, seq_len)
    except ValueError as e:
        raise InvalidInput(f"{where}: {e}") from None
    if int(windows.max()) >= model_config.vocab_size:
        raise InvalidInput(f"{where}: token id {int(windows.max())} >= the checkpoint's vocab_size "
                           f"{model_config.vocab_size} (data from another tokenizer?)")
    log.info(f"calibration: {windows.numel() - len(windows):,} train tokens in {len(windows)} windows of {seq_len}")
    return calibration_batches(windows, device)


@torch.no_grad()
def calibration_loss(model, batches: list) -> float:
    losses = [model(inputs, targets).item() for inputs, targets in batches]
    return sum(losses) / len(losses)


def block_sensitivity(model_config: ModelConfig, quantizer: PlanQuantizer, schemes: dict, scheme: str,
                      batches: list, log) -> dict[int, float]:
    """{block: calibration-loss increase when that block alone is demoted to `scheme`}; the rest as planned."""
    model = build_model(quantizer.dequantized(schemes), model_config, quantizer.device)
    base = calibration_loss(model, batches)
    sensitivity = {}
    for block in demotable_blocks(schemes, model.layout):
        model.load_state_dict(quantizer.dequantized(demote_blocks(schemes, [block], scheme, model.layout)))
        sensitivity[block] = calibration_loss(model, batches) - base
        log.info(f"sensitivity: block {block} at {scheme}: loss {sensitivity[block]:+.5f}")
    return sensitivity


def demotion_order(spec: PlanSpec, schemes: dict, model_config: ModelConfig, quantizer: PlanQuantizer,
                   batches, log) -> tuple[list[int], dict | None]:
    """Blocks in the order the plan demotes them, and the measured sensitivities (sensitivity plans only)."""
    layout = block_layout(model_config)
    blocks = demotable_blocks(schemes, layout)
    if spec.demote == "center-out":
        return [b for b in layout.center_out() if b in blocks], None
    sensitivity = block_sensitivity(model_config, quantizer, schemes, spec.demote_to, batches, log)
    return sorted(sensitivity, key=lambda block: (sensitivity[block], block)), sensitivity


def scheme_counts(schemes: dict) -> str:
    return ", ".join(f"{list(schemes.values()).count(s)} {s}" for s in sorted(set(schemes.values())))


def quantize_model(state: dict, model_config: ModelConfig, spec: PlanSpec, config: QuantizeConfig, *,
                   train_shards: list[Path] | None = None, data_name: str = "--data", where: str = "quantize",
                   tokenizer_sha256=None, source: dict | None = None, hessians: dict | None = None,
                   log=PlainLog) -> QuantizedModel:
    """Quantize `state` under `spec` with `config`'s settings: the whole flow of `pgolf quantize`.

    `hessians` (saved by the train stage, pgolf.gptq) serve GPTQ as they are; else `train_shards` (of
    `data_name`) calibrate when the clip method or the plan needs it; `where` names the run in errors.
    OverBudget (exit 4) when a demote plan cannot reach its target, or another plan's artifact is over it."""
    clip = config.clip or spec.clip
    target = config.target(spec)
    generated = config.calibration == "generated"
    calibrate = require_calibration_data(spec, clip, train_shards is not None or generated, hessians is not None)
    if spec.fit_mode in ("clip-k", "clip-k+prune") and clip not in SDCLIP_METHODS:
        raise UsageError(f"plan '{spec.name}': fit = {spec.fit_mode} scales sdclip's k, so it needs clip = "
                         f"{' | '.join(SDCLIP_METHODS)}, not {clip}")
    schemes = assign_schemes(spec, state, config.keep_float_numel)
    log.info(f"plan {spec.name}: {scheme_counts(schemes)}")
    device = pick_device(config.device)
    quantizer = PlanQuantizer(state, clip=clip, scale_floor=spec.scale_floor, gptq_damp=config.gptq_damp,
                              gptq_block=config.gptq_block, device=device, lqer_rank=spec.lqer_rank,
                              embedding_k=spec.embedding_k)
    batches = calibration_data(train_shards, data_name, config, model_config, device, log, state) if calibrate \
        else None
    if CLIPS[clip].needs_calibration:
        integer = [name for name, scheme in schemes.items() if SCHEMES[scheme].integer]
        if hessians is not None:
            quantizer.hessians.update({name: h.to(device) for name, h in
                                       saved_hessians(hessians, state, integer, where).items()})
        else:
            gptq_hessians(build_model(state, model_config, device), quantizer, schemes, integer, batches, log.info)
    schemes, lqer = lqer_assign(spec, schemes, quantizer)
    if lqer:
        log.info(f"lqer: rank {spec.lqer_rank} int{spec.lqer_bits} factors on {', '.join(lqer)}")

    def build(assignment: dict, k_scale: float | None = None) -> tuple[dict, dict]:
        tensors, records = quantizer.quantize(assignment, k_scale)
        plan = quantized_plan(dataclasses.asdict(model_config), source or {}, spec, clip, records,
                              tokenizer_sha256)
        return tensors, json.loads(json.dumps(plan))  # exactly what plan.json will read back as

    sizer = ArtifactSizer(config.codec, config.code_bytes)
    allowance = f"{config.codec} blob + {config.code_bytes:,}-byte code allowance, --code-bytes"
    fit = sensitivity = None
    mode = spec.fit_mode
    if mode is None:
        artifact = sizer(*build(schemes))
        if target is not None and artifact > target:
            raise OverBudget(f"{where}: plan '{spec.name}' makes a {artifact:,}-byte artifact ({allowance}), over "
                             f"--target-bytes {target:,}; a demote plan such as center-out-int5, or fit = clip-k / "
                             f"prune (record-int6), can fit it")
    elif mode == "demote":
        order, sensitivity = demotion_order(spec, schemes, model_config, quantizer, batches, log)
        try:
            schemes, steps = fit_plan_to_target(
                schemes, order, spec.demote_to, lambda assignment: sizer(*build(assignment)), target,
                block_layout(model_config), log.info, workers=parallel_workers(len(order) + 1),
                confirm=lambda assignment: sizer.every_layout(*build(assignment)))
        except OverBudget as e:
            raise OverBudget(f"{where}: {e} ({allowance})") from None
        fit = {"mode": mode, "order": order, "steps": steps, "demoted": steps[-1]["demoted"]}
        artifact = steps[-1]["bytes"]
    fits = True
    if mode in ("clip-k", "clip-k+prune"):
        def size_at(factor: float) -> int:  # GPTQ (or the plain clip) at this k, then a whole-blob compression
            started = time.perf_counter()
            built = build(schemes, factor)
            quantized = time.perf_counter()
            size = sizer(*built)
            log.info(f"fit: sdclip k x {factor:.4f}: quantized in {quantized - started:.1f} s, compressed in "
                     f"{time.perf_counter() - quantized:.1f} s")
            return size

        integer_values = sum(state[name].numel() for name, scheme in schemes.items() if SCHEMES[scheme].integer)
        factor, steps, fits = fit_clip_k(size_at, target, spec.clip_k_max, progress=log.info,
                                         workers=parallel_workers(8), k_min=spec.clip_k_min,
                                         bytes_per_doubling=integer_values / 8,
                                         prepare=lambda factors: quantizer.prefetch(schemes, factors))
        quantizer.k_scale = factor
        fit = {"mode": mode, "k_scale": factor, "clip_k_steps": steps}
        artifact = next(step["bytes"] for step in reversed(steps) if step["k_scale"] == factor)
        if not fits and mode == "clip-k":
            raise OverBudget(f"{where}: target {target:,} bytes is out of reach: with every sdclip k x "
                             f"{spec.clip_k_max} (clip_k_max) the artifact is {steps[-1]['bytes']:,} bytes "
                             f"({allowance})")
    tensors, plan = build(schemes)
    if mode == "prune" or (mode == "clip-k+prune" and not fits):
        candidates = prune_candidates(tensors, schemes)
        total = int(candidates[1].numel())

        def size_pruned(count: int) -> int:
            return sizer(*pruned_state(tensors, plan, candidates, count, state))

        try:
            count, steps = fit_prune(size_pruned, total, target, log.info, workers=parallel_workers(8),
                                     known={0: artifact} if fit else None)
        except OverBudget as e:
            raise OverBudget(f"{where}: {e} ({allowance})") from None
        tensors, plan = pruned_state(tensors, plan, candidates, count, state)
        fit = {**(fit or {"mode": mode}), "pruned": count, "prune_candidates": total, "prune_steps": steps}
        artifact = next(step["bytes"] for step in steps if step["pruned"] == count)
    if lqer:
        fit = {**(fit or {"mode": mode}), "lqer": lqer}
    return QuantizedModel(tensors, plan, schemes, clip, artifact, target, fit, sensitivity)


def pruned_state(tensors: dict, plan: dict, candidates, count: int, original: dict) -> tuple[dict, dict]:
    """(tensors, plan.json) with the first `count` +-1 prune candidates at 0; the pruned tensors' records get
    their new rel_error and `pruned` (how many levels were zeroed)."""
    pruned_tensors, pruned = prune_levels(tensors, candidates, count)
    records = dict(plan["tensors"])
    for name, zeroed in pruned.items():
        restored = SCHEMES[records[name]["scheme"]].restore(name, pruned_tensors)
        records[name] = {**records[name], "rel_error": relative_error(original[name].cpu(), restored),
                         "pruned": zeroed}
    return pruned_tensors, json.loads(json.dumps({**plan, "tensors": records}))


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


@dataclasses.dataclass
class QuantizeResult:
    out: Path
    metrics: dict  # plan, clip, artifact/blob bytes, fit, per-scheme totals, per-tensor records (the manifest's)


def calibration_source(clip: str, data: Path | None, saved: dict | None, config: QuantizeConfig) -> dict | None:
    """Where GPTQ's Hessians came from (the manifest's `calibration`); None for a clip without them."""
    if not CLIPS[clip].needs_calibration:
        return None
    if config.calibration == "generated":
        return {"source": "generated", "tokens": config.calib_tokens, "temperature": config.calib_temperature}
    if saved is not None:
        return {"source": "train", "tokens": saved["tokens"], "weights": saved["weights"]}
    return {"source": "data", "data": str(Path(data).resolve())}


def quantize(config: QuantizeConfig, train_dir: Path, out: Path, *, data: Path | None = None,
             config_file: Path | None = None, force: bool = False, log=PlainLog) -> QuantizeResult:
    """Quantize a train (or import) output's checkpoint (config.weights) into `out`: quantized.safetensors +
    plan.json (or report the ones already there, up_to_date)."""
    spec = load_plan(config.plan)
    manifest = open_stage(train_dir, CHECKPOINT_STAGES)
    checkpoint = train_checkpoint(manifest, train_dir, config.weights)
    clip = config.clip or spec.clip
    # The train stage's Hessians (of its exported weights) serve GPTQ unless --data asks for sequential
    # calibration on its shards.
    if config.calibration == "generated" and data is not None:
        raise UsageError("--calibration generated reads no data: drop --data (or calibrate on it with "
                         "--calibration data)")
    saved = data is None and config.calibration == "data" and CLIPS[clip].needs_calibration \
        and config.weights == "export" and output_sha256(manifest, "gptq_hessians") is not None
    hessians_path = output_path(manifest, train_dir, "gptq_hessians") if saved else None
    require_calibration_data(spec, clip, data is not None or config.calibration == "generated",
                             hessians_path is not None)
    inputs = [train_dir] + [path for path in (data, config_file) if path is not None]
    done = up_to_date(out, "quantize", to_dict(config), inputs, force=force, log=log)
    if done:
        return QuantizeResult(Path(out), done["metrics"])
    with StageOutput(out, "quantize", config=to_dict(config), force=force, inputs=inputs) as stage:
        state, model_config, metadata = load_checkpoint(checkpoint)
        stage.add_input(checkpoint, "checkpoint")
        hessians = calibration = None
        if hessians_path is not None:
            hessians, calibration = load_gptq_hessians(hessians_path)
            stage.add_input(hessians_path, "gptq_hessians")
            log.info(f"gptq: the train stage's Hessians ({calibration['tokens']:,} train tokens; no --data read)")
        dataset = open_dataset(data, verify=("train",)) if data is not None else None
        train_shards = dataset.train if dataset else None
        source = {"train_dir": str(Path(train_dir).resolve()), "checkpoint": checkpoint.name,
                  "sha256": stage.inputs[0]["sha256"], "data": str(Path(data).resolve()) if data else None}
        made = quantize_model(state, model_config, spec, config, train_shards=train_shards, data_name=str(data),
                              where=str(train_dir), tokenizer_sha256=metadata.get("tokenizer_sha256"),
                              source=source, hessians=hessians, log=log)
        if dataset:
            stage.inputs += dataset.input_records(dataset.train, "calibration_shard")
        if config_file:
            stage.add_input(config_file, "config")
        save_quantized(stage.dir, made.tensors, made.plan)
        stage.add_output(QUANTIZED_FILE, "quantized")
        stage.add_output(PLAN_FILE, "plan")
        reloaded, _ = load_quantized(stage.dir)
        stage.check("round_trip", reloaded.keys() == made.tensors.keys()
                    and all(torch.equal(reloaded[n], t) for n, t in made.tensors.items()),
                    "quantized.safetensors reads back bit-exactly")
        stage.check("fits_target", made.target is None or made.artifact_bytes <= made.target,
                    f"{made.artifact_bytes:,} bytes (blob + {config.code_bytes:,} code allowance) vs target "
                    f"{made.target}")
        stage.metrics = {
            "plan": spec.name, "clip": made.clip, "scale_floor": spec.scale_floor, "codec": config.codec,
            "calibration": calibration_source(made.clip, data, calibration, config),
            "code_bytes": config.code_bytes, "artifact_bytes": made.artifact_bytes,
            "blob_bytes": made.artifact_bytes - config.code_bytes, "target_bytes": made.target,
            "fit": made.fit, "sensitivity": made.sensitivity, "totals": scheme_totals(made.plan["tensors"]),
            "tensors": {name: {key: r[key] for key in ("scheme", "bits", "clip", "rel_error", "bytes")}
                        for name, r in made.plan["tensors"].items()},
        }
        stage.finalize()
    return QuantizeResult(Path(out), stage.metrics)
