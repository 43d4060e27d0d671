"""Clip methods: how an integer scheme picks each row's clip value (hence its scale) and rounds the row.

Every method maps a float [rows, cols] matrix to (levels int8 [rows, cols], scales fp16 [rows], the method's
name as recorded), levels in the scheme's [qmin, qmax] and scale = clip / qmax per row.

    percentile  the challenge baseline's rule: clip at the 99.99984th percentile of |w|, levels from the
                float32 scale, scale stored as fp16
    gptq-lite   try several percentiles (and the baseline's), keep each row's lowest squared reconstruction
                error
    gptq        GPTQ error feedback (pgolf.gptq) for each gptq-lite candidate, keep each row's lowest
                Hessian-weighted error; a tensor without a Hessian falls back to gptq-lite
    sdclip      the 04-16 record's standard-deviation clip: c = k * std(row) with k by tensor group (token
                embedding 15, MLP 12, attention 13, other matrices 12.85), rounded to nearest; every k is
                multiplied by ClipOptions.k_scale (1 by default; the plan's clip-k fit raises it: a larger k
                means coarser steps, levels nearer zero, fewer compressed bytes)
    gptq-sdclip the record's export: GPTQ error feedback with the sdclip scales; a tensor without a Hessian falls
                back to sdclip

Adding a method = one ClipMethod subclass registered in CLIPS, plus its tests; plans, `pgolf quantize` and the
bundled script find it here by name.
"""

import dataclasses
from dataclasses import dataclass

import torch

from pgolf.gptq import GPTQ_BLOCK, GPTQ_DAMP, gptq_levels, hessian_error
from pgolf.quant import dequantize_rows, quant_range, quantize_rows, row_quantiles, row_scales, scale_floor_value

CHALLENGE_CLIP_PERCENTILE = 99.99984
GPTQ_LITE_PERCENTILES = (99.9, 99.95, 99.99, 99.999, 100.0)


@dataclass(frozen=True)
class ClipOptions:
    """What a clip method may read beyond the matrix: which tensor it is, the scale floor, GPTQ's settings and
    Hessian."""

    floor: float  # smallest scale (pgolf.quant.scale_floor_value)
    name: str = ""  # the tensor's state-dict name (a method may treat groups of tensors differently)
    hessian: torch.Tensor | None = None  # E[x x^T] of the layer's inputs (clip methods that need calibration)
    gptq_damp: float = GPTQ_DAMP
    gptq_block: int = GPTQ_BLOCK
    embedding_k: float | None = None  # sdclip / gptq-sdclip: the token embedding's k (None: SDCLIP_SIGMAS)
    k_scale: float = 1.0  # sdclip / gptq-sdclip: every group's k times this (the clip-k size fit searches it)
    gptq_levels: torch.Tensor | None = None  # gptq-sdclip: levels a stacked solve already found (gptq_sdclip_levels)


class ClipMethod:
    name = ""
    needs_calibration = False  # True: uses Hessians from train data, so quantize needs --data

    def quantize(self, rows: torch.Tensor, bits: int, options: ClipOptions):
        """(levels int8 [rows, cols], scales fp16 [rows], name of the method that produced them)."""
        raise NotImplementedError


