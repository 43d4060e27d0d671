"""Quantization schemes: how one tensor N is stored in a quantized state and restored from it.

    int5 .. int8   per-row integer levels under N (int8 container, N's shape) and fp16 per-row scales under
                   N.scale; a clip method (pgolf.clips) picks each row's scale. int5 keeps the challenge's
                   [-16, 15], the others are symmetric (pgolf.quant.QUANT_RANGES)
    int8-gate      a tiny gate tensor (attention output gate [heads, width], SmearGate, ...) of any size, 1-D
                   or more: int8 levels under N and fp16 absmax scales per row (a 1-D tensor is one row) under
                   N.scale; the plan's `gates = "int8"` picks it for every gate tensor (pgolf.plans)
    intB+lqerF     intB levels plus LQER: a rank-r SVD of the residual W - deq(Q(W)) as two factors A [rows, r]
                   and B [r, cols], each stored as asymmetric per-row F-bit levels (uint in an int8 container)
                   under N.lqer_a / N.lqer_b with fp16 per-row step (.scale) and minimum (.zero);
                   W ~ deq(Q(W)) + deq(A) @ deq(B). The plan's lqer_top_k / lqer_rank / lqer_bits pick it
    fp16, fp32     N cast to that dtype
    raw            a non-float tensor, unchanged (never named by a plan: the export's rule for such tensors)

A scheme quantizes, restores, validates what a file holds for it and counts its bytes before compression.
Plans, the size fit, compress, eval and the bundled script know schemes only through SCHEMES, so adding one
is a Scheme subclass registered here, plus its tests.
"""

import math

import torch

from pgolf.clips import quantize_matrix
from pgolf.errors import InvalidInput
from pgolf.quant import QUANT_RANGES, dequantize_rows, quant_range, quantize_rows, row_scales

SCALE_SUFFIX = ".scale"


class Scheme:
    name = ""
    integer = False  # integer levels + scales: what demotion moves a tensor between (fewer bits, fewer bytes)
    plan_assignable = True  # a plan rule may name it

    def check_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """ValueError unless this scheme can store `tensor`."""

    def applies(self, tensor: torch.Tensor, keep_float_numel: int) -> bool:
        """Whether a plan rule naming this scheme reaches `tensor` (else the rule skips it)."""
        return tensor.is_floating_point()

    def bits(self, tensor: torch.Tensor) -> int:
        """Bits per stored element (the plan record's `bits`)."""
        return tensor.element_size() * 8

    def stored_names(self, name: str) -> tuple[str, ...]:
        return (name,)

    def quantize(self, name: str, tensor: torch.Tensor, **options) -> tuple[dict, str | None]:
        """({stored name: tensor on the CPU}, clip method used or None)."""
        raise NotImplementedError

    def restore(self, name: str, stored: dict) -> torch.Tensor:
        """The float32 tensor (non-float: unchanged) a model loads."""
        raise NotImplementedError

    def validate(self, name: str, stored: dict, shape: list[int], where: str) -> None:
        """InvalidInput naming `where` unless `stored` holds what this scheme writes for a tensor of `shape`."""
        raise NotImplementedError

    def raw_bytes(self, name: str, stored: dict) -> int:
        """Bytes of the stored tensor before compression (integer levels counted at their bit width)."""
        return sum(stored[n].numel() * stored[n].element_size() for n in self.stored_names(name))


def check_finite_tensor(tensor: torch.Tensor, name: str, where: str) -> None:
    if tensor.is_floating_point() and tensor.numel():
        non_finite = int((~torch.isfinite(tensor)).sum())
        if non_finite:
            raise InvalidInput(f"{where}: '{name}' holds {non_finite:,} NaN/Inf values")


def is_quantizable(tensor: torch.Tensor, keep_float_numel: int) -> bool:
    """Whether the challenge's export would quantize it: a >= 2-D float tensor above the keep-float size."""
    return tensor.is_floating_point() and tensor.dim() >= 2 and tensor.numel() > keep_float_numel


