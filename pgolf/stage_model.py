"""Load a model from any stage output that holds one: train or import (checkpoint), quantize (quantized state +
plan) or compress (the counted blob). Digests are checked against the stage's manifest first (exit 3 on a mismatch).
"""

import json
import time
from pathlib import Path

from pgolf.artifacts import open_stage, output_path, sha256_file
from pgolf.bpb import load_tokenizer
from pgolf.checkpoint import check_tensors, load_checkpoint, model_config_from_json
from pgolf.codecs import read_blob
from pgolf.errors import InvalidInput, UsageError
from pgolf.model import ModelConfig
from pgolf.quantized import dequantize_state, load_quantized

CHECKPOINT_STAGES = ("train", "import")  # outputs holding a float checkpoint (import: a record's, pgolf-named)
ARTIFACT_STAGES = (*CHECKPOINT_STAGES, "quantize", "compress")
# Which weights of a train output: "export" = model.safetensors (the EMA weights when EMA was on), "master" = the
# optimizer's weights (master.safetensors when EMA was on, else model.safetensors). In short budgets the EMA can lag
# the master weights (seed-11l, 300 s on one H100: 1.5110 vs 1.5025 bpb), so either can be exported without retraining.
TRAIN_WEIGHTS = ("export", "master")


def train_checkpoint(manifest: dict, directory: Path, weights: str = "export") -> Path:
    """The checkpoint file of a train output holding `weights` (see TRAIN_WEIGHTS)."""
    if weights not in TRAIN_WEIGHTS:
        raise UsageError(f"weights = {weights!r}: must be one of {', '.join(TRAIN_WEIGHTS)}")
    if weights == "master" and any(out["role"] == "checkpoint_master" for out in manifest["outputs"]):
        return output_path(manifest, directory, "checkpoint_master")
    return output_path(manifest, directory, "checkpoint")


def plan_model_config(plan: dict, where: Path) -> ModelConfig:
    try:
        return model_config_from_json(json.dumps(plan["model_config"]))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"{where}: plan has no valid model_config ({e})") from None


def load_stage_model(
    directory: Path, tokenizer: Path | None = None, weights: str = "export"
) -> tuple[dict, ModelConfig, dict]:
    """(float32 state dict, ModelConfig, info) of a train, import, quantize or compress output directory; `weights`
    picks a train output's export or master weights (the other stages hold one set).

    info: kind (the stage), path, load_seconds (read + decompress + dequantize), tokenizer_sha256 (when the
    artifact records it). With `tokenizer`, refuses (exit 3) a tokenizer whose vocabulary size differs from
    the model's or whose sha256 differs from the recorded one."""
    directory = Path(directory)
    started = time.perf_counter()
    manifest = open_stage(directory, ARTIFACT_STAGES)
    kind = manifest["stage"]
    if weights != "export" and kind != "train":
        raise UsageError(f"{directory}: weights = {weights!r} needs a train output; a {kind} output holds one set")
    if kind in CHECKPOINT_STAGES:
        path = train_checkpoint(manifest, directory, weights)
        state, config, metadata = load_checkpoint(path)
        state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
        recorded = metadata.get("tokenizer_sha256")
    else:
        if kind == "quantize":
            path = output_path(manifest, directory, "quantized")
            state, config, plan = model_from_quantized(path, *load_quantized(path))
        else:
            path = output_path(manifest, directory, "blob")
            state, config, plan = load_blob_model(path)
        recorded = plan.get("tokenizer_sha256") or manifest.get("metrics", {}).get("tokenizer_sha256")
    info = {"kind": kind, "path": str(directory), "load_seconds": time.perf_counter() - started,
            "tokenizer_sha256": recorded}
    if tokenizer is not None:
        check_tokenizer_match(config.vocab_size, recorded, Path(tokenizer))
    return state, config, info


def model_from_quantized(path: Path, tensors: dict, plan: dict) -> tuple[dict, ModelConfig, dict]:
    """(float32 state dict, ModelConfig, plan) of a quantized state, every tensor checked against the config."""
    state = dequantize_state(tensors, plan)
    config = plan_model_config(plan, path)
    check_tensors(path, state, config)
    return state, config, plan


def load_blob_model(path: Path) -> tuple[dict, ModelConfig, dict]:
    """model_from_quantized of a blob file: what `pgolf eval` and the bundled train_gpt.py both load."""
    return model_from_quantized(path, *read_blob(path))


def check_tokenizer_match(model_vocab_size: int, recorded_sha256: str | None, tokenizer: Path) -> None:
    """The tokenizer must have the model's vocabulary size, and be the recorded file when one is recorded."""
    vocab_size = load_tokenizer(tokenizer).GetPieceSize()
    if vocab_size != model_vocab_size:
        raise InvalidInput(f"{tokenizer}: tokenizer vocabulary is {vocab_size} but the model's vocab_size is "
                           f"{model_vocab_size} (wrong --data or --tokenizer for this artifact?)")
    if recorded_sha256 and sha256_file(tokenizer) != recorded_sha256:
        raise InvalidInput(f"{tokenizer}: sha256 {sha256_file(tokenizer)[:12]}... differs from the tokenizer "
                           f"the model was trained with ({recorded_sha256[:12]}...)")
