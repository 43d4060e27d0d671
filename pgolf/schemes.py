"""Quantization schemes: how one tensor N is stored in a quantized state and restored from it.

    int5 .. int8   per-row integer levels under N (int8 container, N's shape) and fp16 per-row scales under
                   N.scale; a clip method (pgolf.clips) picks each row's scale. int5 keeps the challenge's
                   [-16, 15], the others are symmetric (pgolf.quant.QUANT_RANGES)
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
from pgolf.quant import QUANT_RANGES, dequantize_rows, quant_range

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

    def quantize(self, name, tensor, clip="percentile", scale_floor="none", **options):
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
    *(IntScheme(bits) for bits in sorted(QUANT_RANGES)),
    FloatScheme("fp16", torch.float16), FloatScheme("fp32", torch.float32), RawScheme())}
PLAN_SCHEMES = tuple(name for name, scheme in SCHEMES.items() if scheme.plan_assignable)
INTEGER_SCHEMES = tuple(name for name, scheme in SCHEMES.items() if scheme.integer)
RAW_SCHEME = "raw"


def get_scheme(name: str) -> Scheme:
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r} (valid: {', '.join(SCHEMES)})")
    return SCHEMES[name]
