"""Per-row integer quantization shared by QAT (pgolf.model) and export (`pgolf quantize`), and the quantized
state format that eval dequantizes.

Symmetric per-row scales: a row's clip value c maps to the scheme's largest positive level, so
scale = c / qmax and q = clamp(round(w / scale), qmin, qmax). int5 keeps the challenge's [-16, 15] range.

Clip choice per row (`clip`):
    percentile  the challenge baseline's rule: clip at the 99.99984th percentile of |w|, levels from the
                float32 scale, scale stored as fp16
    gptq-lite   try several percentiles (and the baseline's), keep each row's lowest squared reconstruction
                error
    gptq        GPTQ error feedback (pgolf.gptq) for each gptq-lite candidate, keep each row's lowest
                Hessian-weighted error; tensors without a Hessian fall back to gptq-lite

Quantized state (docs/INTERNALS.md): for an integer-quantized tensor N, `N` holds its levels (int8
container, original shape) and `N.scale` its fp16 per-row scales; every other tensor is stored under its name
as fp16/fp32 (or unchanged when it is not floating point). plan.json records each tensor's scheme.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from pgolf.artifacts import atomic_write_bytes
from pgolf.errors import InvalidInput
from pgolf.gptq import GPTQ_BLOCK, GPTQ_DAMP, gptq_levels, hessian_error

# bits -> (qmin, qmax), as the seed submissions define them (REFERENCE.md).
QUANT_RANGES = {8: (-127, 127), 7: (-63, 63), 6: (-31, 31), 5: (-16, 15)}
INT_SCHEMES = {"int5": 5, "int6": 6, "int7": 7, "int8": 8}
FLOAT_SCHEMES = {"fp16": torch.float16, "fp32": torch.float32}
RAW_SCHEME = "raw"  # a non-float tensor, stored unchanged
CLIP_METHODS = ("percentile", "gptq-lite", "gptq")
# "challenge": scales never below 1/qmax, as the baseline's and the records' exports do (rows whose clip is
# under 1.0 lose levels but compress smaller); "none": only fp16's smallest normal, like QAT's fake_quantize.
SCALE_FLOORS = ("none", "challenge")
CHALLENGE_CLIP_PERCENTILE = 99.99984
GPTQ_LITE_PERCENTILES = (99.9, 99.95, 99.99, 99.999, 100.0)
QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger inputs
QUANTIZED_FILE = "quantized.safetensors"
PLAN_FILE = "plan.json"
SCALE_SUFFIX = ".scale"


def quant_range(bits: int) -> tuple[int, int]:
    if bits not in QUANT_RANGES:
        raise ValueError(f"bits must be one of {sorted(QUANT_RANGES)}, got {bits}")
    return QUANT_RANGES[bits]


def row_scales(
    weight: torch.Tensor, bits: int, clip: torch.Tensor | None = None, floor: float = 1e-12
) -> torch.Tensor:
    """One float32 scale per row: clip (default: the row's max |w|) over qmax; never below `floor`."""
    _, qmax = quant_range(bits)
    if clip is None:
        clip = weight.detach().abs().amax(dim=-1).float()
    return (clip / qmax).clamp_min(floor)


def quantize_rows(weight: torch.Tensor, bits: int, scales: torch.Tensor) -> torch.Tensor:
    """Integer levels (int8 container) of a 2-D weight for per-row `scales`."""
    qmin, qmax = quant_range(bits)
    levels = torch.round(weight.float() / scales[:, None]).clamp_(qmin, qmax)
    return levels.to(torch.int8)


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize per row with absmax scales, in the weight's dtype (the caller applies the STE)."""
    qmin, qmax = quant_range(bits)
    scales = weight.detach().abs().amax(dim=-1, keepdim=True).float().div(qmax).clamp_min(1e-12)
    return (torch.round(weight.float() / scales).clamp(qmin, qmax) * scales).to(weight.dtype)


def scheme_bits(scheme: str, dtype: torch.dtype | None = None) -> int:
    if scheme in INT_SCHEMES:
        return INT_SCHEMES[scheme]
    if scheme in FLOAT_SCHEMES:
        return torch.finfo(FLOAT_SCHEMES[scheme]).bits
    return torch.empty(0, dtype=dtype).element_size() * 8


def scale_floor_value(bits: int, scale_floor: str) -> float:
    if scale_floor not in SCALE_FLOORS:
        raise ValueError(f"scale_floor must be one of {', '.join(SCALE_FLOORS)}, got {scale_floor!r}")
    return 1.0 / quant_range(bits)[1] if scale_floor == "challenge" else torch.finfo(torch.float16).tiny


def row_quantiles(magnitudes: torch.Tensor, percentiles: list[float]) -> torch.Tensor:
    """[len(percentiles), rows] per-row quantiles (linear interpolation), in chunks torch.quantile accepts."""
    q = torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float32, device=magnitudes.device)
    chunk = max(1, QUANTILE_MAX_NUMEL // max(1, magnitudes.size(1)))
    return torch.cat([torch.quantile(part, q, dim=1) for part in magnitudes.split(chunk)], dim=1)


def quantize_percentile(rows: torch.Tensor, bits: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The challenge baseline's export rule: (levels int8, scales fp16). Weights are clamped to the clip first
    and rounded with the float32 scale; only the stored scale is fp16."""
    qmin, qmax = quant_range(bits)
    clip = row_quantiles(rows.abs(), [CHALLENGE_CLIP_PERCENTILE])[0]
    clipped = torch.maximum(torch.minimum(rows, clip[:, None]), -clip[:, None])
    scales = row_scales(rows, bits, clip, floor)
    levels = torch.clamp(torch.round(clipped / scales[:, None]), qmin, qmax).to(torch.int8)
    return levels, scales.to(torch.float16)


def clip_candidates(rows: torch.Tensor, bits: int, floor: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(levels, fp16 scales) for the baseline's percentile rule and for each GPTQ-lite percentile."""
    candidates = [quantize_percentile(rows, bits, floor)]
    for clip in row_quantiles(rows.abs(), list(GPTQ_LITE_PERCENTILES)):
        scales = row_scales(rows, bits, clip, floor).to(torch.float16)
        candidates.append((quantize_rows(rows, bits, scales.float()), scales))
    return candidates


def dequantize_rows(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """levels * scale per row, float32, in the levels' shape."""
    rows = levels.reshape(levels.size(0), -1).float() * scales.float()[:, None]
    return rows.reshape(levels.shape)


def candidate_diffs(rows: torch.Tensor, candidates: list) -> torch.Tensor:
    """[candidates, rows, cols] reconstruction errors w - levels * scale."""
    return rows[None] - torch.stack([dequantize_rows(levels, scales) for levels, scales in candidates])


def best_per_row(candidates: list, errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (levels, scale) from its lowest-error candidate (errors: [candidates, rows]; first wins)."""
    best = errors.argmin(dim=0)
    levels = torch.stack([c[0] for c in candidates])[best, torch.arange(best.numel(), device=best.device)]
    scales = torch.stack([c[1] for c in candidates]).gather(0, best[None])[0]
    return levels, scales


def quantize_gptq_lite(rows: torch.Tensor, bits: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    candidates = clip_candidates(rows, bits, floor)
    return best_per_row(candidates, candidate_diffs(rows, candidates).square().sum(dim=-1))


def quantize_gptq(
    rows: torch.Tensor, bits: int, floor: float, hessian: torch.Tensor, damp: float, block: int
):
    """GPTQ for every gptq-lite candidate's scales (stacked as rows of one solve), plus the round-to-nearest
    candidates themselves; each row keeps whichever has the lowest Hessian-weighted error, so the result is
    never worse on that measure than gptq-lite."""
    qmin, qmax = quant_range(bits)
    hessian = hessian.to(rows.device).float()
    plain = clip_candidates(rows, bits, floor)
    stacked_scales = torch.cat([scales for _, scales in plain])
    stacked = gptq_levels(
        rows.repeat(len(plain), 1), hessian, stacked_scales.float(), qmin, qmax, damp, block
    )
    solved = list(zip(stacked.split(rows.size(0)), stacked_scales.split(rows.size(0)), strict=True))
    candidates = plain + solved
    diffs = candidate_diffs(rows, candidates)
    errors = hessian_error(diffs.reshape(-1, rows.size(1)), hessian).reshape(len(candidates), -1)
    return best_per_row(candidates, errors)


def quantize_matrix(
    tensor: torch.Tensor,
    bits: int,
    clip: str = "percentile",
    scale_floor: str = "none",
    hessian: torch.Tensor | None = None,
    gptq_damp: float = GPTQ_DAMP,
    gptq_block: int = GPTQ_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(levels int8 in the tensor's shape, fp16 per-row scales, clip method used) of a >= 2-D float tensor."""
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip must be one of {', '.join(CLIP_METHODS)}, got {clip!r}")
    rows = tensor.detach().reshape(tensor.size(0), -1).float()
    floor = scale_floor_value(bits, scale_floor)
    if clip == "gptq" and hessian is not None:
        levels, scales = quantize_gptq(rows, bits, floor, hessian, gptq_damp, gptq_block)
    elif clip == "percentile":
        levels, scales = quantize_percentile(rows, bits, floor)
    else:
        levels, scales = quantize_gptq_lite(rows, bits, floor)
        clip = "gptq-lite"
    return levels.reshape(tensor.shape).contiguous(), scales.contiguous(), clip


def relative_error(original: torch.Tensor, restored: torch.Tensor) -> float:
    """||W - W_hat|| / ||W|| (0 for an all-zero W restored exactly)."""
    original = original.detach().float()
    norm = original.norm().item()
    diff = (original - restored.to(original.device).float()).norm().item()
    return diff / norm if norm > 0 else diff


def quantize_entry(name: str, tensor: torch.Tensor, scheme: str, **options) -> tuple[dict, dict]:
    """(stored tensors, plan record) of one tensor under `scheme`; options go to quantize_matrix."""
    shape = list(tensor.shape)
    if scheme in INT_SCHEMES:
        if tensor.dim() < 2 or not tensor.is_floating_point():
            raise ValueError(
                f"{name}: {scheme} needs a >= 2-D float tensor, got {tensor.dtype} of shape {shape}"
            )
        bits = INT_SCHEMES[scheme]
        levels, scales, clip = quantize_matrix(tensor, bits, **options)
        levels, scales = levels.cpu(), scales.cpu()
        stored = {name: levels, name + SCALE_SUFFIX: scales}
        restored = dequantize_rows(levels, scales)
        size = math.ceil(tensor.numel() * bits / 8) + scales.numel() * scales.element_size()
    elif scheme in FLOAT_SCHEMES:
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: {scheme} needs a float tensor, got {tensor.dtype}")
        bits, clip = scheme_bits(scheme), None
        restored = tensor.detach().cpu().to(FLOAT_SCHEMES[scheme]).contiguous()
        stored = {name: restored}
        size = restored.numel() * restored.element_size()
    elif scheme == RAW_SCHEME:
        restored = tensor.detach().cpu().contiguous()
        bits, clip = scheme_bits(scheme, tensor.dtype), None
        stored = {name: restored}
        size = restored.numel() * restored.element_size()
    else:
        valid = ", ".join([*INT_SCHEMES, *FLOAT_SCHEMES, RAW_SCHEME])
        raise ValueError(f"{name}: unknown scheme {scheme!r} (valid: {valid})")
    record = {
        "scheme": scheme,
        "bits": bits,
        "shape": shape,
        "clip": clip,
        "rel_error": relative_error(tensor.cpu(), restored) if tensor.is_floating_point() else 0.0,
        "bytes": size,
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
            raise ValueError(
                f"stored tensor name {sorted(clash)[0]!r} is used twice (a '{SCALE_SUFFIX}' clash)"
            )
        tensors.update(stored)
    return tensors, records


def dequantize_state(tensors: dict[str, torch.Tensor], plan: dict) -> dict[str, torch.Tensor]:
    """{name: float32 tensor} (non-float tensors unchanged) for every tensor the plan lists: a state dict
    GPT loads."""
    state = {}
    for name, record in plan["tensors"].items():
        if name not in tensors:
            raise InvalidInput(f"quantized state lacks tensor '{name}' that its plan lists")
        if record["scheme"] in INT_SCHEMES:
            if name + SCALE_SUFFIX not in tensors:
                raise InvalidInput(
                    f"quantized state lacks the scales '{name}{SCALE_SUFFIX}' of tensor '{name}'"
                )
            state[name] = dequantize_rows(tensors[name], tensors[name + SCALE_SUFFIX])
        elif tensors[name].is_floating_point():
            state[name] = tensors[name].float()
        else:
            state[name] = tensors[name]
    return state


def check_quantized(tensors: dict[str, torch.Tensor], plan: dict, where: str) -> None:
    """InvalidInput naming `where` unless each plan record's stored tensors have the right dtype and shape, the
    levels lie in the scheme's range and every float value (scales included) is finite."""
    if not isinstance(plan, dict) or not isinstance(plan.get("tensors"), dict):
        raise InvalidInput(f"{where}: plan has no 'tensors' table")
    for name, record in plan["tensors"].items():
        scheme, shape = (record.get("scheme"), record.get("shape")) if isinstance(record, dict) else (None, None)
        if not isinstance(scheme, str) or not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput(f"{where}: plan record of '{name}' is malformed (needs a scheme and a shape)")
        stored = tensors.get(name)
        if stored is None:
            raise InvalidInput(f"{where}: no stored tensor '{name}' (listed in the plan)")
        if list(stored.shape) != shape:
            raise InvalidInput(f"{where}: '{name}' has shape {list(stored.shape)}, the plan says {shape}")
        if scheme in INT_SCHEMES:
            low, high = quant_range(INT_SCHEMES[scheme])
            scales = tensors.get(name + SCALE_SUFFIX)
            if (
                len(shape) < 2
                or stored.dtype != torch.int8
                or scales is None
                or scales.dtype != torch.float16
                or list(scales.shape) != shape[:1]
            ):
                raise InvalidInput(f"{where}: '{name}' is not int8 levels with fp16 per-row scales")
            if stored.numel() and (int(stored.min()) < low or int(stored.max()) > high):
                raise InvalidInput(f"{where}: '{name}' has levels outside {scheme}'s [{low}, {high}]")
            check_finite_tensor(scales, f"{name}{SCALE_SUFFIX}", where)
        elif scheme in FLOAT_SCHEMES:
            if stored.dtype != FLOAT_SCHEMES[scheme]:
                raise InvalidInput(f"{where}: '{name}' is {stored.dtype}, the plan says {scheme}")
            check_finite_tensor(stored, name, where)
        elif scheme != RAW_SCHEME:
            raise InvalidInput(f"{where}: '{name}' has unknown scheme {scheme!r}")
    extra = sorted(set(tensors) - set(plan["tensors"])
                   - {n + SCALE_SUFFIX for n, r in plan["tensors"].items() if r["scheme"] in INT_SCHEMES})
    if extra:
        raise InvalidInput(f"{where}: stored tensor '{extra[0]}' is not in the plan")


def check_finite_tensor(tensor: torch.Tensor, name: str, where: str) -> None:
    if tensor.is_floating_point() and tensor.numel():
        non_finite = int((~torch.isfinite(tensor)).sum())
        if non_finite:
            raise InvalidInput(f"{where}: '{name}' holds {non_finite:,} NaN/Inf values")


def save_quantized(directory: Path, tensors: dict[str, torch.Tensor], plan: dict) -> tuple[Path, Path]:
    """Write quantized.safetensors and plan.json into `directory` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    files = {
        directory / QUANTIZED_FILE: save_safetensors_bytes(
            contiguous, metadata={"format": "pgolf-quantized"}
        ),
        directory / PLAN_FILE: (json.dumps(plan, indent=1, sort_keys=True) + "\n").encode(),
    }
    for path, data in files.items():
        atomic_write_bytes(path, data)
    return directory / QUANTIZED_FILE, directory / PLAN_FILE


def load_quantized(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, plan) from a directory holding quantized.safetensors + plan.json, or from the .safetensors
    file with plan.json beside it; InvalidInput naming the file on anything missing or inconsistent."""
    path = Path(path)
    tensors_path = path / QUANTIZED_FILE if path.is_dir() else path
    plan_path = tensors_path.with_name(PLAN_FILE)
    for needed in (tensors_path, plan_path):
        if not needed.is_file():
            raise InvalidInput(f"{needed}: not found")
    try:
        tensors = load_safetensors_bytes(tensors_path.read_bytes())
    except (SafetensorError, ValueError) as e:
        raise InvalidInput(f"{tensors_path}: not a safetensors file ({e})") from None
    try:
        plan = json.loads(plan_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{plan_path}: not valid JSON ({e})") from None
    check_quantized(tensors, plan, str(tensors_path))
    return tensors, plan