class IntScheme(Scheme):
    integer = True

    def __init__(self, bits: int):
        self.level_bits = bits
        self.name = f"int{bits}"

    def check_tensor(self, name, tensor):
        if tensor.dim() < 2 or not tensor.is_floating_point():
            raise ValueError(f"{name}: {self.name} needs a >= 2-D float tensor, got {tensor.dtype} of shape "
                             f"{list(tensor.shape)}")

    def applies(self, tensor, keep_float_numel):
        return is_quantizable(tensor, keep_float_numel)

    def bits(self, tensor):
        return self.level_bits

    def stored_names(self, name):
        return (name, name + SCALE_SUFFIX)

    def quantize(self, name, tensor, clip="percentile", scale_floor="none", lqer_rank=0, lqer_bits=4, **options):
        levels, scales, used = quantize_matrix(tensor, self.level_bits, clip, scale_floor, name=name, **options)
        return {name: levels.cpu(), name + SCALE_SUFFIX: scales.cpu()}, used

    def restore(self, name, stored):
        return dequantize_rows(stored[name], stored[name + SCALE_SUFFIX])

    def validate(self, name, stored, shape, where):
        levels, scales = stored.get(name), stored.get(name + SCALE_SUFFIX)
        if (len(shape) < 2 or levels.dtype != torch.int8 or scales is None or scales.dtype != torch.float16
                or list(scales.shape) != shape[:1]):
            raise InvalidInput(f"{where}: '{name}' is not int8 levels with fp16 per-row scales")
        low, high = quant_range(self.level_bits)
        if levels.numel() and (int(levels.min()) < low or int(levels.max()) > high):
            raise InvalidInput(f"{where}: '{name}' has levels outside {self.name}'s [{low}, {high}]")
        check_finite_tensor(scales, name + SCALE_SUFFIX, where)

    def raw_bytes(self, name, stored):
        scales = stored[name + SCALE_SUFFIX]
        return math.ceil(stored[name].numel() * self.level_bits / 8) + scales.numel() * scales.element_size()


class GateScheme(IntScheme):
    """Per-row int8 with fp16 absmax scales for small gate tensors the export would keep in float (PR #1784:
    within 0.00024 bpb of fp16). Not `integer`: demotion never moves a gate."""

    integer = False

    def __init__(self):
        super().__init__(8)
        self.name = "int8-gate"

    def check_tensor(self, name, tensor):
        if tensor.dim() < 1 or not tensor.is_floating_point():
            raise ValueError(f"{name}: {self.name} needs a >= 1-D float tensor, got {tensor.dtype} of shape "
                             f"{list(tensor.shape)}")

    def applies(self, tensor, keep_float_numel):
        return tensor.is_floating_point() and tensor.dim() >= 1

    def quantize(self, name, tensor, **options):
        rows = tensor.detach().float().reshape(1 if tensor.dim() == 1 else tensor.size(0), -1)
        scales = row_scales(rows, 8, floor=torch.finfo(torch.float16).tiny).to(torch.float16)
        levels = quantize_rows(rows, 8, scales.float()).reshape(tensor.shape)
        return {name: levels.cpu().contiguous(), name + SCALE_SUFFIX: scales.cpu()}, None

    def restore(self, name, stored):
        levels = stored[name]
        rows = levels.reshape(1 if levels.dim() == 1 else levels.size(0), -1)
        return dequantize_rows(rows, stored[name + SCALE_SUFFIX]).reshape(levels.shape)

    def validate(self, name, stored, shape, where):
        levels, scales = stored.get(name), stored.get(name + SCALE_SUFFIX)
        rows = [1] if len(shape) == 1 else shape[:1]
        if (len(shape) < 1 or levels.dtype != torch.int8 or scales is None or scales.dtype != torch.float16
                or list(scales.shape) != rows):
            raise InvalidInput(f"{where}: '{name}' is not int8 levels with fp16 per-row scales")
        if levels.numel() and int(levels.min()) < -127:
            raise InvalidInput(f"{where}: '{name}' has levels outside {self.name}'s [-127, 127]")
        check_finite_tensor(scales, name + SCALE_SUFFIX, where)


LQER_FACTORS = ("lqer_a", "lqer_b")
LQER_BITS = (2, 4)
ZERO_SUFFIX = ".zero"


