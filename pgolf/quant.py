"""Per-row integer quantization schemes shared by QAT (pgolf.model) and export (`pgolf quantize`).

Symmetric per-row scales: a row's clip value c maps to the scheme's largest positive level, so
scale = c / qmax and q = clamp(round(w / scale), qmin, qmax). int5 keeps the challenge's [-16, 15] range.
"""

import torch

# bits -> (qmin, qmax), as the seed submissions define them (REFERENCE.md).
QUANT_RANGES = {8: (-127, 127), 7: (-63, 63), 6: (-31, 31), 5: (-16, 15)}


def quant_range(bits: int) -> tuple[int, int]:
    if bits not in QUANT_RANGES:
        raise ValueError(f"bits must be one of {sorted(QUANT_RANGES)}, got {bits}")
    return QUANT_RANGES[bits]


def row_scales(weight: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """One float32 scale per row: clip (default: the row's max |w|) over qmax; never zero."""
    _, qmax = quant_range(bits)
    if clip is None:
        clip = weight.detach().abs().amax(dim=-1).float()
    return (clip / qmax).clamp_min(1e-12)


def quantize_rows(weight: torch.Tensor, bits: int, scales: torch.Tensor) -> torch.Tensor:
    """Integer levels (int8 container) of a 2-D weight for per-row `scales`."""
    qmin, qmax = quant_range(bits)
    levels = torch.round(weight.float() / scales[:, None]).clamp_(qmin, qmax)
    return levels.to(torch.int8)


def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize per row with absmax scales, in the weight's dtype (STE is applied by the caller)."""
    qmin, qmax = quant_range(bits)
    scales = weight.detach().abs().amax(dim=-1, keepdim=True).float().div(qmax).clamp_min(1e-12)
    return (torch.round(weight.float() / scales).clamp(qmin, qmax) * scales).to(weight.dtype)
