"""pgolf.schemes: every registered scheme honours the interface the rest of pgolf relies on (quantize ->
restore -> validate -> bytes), so a new scheme is checked by these tests too."""

import math

import pytest
import torch

from pgolf.errors import InvalidInput
from pgolf.quant import QUANT_RANGES
from pgolf.quantized import check_quantized, quantize_entry
from pgolf.schemes import INTEGER_SCHEMES, PLAN_SCHEMES, SCHEMES, get_scheme


def weight(rows=24, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def tensor_for(scheme):
    return torch.arange(12, dtype=torch.int32).reshape(3, 4) if scheme.name == "raw" else weight()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_restores_what_it_stored_and_validates_its_own_output(name):
    scheme = SCHEMES[name]
    tensor = tensor_for(scheme)
    stored, record = quantize_entry("t", tensor, name)
    assert set(stored) == set(scheme.stored_names("t"))
    restored = scheme.restore("t", stored)
    assert restored.shape == tensor.shape
    assert restored.dtype == (tensor.dtype if name == "raw" else torch.float32)
    check_quantized(stored, {"tensors": {"t": record}}, "q")  # what it writes, it accepts
    assert record["bytes"] == scheme.raw_bytes("t", stored) > 0
    if scheme.integer:
        assert record["bytes"] == math.ceil(tensor.numel() * scheme.level_bits / 8) + 2 * tensor.size(0)
        assert record["rel_error"] < 2.0 ** (2 - scheme.level_bits)  # a few levels' worth, no more


@pytest.mark.parametrize("name", INTEGER_SCHEMES)
def test_integer_schemes_refuse_levels_outside_their_range(name):
    stored, record = quantize_entry("t", weight(), name)
    low, high = QUANT_RANGES[SCHEMES[name].level_bits]
    stored["t"][0, 0] = high + 1 if high < 127 else low - 1
    with pytest.raises(InvalidInput, match=rf"q: 't' has levels outside {name}'s \[{low}, {high}\]"):
        check_quantized(stored, {"tensors": {"t": record}}, "q")


def test_scheme_rules_reach_only_the_tensors_they_can_store():
    big, small, ids = weight(300, 300), weight(4, 4), torch.zeros(5, dtype=torch.int64)
    assert SCHEMES["int6"].applies(big, 65_536) and not SCHEMES["int6"].applies(small, 65_536)
    assert SCHEMES["fp16"].applies(small, 65_536) and not SCHEMES["fp16"].applies(ids, 65_536)
    assert SCHEMES["raw"].applies(ids, 0) and "raw" not in PLAN_SCHEMES
    with pytest.raises(ValueError, match=r"t: int6 needs a >= 2-D float tensor, got torch.int64"):
        quantize_entry("t", ids.reshape(5, 1), "int6")
    with pytest.raises(ValueError, match=r"unknown scheme 'int4' \(valid: int5, int6, int7, int8, fp16"):
        get_scheme("int4")
