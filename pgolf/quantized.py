"""The quantized state: what `pgolf quantize` writes, `pgolf compress` packs and eval dequantizes.

Files (docs/INTERNALS.md): `quantized.safetensors` holds each tensor's stored form under the names its scheme
gives (pgolf.schemes); its metadata says `format` = "pgolf-quantized" and `format_version`. `plan.json` holds
`format_version`, the model config, the tokenizer digest, where the weights came from, the plan, and per
tensor its scheme, bits, shape, clip method, relative error and raw bytes. The same plan travels inside the
blob. A reader refuses a format version it does not know, naming the file.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from pgolf.artifacts import atomic_write_bytes, safetensors_bytes
from pgolf.errors import InvalidInput
from pgolf.quant import relative_error
from pgolf.schemes import SCHEMES, get_scheme

QUANTIZED_FILE = "quantized.safetensors"
PLAN_FILE = "plan.json"
QUANTIZED_FORMAT = "pgolf-quantized"
# The stored layout's version, in plan.json and in quantized.safetensors' metadata. Version 1 is the layout
# since the first release; files written before the field existed have that layout and no field. Version 2 adds
# schemes with more stored tensors per name (intB+lqerF's factors) and int8-gate; every version-1 file reads as
# before.
QUANTIZED_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)


def quantize_entry(name: str, tensor: torch.Tensor, scheme: str, **options) -> tuple[dict, dict]:
    """(stored tensors, plan record) of one tensor under `scheme`; options (clip, scale_floor, hessian,
    gptq_damp, gptq_block) go to the scheme."""
    chosen = get_scheme(scheme)
    chosen.check_tensor(name, tensor)
    stored, clip = chosen.quantize(name, tensor, **options)
    restored = chosen.restore(name, stored)
    record = {
        "scheme": scheme,
        "bits": chosen.bits(tensor),
        "shape": list(tensor.shape),
        "clip": clip,
        "rel_error": relative_error(tensor.cpu(), restored) if tensor.is_floating_point() else 0.0,
        "bytes": chosen.raw_bytes(name, stored),
    }
    return stored, record


def quantize_state(
    state_dict: dict[str, torch.Tensor],
    schemes: dict[str, str],
    *,
    hessians: dict[str, torch.Tensor] | None = None,
    **options,
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(stored tensors, per-tensor plan records) for a state dict and a scheme per tensor name (pgolf.plans
    assigns them). `options`: clip, scale_floor, gptq_damp, gptq_block; `hessians` feed clip="gptq"."""
    missing = sorted(set(state_dict) - set(schemes))
    if missing:
        raise ValueError(f"no scheme for tensor(s) {', '.join(missing)}")
    tensors, records = {}, {}
    for name, tensor in state_dict.items():
        hessian = (hessians or {}).get(name)
        stored, records[name] = quantize_entry(name, tensor, schemes[name], hessian=hessian, **options)
        clash = set(stored) & set(tensors)
        if clash:
            raise ValueError(f"stored tensor name {sorted(clash)[0]!r} is used twice (two schemes' names clash)")
        tensors.update(stored)
    return tensors, records


def dequantize_state(tensors: dict[str, torch.Tensor], plan: dict) -> dict[str, torch.Tensor]:
    """{name: float32 tensor} (non-float tensors unchanged) for every tensor the plan lists: a state dict
    GPT loads. The state must have passed check_quantized."""
    return {name: SCHEMES[record["scheme"]].restore(name, tensors) for name, record in plan["tensors"].items()}


def check_format_version(version, where: str) -> None:
    if version not in READABLE_FORMAT_VERSIONS:
        raise InvalidInput(f"{where}: quantized format version {version!r}, this pgolf reads version(s) "
                           f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))} (re-run `pgolf quantize` with this "
                           f"pgolf, or use the pgolf that wrote it)")


def check_quantized(tensors: dict[str, torch.Tensor], plan: dict, where: str) -> None:
    """InvalidInput naming `where` unless the plan's format version is readable and each plan record's stored
    tensors are what its scheme writes (dtype, shape, level range, finite values), and nothing else is stored."""
    if not isinstance(plan, dict) or not isinstance(plan.get("tensors"), dict):
        raise InvalidInput(f"{where}: plan has no 'tensors' table")
    check_format_version(plan.get("format_version", 1), where)
    expected = set()
    for name, record in plan["tensors"].items():
        scheme, shape = (record.get("scheme"), record.get("shape")) if isinstance(record, dict) else (None, None)
        if not isinstance(scheme, str) or not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput(f"{where}: plan record of '{name}' is malformed (needs a scheme and a shape)")
        if scheme not in SCHEMES:
            raise InvalidInput(f"{where}: '{name}' has unknown scheme {scheme!r}")
        stored = tensors.get(name)
        if stored is None:
            raise InvalidInput(f"{where}: no stored tensor '{name}' (listed in the plan)")
        if list(stored.shape) != shape:
            raise InvalidInput(f"{where}: '{name}' has shape {list(stored.shape)}, the plan says {shape}")
        SCHEMES[scheme].validate(name, tensors, shape, where)
        expected.update(SCHEMES[scheme].stored_names(name))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise InvalidInput(f"{where}: stored tensor '{extra[0]}' is not in the plan")


def save_quantized(directory: Path, tensors: dict[str, torch.Tensor], plan: dict) -> tuple[Path, Path]:
    """Write quantized.safetensors and plan.json into `directory` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    metadata = {"format": QUANTIZED_FORMAT, "format_version": str(QUANTIZED_FORMAT_VERSION)}
    files = {
        directory / QUANTIZED_FILE: safetensors_bytes(contiguous, metadata=metadata),
        directory / PLAN_FILE: (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode(),
    }
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return directory / QUANTIZED_FILE, directory / PLAN_FILE


def safetensors_metadata(data: bytes, where: Path) -> dict:
    """The `__metadata__` of a safetensors file's JSON header (the format: u64 length, then the header)."""
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
        metadata = header.get("__metadata__") or {}
    except (ValueError, AttributeError) as e:
        raise InvalidInput(f"{where}: not a safetensors file ({e})") from None
    return metadata if isinstance(metadata, dict) else {}


def load_quantized(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, plan) from a directory holding quantized.safetensors + plan.json, or from the .safetensors
    file with plan.json beside it; InvalidInput naming the file on anything missing, unreadable, of another
    format version or inconsistent."""
    path = Path(path)
    tensors_path = path / QUANTIZED_FILE if path.is_dir() else path
    plan_path = tensors_path.with_name(PLAN_FILE)
    for needed in (tensors_path, plan_path):
        if not needed.is_file():
            raise InvalidInput(f"{needed}: not found")
    data = tensors_path.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as e:
        raise InvalidInput(f"{tensors_path}: not a safetensors file ({e})") from None
    metadata = safetensors_metadata(data, tensors_path)
    if metadata.get("format") != QUANTIZED_FORMAT:
        raise InvalidInput(f"{tensors_path}: not a pgolf quantized state (metadata format is "
                           f"{metadata.get('format')!r})")
    version = metadata.get("format_version", "1")
    check_format_version(int(version) if version.isdigit() else version, str(tensors_path))
    try:
        plan = json.loads(plan_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{plan_path}: not valid JSON ({e})") from None
    check_quantized(tensors, plan, str(tensors_path))
    return tensors, plan
