"""Model checkpoints: safetensors with the model config as JSON in the header metadata. No pickle, ever.

Metadata keys: `format` = "pgolf-checkpoint", `model_config` = JSON of pgolf.model.ModelConfig, plus whatever
string-valued entries the caller adds (train adds `vocab_size` and `tokenizer_sha256`, docs/INTERNALS.md).
"""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pgolf.artifacts import atomic_write_bytes, safetensors_bytes
from pgolf.errors import InvalidInput
from pgolf.model import GPT, ModelConfig

CHECKPOINT_FORMAT = "pgolf-checkpoint"
RESERVED_METADATA = ("format", "model_config")


def model_config_to_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def model_config_from_json(text: str) -> ModelConfig:
    """Parse and validate; fields missing from older files take their defaults (techniques off)."""
    values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError("model config JSON must be an object")
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown model config fields: {', '.join(unknown)}")
    # JSON has no tuples: a tuple field (value_embed_layers) comes back as a list.
    return ModelConfig(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the state dict GPT(config) saves, computed without allocating the weights."""
    with torch.device("meta"):
        model = GPT(config, init_weights=False)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def save_checkpoint(path, state_dict: dict, model_config: ModelConfig, metadata: dict[str, str]) -> None:
    """Write atomically (temporary name, then os.replace); tensors are saved contiguous on the CPU."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"checkpoint metadata must map str to str, got {key!r}: {value!r}")
        if key in RESERVED_METADATA:
            raise ValueError(f"checkpoint metadata key '{key}' is reserved")
    header = {"format": CHECKPOINT_FORMAT, "model_config": model_config_to_json(model_config), **metadata}
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata=header))


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, str]]:
    """Returns (state_dict, model_config, metadata without the reserved keys); refuses (exit 3) anything
    that is not a pgolf checkpoint whose tensors match its config's model exactly."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidInput(f"{path}: not a safetensors file ({e})") from None
    if header.get("format") != CHECKPOINT_FORMAT:
        raise InvalidInput(f"{path}: not a pgolf checkpoint (metadata format is {header.get('format')!r})")
    if "model_config" not in header:
        raise InvalidInput(f"{path}: checkpoint metadata has no model_config")
    try:
        config = model_config_from_json(header["model_config"])
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{path}: invalid model_config ({e})") from None
    check_tensors(path, state_dict, config)
    metadata = {key: value for key, value in header.items() if key not in RESERVED_METADATA}
    return state_dict, config, metadata


def check_tensors(path: Path, state_dict: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """The state dict GPT(config) loads, exactly: names, shapes, float dtypes, and finite values (a NaN or Inf
    weight is a diverged or corrupt run, never something to quantize, score or ship)."""
    blocks = {int(name.split(".")[1]) for name in state_dict if name.startswith("blocks.") and
              name.split(".")[1].isdigit()}
    if config.num_layers > max(blocks, default=-1) + 1:  # before building even a meta model of that depth
        raise InvalidInput(f"{path}: tensors hold blocks {describe_blocks(blocks)}, the model config has "
                           f"{config.num_layers} layers")
    try:
        shapes = expected_shapes(config)
    except (RuntimeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"{path}: the model config describes no buildable model ({e})") from None
    missing = sorted(set(shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(shapes))
    if missing or unexpected:
        raise InvalidInput(
            f"{path}: tensors do not match the model config (missing: {', '.join(missing[:5]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    for name, shape in shapes.items():
        tensor = state_dict[name]
        if tuple(tensor.shape) != shape:
            raise InvalidInput(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config needs {shape}")
        if not tensor.is_floating_point():
            raise InvalidInput(f"{path}: tensor {name} is {tensor.dtype}, expected a floating-point dtype")
        non_finite = int((~torch.isfinite(tensor)).sum())
        if non_finite:
            raise InvalidInput(f"{path}: tensor {name} holds {non_finite:,} NaN/Inf values (a diverged or "
                               f"corrupt run)")


def describe_blocks(blocks: set[int]) -> str:
    if not blocks:
        return "none"
    return f"{min(blocks)}..{max(blocks)}" if blocks == set(range(min(blocks), max(blocks) + 1)) else \
        ", ".join(map(str, sorted(blocks)[:8]))