def lqer_quantize_factor(factor: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row levels in [0, 2^bits - 1] (int8), fp16 step and fp16 minimum of a 2-D factor; the
    levels are rounded against the fp16 step and minimum, so restoring is exact."""
    top = (1 << bits) - 1
    low, high = factor.amin(dim=1), factor.amax(dim=1)
    zero = low.to(torch.float16)
    step = ((high - zero.float()) / top).clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
    levels = torch.round((factor - zero.float()[:, None]) / step.float()[:, None]).clamp_(0, top)
    return levels.to(torch.int8), step, zero


def lqer_restore_factor(levels: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return levels.float() * step.float()[:, None] + zero.float()[:, None]


def lqer_factors(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [rows, r], B [r, cols] with A @ B the best rank-r approximation of `residual` (sqrt(S) on each side)."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


class LqerScheme(IntScheme):
    """intB levels + a low-rank correction of their error (LQER, the 04-27+ records). The rank is the stored
    factors' inner size; the factors' bit width is in the name."""

    def __init__(self, bits: int, factor_bits: int):
        super().__init__(bits)
        self.factor_bits = factor_bits
        self.name = f"int{bits}+lqer{factor_bits}"

    def stored_names(self, name):
        return (name, name + SCALE_SUFFIX, *(f"{name}.{f}{suffix}" for f in LQER_FACTORS
                                              for suffix in ("", SCALE_SUFFIX, ZERO_SUFFIX)))

    def quantize(self, name, tensor, clip="percentile", scale_floor="none", lqer_rank=4, lqer_bits=None, **options):
        stored, used = super().quantize(name, tensor, clip, scale_floor, **options)
        rows = tensor.detach().reshape(tensor.size(0), -1).float().cpu()
        residual = rows - dequantize_rows(stored[name], stored[name + SCALE_SUFFIX]).reshape(rows.shape)
        for factor, matrix in zip(LQER_FACTORS, lqer_factors(residual, max(1, int(lqer_rank))), strict=True):
            levels, step, zero = lqer_quantize_factor(matrix, self.factor_bits)
            stored.update({f"{name}.{factor}": levels, f"{name}.{factor}{SCALE_SUFFIX}": step,
                           f"{name}.{factor}{ZERO_SUFFIX}": zero})
        return stored, used

    def restore(self, name, stored):
        base = super().restore(name, stored)
        a, b = (lqer_restore_factor(*(stored[f"{name}.{f}{suffix}"] for suffix in ("", SCALE_SUFFIX, ZERO_SUFFIX)))
                for f in LQER_FACTORS)
        return base + (a @ b).reshape(base.shape)

    def validate(self, name, stored, shape, where):
        super().validate(name, stored, shape, where)
        a, b = stored.get(f"{name}.lqer_a"), stored.get(f"{name}.lqer_b")
        cols = math.prod(shape[1:])
        if (a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.size(0) != shape[0]
                or b.size(1) != cols or a.size(1) != b.size(0) or a.size(1) < 1):
            raise InvalidInput(f"{where}: '{name}' lacks LQER factors [{shape[0]}, r] and [r, {cols}]")
        top = (1 << self.factor_bits) - 1
        for factor, levels in zip(LQER_FACTORS, (a, b), strict=True):
            step, zero = (stored.get(f"{name}.{factor}{suffix}") for suffix in (SCALE_SUFFIX, ZERO_SUFFIX))
            if (levels.dtype != torch.int8 or step is None or zero is None or step.dtype != torch.float16
                    or zero.dtype != torch.float16 or list(step.shape) != [levels.size(0)]
                    or list(zero.shape) != [levels.size(0)]):
                raise InvalidInput(f"{where}: '{name}.{factor}' is not int8 levels with fp16 per-row step/zero")
            if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > top):
                raise InvalidInput(f"{where}: '{name}.{factor}' has levels outside [0, {top}]")
            check_finite_tensor(step, f"{name}.{factor}{SCALE_SUFFIX}", where)
            check_finite_tensor(zero, f"{name}.{factor}{ZERO_SUFFIX}", where)

    def raw_bytes(self, name, stored):
        return super().raw_bytes(name, stored) + sum(
            math.ceil(stored[f"{name}.{f}"].numel() * self.factor_bits / 8)
            + 2 * 2 * stored[f"{name}.{f}{SCALE_SUFFIX}"].numel() for f in LQER_FACTORS)


class FloatScheme(Scheme):
    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def check_tensor(self, name, tensor):
        if not tensor.is_floating_point():
            raise ValueError(f"{name}: {self.name} needs a float tensor, got {tensor.dtype}")

    def bits(self, tensor):
        return torch.finfo(self.dtype).bits

    def quantize(self, name, tensor, **options):
        return {name: tensor.detach().cpu().to(self.dtype).contiguous()}, None

    def restore(self, name, stored):
        return stored[name].float()

    def validate(self, name, stored, shape, where):
        if stored[name].dtype != self.dtype:
            raise InvalidInput(f"{where}: '{name}' is {stored[name].dtype}, the plan says {self.name}")
        check_finite_tensor(stored[name], name, where)


class RawScheme(Scheme):
    name = "raw"
    plan_assignable = False

    def applies(self, tensor, keep_float_numel):
        return not tensor.is_floating_point()

    def quantize(self, name, tensor, **options):
        return {name: tensor.detach().cpu().contiguous()}, None

    def restore(self, name, stored):
        return stored[name]

    def validate(self, name, stored, shape, where):
        check_finite_tensor(stored[name], name, where)


SCHEMES: dict[str, Scheme] = {scheme.name: scheme for scheme in (
    *(IntScheme(bits) for bits in sorted(QUANT_RANGES)), GateScheme(),
    *(LqerScheme(bits, factor_bits) for bits in sorted(QUANT_RANGES) for factor_bits in LQER_BITS),
    FloatScheme("fp16", torch.float16), FloatScheme("fp32", torch.float32), RawScheme())}
PLAN_SCHEMES = tuple(name for name, scheme in SCHEMES.items() if scheme.plan_assignable)
INTEGER_SCHEMES = tuple(name for name, scheme in SCHEMES.items() if scheme.integer)
GATE_SCHEME = "int8-gate"


def lqer_scheme(scheme: str, factor_bits: int) -> str:
    """The LQER variant of an integer scheme (itself when it already is one)."""
    base = scheme.split("+")[0]
    return f"{base}+lqer{factor_bits}"
RAW_SCHEME = "raw"


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r} (valid: {', '.join(SCHEMES)})")
    return SCHEMES[name]
