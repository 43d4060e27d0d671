"""Per-row integer quantization: the arithmetic shared by QAT (pgolf.model) and export (pgolf.schemes).

Symmetric per-row scales: a row's clip value c maps to the scheme's largest positive level, so
scale = c / qmax and q = clamp(round(w / scale), qmin, qmax). int5 keeps the challenge's [-16, 15] range.
"""

import torch

# bits -> (qmin, qmax), as the seed submissions define them (REFERENCE.md).
QUANT_RANGES = {8: (-127, 127), 7: (-63, 63), 6: (-31, 31), 5: (-16, 15)}
# "challenge": scales never below 1/qmax, as the baseline's and the records' exports do (rows whose clip is
# under 1.0 lose levels but compress smaller); "none": only fp16's smallest normal, like QAT's fake_quantize.
SCALE_FLOORS = ("none", "challenge")
QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger inputs


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


def scale_floor_value(bits: int, scale_floor: str) -> float:
    if scale_floor not in SCALE_FLOORS:
        raise ValueError(f"scale_floor must be one of {', '.join(SCALE_FLOORS)}, got {scale_floor!r}")
    return 1.0 / quant_range(bits)[1] if scale_floor == "challenge" else torch.finfo(torch.float16).tiny


def row_quantiles(magnitudes: torch.Tensor, percentiles: list[float]) -> torch.Tensor:
    """[len(percentiles), rows] per-row quantiles (linear interpolation), in chunks torch.quantile accepts."""
    q = torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float32, device=magnitudes.device)
    chunk = max(1, QUANTILE_MAX_NUMEL // max(1, magnitudes.size(1)))
    return torch.cat([torch.quantile(part, q, dim=1) for part in magnitudes.split(chunk)], dim=1)


def dequantize_rows(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """levels * scale per row, float32, in the levels' shape."""
    rows = levels.reshape(levels.size(0), -1).float() * scales.float()[:, None]
    return rows.reshape(levels.shape)


def relative_error(original: torch.Tensor, restored: torch.Tensor) -> float:
    """||W - W_hat|| / ||W|| (0 for an all-zero W restored exactly)."""
    original = original.detach().float()
    norm = original.norm().item()
    diff = (original - restored.to(original.device).float()).norm().item()
    return diff / norm if norm > 0 else diff
