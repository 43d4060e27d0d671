"""pgolf.schemes: every registered scheme honours the interface the rest of pgolf relies on (quantize ->
restore -> validate -> bytes), so a new scheme is checked by these tests too."""

import math
import re

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
    if scheme.integer or name == "int8-gate":
        extra = sum(math.ceil(stored[f"t.{f}"].numel() * scheme.factor_bits / 8) + 4 * stored[f"t.{f}"].size(0)
                    for f in ("lqer_a", "lqer_b")) if "+lqer" in name else 0
        assert record["bytes"] == math.ceil(tensor.numel() * scheme.level_bits / 8) + 2 * tensor.size(0) + extra
        assert record["rel_error"] < 2.0 ** (2 - scheme.level_bits)  # a few levels' worth, no more


@pytest.mark.parametrize("name", INTEGER_SCHEMES)
def test_integer_schemes_refuse_levels_outside_their_range(name):
    stored, record = quantize_entry("t", weight(), name)
    low, high = QUANT_RANGES[SCHEMES[name].level_bits]
    stored["t"][0, 0] = high + 1 if high < 127 else low - 1
    with pytest.raises(InvalidInput, match=rf"q: 't' has levels outside {re.escape(name)}'s \[{low}, {high}\]"):
        check_quantized(stored, {"tensors": {"t": record}}, "q")


def test_scheme_rules_reach_only_the_tensors_they_can_store():
    big, small, ids = weight(300, 300), weight(4, 4), torch.zeros(5, dtype=torch.int64)
    assert SCHEMES["int6"].applies(big, 65_536) and not SCHEMES["int6"].applies(small, 65_536)
    assert SCHEMES["fp16"].applies(small, 65_536) and not SCHEMES["fp16"].applies(ids, 65_536)
    assert SCHEMES["raw"].applies(ids, 0) and "raw" not in PLAN_SCHEMES
    with pytest.raises(ValueError, match=r"t: int6 needs a >= 2-D float tensor, got torch.int64"):
        quantize_entry("t", ids.reshape(5, 1), "int6")
    with pytest.raises(ValueError, match=r"unknown scheme 'int4' \(valid: int5, int6, int7, int8, int8-gate, "):
        get_scheme("int4")


def decaying_spectrum(rows=96, cols=128, seed=0) -> torch.Tensor:
    """A matrix with a decaying singular spectrum plus noise, like a trained weight."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, rows, generator=generator))
    spectrum = 3.0 * torch.arange(1, rows + 1, dtype=torch.float32) ** -1.0
    return (u * spectrum) @ v.T + 0.002 * torch.randn(rows, cols, generator=generator)


@pytest.mark.parametrize("factor_bits", [2, 4])
def test_lqer_lowers_the_error_by_the_bytes_its_factors_cost(factor_bits):
    w = decaying_spectrum()
    base, base_record = quantize_entry("w", w, "int5")
    name = f"int5+lqer{factor_bits}"
    stored, record = quantize_entry("w", w, name, lqer_rank=8)
    assert torch.equal(stored["w"], base["w"]) and torch.equal(stored["w.scale"], base["w.scale"])
    assert stored["w.lqer_a"].shape == (96, 8) and stored["w.lqer_b"].shape == (8, 128)
    assert record["rel_error"] < 0.9 * base_record["rel_error"]
    factor_bytes = math.ceil(96 * 8 * factor_bits / 8) + 96 * 4 + math.ceil(8 * 128 * factor_bits / 8) + 8 * 4
    assert record["bytes"] == base_record["bytes"] + factor_bytes
    restored = SCHEMES[name].restore("w", stored)
    a, b = (stored[f"w.{f}"].float() * stored[f"w.{f}.scale"].float()[:, None]
            + stored[f"w.{f}.zero"].float()[:, None] for f in ("lqer_a", "lqer_b"))
    assert torch.equal(restored, SCHEMES["int5"].restore("w", base) + a @ b)
    top = (1 << factor_bits) - 1
    assert int(stored["w.lqer_a"].min()) >= 0 and int(stored["w.lqer_b"].max()) <= top
    broken = dict(stored)
    broken["w.lqer_b"] = stored["w.lqer_b"].clone()
    broken["w.lqer_b"][0, 0] = top + 1
    with pytest.raises(InvalidInput, match=rf"'w.lqer_b' has levels outside \[0, {top}\]"):
        check_quantized(broken, {"tensors": {"w": record}}, "q")
    del broken["w.lqer_a.zero"]
    with pytest.raises(InvalidInput, match="not int8 levels with fp16 per-row step/zero"):
        check_quantized(broken, {"tensors": {"w": record}}, "q")


def test_int8_gate_stores_tiny_and_1d_gates_per_row():
    gate = weight(8, 12) * 0.1
    assert SCHEMES["int8-gate"].applies(gate, 65_536) and not SCHEMES["int6"].applies(gate, 65_536)
    stored, record = quantize_entry("g", gate, "int8-gate")
    assert stored["g"].dtype == torch.int8 and stored["g.scale"].shape == (8,)
    assert record["rel_error"] < 0.01 and record["bytes"] == 8 * 12 + 2 * 8
    vector = torch.linspace(-1, 1, 10)
    stored, record = quantize_entry("v", vector, "int8-gate")
    assert stored["v.scale"].shape == (1,) and record["shape"] == [10]
    check_quantized(stored, {"tensors": {"v": record}}, "q")
    assert (SCHEMES["int8-gate"].restore("v", stored) - vector).abs().max() <= 0.5 / 127 + 1e-6
    zero, _ = quantize_entry("z", torch.zeros(3, 4), "int8-gate")
    assert torch.equal(SCHEMES["int8-gate"].restore("z", zero), torch.zeros(3, 4))