def percentile_rows(rows: torch.Tensor, bits: int, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The challenge baseline's export rule: weights clamped to the clip first and rounded with the float32
    scale; only the stored scale is fp16."""
    qmin, qmax = quant_range(bits)
    clip = row_quantiles(rows.abs(), [CHALLENGE_CLIP_PERCENTILE])[0]
    clipped = torch.maximum(torch.minimum(rows, clip[:, None]), -clip[:, None])
    scales = row_scales(rows, bits, clip, floor)
    levels = torch.clamp(torch.round(clipped / scales[:, None]), qmin, qmax).to(torch.int8)
    return levels, scales.to(torch.float16)


def clip_candidates(rows: torch.Tensor, bits: int, floor: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(levels, fp16 scales) for the baseline's percentile rule and for each GPTQ-lite percentile."""
    candidates = [percentile_rows(rows, bits, floor)]
    for clip in row_quantiles(rows.abs(), list(GPTQ_LITE_PERCENTILES)):
        scales = row_scales(rows, bits, clip, floor).to(torch.float16)
        candidates.append((quantize_rows(rows, bits, scales.float()), scales))
    return candidates


def candidate_diffs(rows: torch.Tensor, candidates: list) -> torch.Tensor:
    """[candidates, rows, cols] reconstruction errors w - levels * scale."""
    return rows[None] - torch.stack([dequantize_rows(levels, scales) for levels, scales in candidates])


def best_per_row(candidates: list, errors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (levels, scale) from its lowest-error candidate (errors: [candidates, rows]; first wins)."""
    best = errors.argmin(dim=0)
    levels = torch.stack([c[0] for c in candidates])[best, torch.arange(best.numel(), device=best.device)]
    scales = torch.stack([c[1] for c in candidates]).gather(0, best[None])[0]
    return levels, scales


class PercentileClip(ClipMethod):
    name = "percentile"

    def quantize(self, rows, bits, options):
        return (*percentile_rows(rows, bits, options.floor), self.name)


class GptqLiteClip(ClipMethod):
    name = "gptq-lite"

    def quantize(self, rows, bits, options):
        candidates = clip_candidates(rows, bits, options.floor)
        return (*best_per_row(candidates, candidate_diffs(rows, candidates).square().sum(dim=-1)), self.name)


class GptqClip(ClipMethod):
    """GPTQ for every gptq-lite candidate's scales (stacked as rows of one solve), plus the round-to-nearest
    candidates themselves; each row keeps whichever has the lowest Hessian-weighted error, so the result is
    never worse on that measure than gptq-lite."""

    name = "gptq"
    needs_calibration = True

    def quantize(self, rows, bits, options):
        if options.hessian is None:
            return CLIPS["gptq-lite"].quantize(rows, bits, options)
        qmin, qmax = quant_range(bits)
        hessian = options.hessian.to(rows.device).float()
        plain = clip_candidates(rows, bits, options.floor)
        stacked_scales = torch.cat([scales for _, scales in plain])
        stacked = gptq_levels(rows.repeat(len(plain), 1), hessian, stacked_scales.float(), qmin, qmax,
                              options.gptq_damp, options.gptq_block)
        solved = list(zip(stacked.split(rows.size(0)), stacked_scales.split(rows.size(0)), strict=True))
        candidates = plain + solved
        diffs = candidate_diffs(rows, candidates)
        errors = hessian_error(diffs.reshape(-1, rows.size(1)), hessian).reshape(len(candidates), -1)
        return (*best_per_row(candidates, errors), self.name)


# The 04-16 record's clip widths in row standard deviations (MATRIX/EMBED/MLP/ATTN_CLIP_SIGMAS), by tensor name.
SDCLIP_SIGMAS = {"tok_emb": 15.0, ".mlp.": 12.0, ".attn.": 13.0}
SDCLIP_OTHER_SIGMAS = 12.85


def sdclip_sigmas(name: str) -> float:
    """k for a tensor: the first group whose marker its name holds, as the record tests them in order."""
    return next((k for marker, k in SDCLIP_SIGMAS.items() if marker in name), SDCLIP_OTHER_SIGMAS)


def sdclip_scales(rows: torch.Tensor, bits: int, options: ClipOptions) -> torch.Tensor:
    """fp16 per-row scales k * std(row) / qmax (unbiased std, as torch's default and the record)."""
    _, qmax = quant_range(bits)
    k = sdclip_sigmas(options.name)
    if options.embedding_k is not None and "tok_emb" in options.name:
        k = options.embedding_k
    k *= options.k_scale
    return (k * rows.std(dim=1) / qmax).clamp_min(options.floor).to(torch.float16)


class SdClip(ClipMethod):
    name = "sdclip"

    def quantize(self, rows, bits, options):
        scales = sdclip_scales(rows, bits, options)
        return quantize_rows(rows, bits, scales.float()), scales, self.name


class GptqSdClip(ClipMethod):
    name = "gptq-sdclip"
    needs_calibration = True

    def quantize(self, rows, bits, options):
        if options.hessian is None:
            return CLIPS["sdclip"].quantize(rows, bits, options)
        qmin, qmax = quant_range(bits)
        scales = sdclip_scales(rows, bits, options)
        levels = options.gptq_levels
        if levels is None:
            levels = gptq_levels(rows, options.hessian.to(rows.device).float(), scales.float(), qmin, qmax,
                                 options.gptq_damp, options.gptq_block)
        return levels, scales, self.name


def gptq_sdclip_levels(tensor: torch.Tensor, bits: int, k_scales: list[float], scale_floor: str = "none",
                       **options) -> list[torch.Tensor]:
    """gptq-sdclip's GPTQ levels [rows, cols] of one matrix at each sdclip k factor of `k_scales`, from one solve
    of the rows stacked once per factor (GPTQ treats rows independently): one call where the clip-k fit would
    run a call per factor of a round, each a Python loop over the columns. `options`: name, hessian, gptq_damp,
    gptq_block, embedding_k (ClipOptions)."""
    rows = tensor.detach().reshape(tensor.size(0), -1).float()
    base = ClipOptions(scale_floor_value(bits, scale_floor), **options)
    scales = [sdclip_scales(rows, bits, dataclasses.replace(base, k_scale=k)).float() for k in k_scales]
    qmin, qmax = quant_range(bits)
    stacked = gptq_levels(rows.repeat(len(k_scales), 1), base.hessian.to(rows.device).float(), torch.cat(scales),
                          qmin, qmax, base.gptq_damp, base.gptq_block)
    return list(stacked.split(rows.size(0)))


CLIPS: dict[str, ClipMethod] = {method.name: method for method in (
    PercentileClip(), GptqLiteClip(), GptqClip(), SdClip(), GptqSdClip())}
CLIP_METHODS = tuple(CLIPS)


def clip_method(name: str) -> ClipMethod:
    if name not in CLIPS:
        raise ValueError(f"clip must be one of {', '.join(CLIPS)}, got {name!r}")
    return CLIPS[name]


def quantize_matrix(tensor: torch.Tensor, bits: int, clip: str = "percentile", scale_floor: str = "none",
                    **options) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(levels int8 in the tensor's shape, fp16 per-row scales, clip method used) of a >= 2-D float tensor;
    `options`: hessian, gptq_damp, gptq_block, embedding_k, k_scale (ClipOptions)."""
    method = clip_method(clip)
    rows = tensor.detach().reshape(tensor.size(0), -1).float()
    floor = scale_floor_value(bits, scale_floor)
    levels, scales, used = method.quantize(rows, bits, ClipOptions(floor, **options))
    return levels.reshape(tensor.shape).contiguous(), scales.contiguous(), used
