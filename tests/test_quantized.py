"""pgolf.quantized: every scheme round-trips through the files bit-exactly; the format version, its metadata,
and refusing what it cannot read."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pgolf.errors import InvalidInput
from pgolf.quant import QUANT_RANGES
from pgolf.quantized import (
    PLAN_FILE,
    QUANTIZED_FILE,
    QUANTIZED_FORMAT_VERSION,
    check_quantized,
    dequantize_state,
    load_quantized,
    quantize_state,
    safetensors_metadata,
    save_quantized,
)
from tests.matrices import heavy_tailed


def small_state():
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(16, 32, generator=generator), "g": torch.rand(32, generator=generator)}
    return quantize_state(state, {"w": "int6", "g": "fp32"})


def plan_of(records, **extra):
    return {"format_version": QUANTIZED_FORMAT_VERSION, "tensors": records, **extra}


def test_saved_state_carries_its_format_version_in_both_files(tmp_path):
    tensors, records = small_state()
    save_quantized(tmp_path, tensors, plan_of(records))
    metadata = safetensors_metadata((tmp_path / QUANTIZED_FILE).read_bytes(), tmp_path)
    assert metadata == {"format": "pgolf-quantized", "format_version": str(QUANTIZED_FORMAT_VERSION)}
    assert json.loads((tmp_path / PLAN_FILE).read_text())["format_version"] == QUANTIZED_FORMAT_VERSION
    loaded, plan = load_quantized(tmp_path)
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)


@pytest.mark.parametrize("version", [0, 3, "1.5"])
def test_a_plan_of_another_format_version_is_refused_naming_the_file(tmp_path, version):
    tensors, records = small_state()
    save_quantized(tmp_path, tensors, plan_of(records, format_version=version))
    with pytest.raises(InvalidInput, match=rf"{QUANTIZED_FILE}: quantized format version {version!r}, this "
                                           r"pgolf reads version\(s\) 1, 2 \(re-run `pgolf quantize`"):
        load_quantized(tmp_path)


def test_a_safetensors_file_of_another_version_or_format_is_refused(tmp_path):
    tensors, records = small_state()
    save_quantized(tmp_path, tensors, plan_of(records))
    path = tmp_path / QUANTIZED_FILE
    save_file(tensors, path, metadata={"format": "pgolf-quantized", "format_version": "7"})
    with pytest.raises(InvalidInput, match=f"{path}: quantized format version 7"):
        load_quantized(tmp_path)
    save_file(tensors, path, metadata={"format": "pgolf-checkpoint"})
    with pytest.raises(InvalidInput, match=f"{path}: not a pgolf quantized state .*'pgolf-checkpoint'"):
        load_quantized(tmp_path)


def test_files_from_before_the_version_field_read_as_version_1(tmp_path):
    """Quantize outputs and blobs written before format_version existed have version 1's layout."""
    tensors, records = small_state()
    save_quantized(tmp_path, tensors, {"tensors": records})
    save_file(tensors, tmp_path / QUANTIZED_FILE, metadata={"format": "pgolf-quantized"})
    loaded, plan = load_quantized(tmp_path)
    assert loaded.keys() == tensors.keys() and "format_version" not in plan


def test_a_plan_naming_an_unknown_scheme_or_storing_extra_tensors_is_refused():
    tensors, records = small_state()
    with pytest.raises(InvalidInput, match="q: 'w' has unknown scheme 'int4'"):
        check_quantized(tensors, plan_of({**records, "w": {**records["w"], "scheme": "int4"}}), "q")
    with pytest.raises(InvalidInput, match="q: stored tensor 'stray' is not in the plan"):
        check_quantized({**tensors, "stray": torch.zeros(1)}, plan_of(records), "q")
    with pytest.raises(InvalidInput, match=r"q: 'w' is not int8 levels with fp16 per-row scales"):
        check_quantized({**tensors, "w.scale": tensors["w.scale"].float()}, plan_of(records), "q")


@pytest.mark.parametrize("scheme", ["int5", "int6", "int7", "int8", "fp16", "fp32"])
@pytest.mark.parametrize("clip", ["percentile", "gptq-lite"])
def test_every_scheme_round_trips_bit_exactly(scheme, clip, tmp_path):
    state = {"blocks.0.mlp.fc.weight": heavy_tailed(48, 80, seed=2), "blocks.0.attn_scale": torch.rand(80)}
    schemes = {"blocks.0.mlp.fc.weight": scheme, "blocks.0.attn_scale": "fp32"}
    tensors, records = quantize_state(state, schemes, clip=clip, scale_floor="none")
    save_quantized(tmp_path, tensors, {"model_config": {}, "tensors": records})
    loaded, plan = load_quantized(tmp_path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    restored = dequantize_state(loaded, plan)
    name = "blocks.0.mlp.fc.weight"
    if scheme.startswith("int"):
        low, high = QUANT_RANGES[int(scheme[3:])]
        levels, scales = loaded[name], loaded[name + ".scale"]
        assert levels.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (48,)
        assert low <= int(levels.min()) and int(levels.max()) <= high
        assert torch.equal(restored[name], levels.float() * scales.float()[:, None])
        assert plan["tensors"][name]["bits"] == int(scheme[3:])
        assert plan["tensors"][name]["bytes"] == (48 * 80 * int(scheme[3:]) + 7) // 8 + 48 * 2
    else:
        stored_dtype = torch.float16 if scheme == "fp16" else torch.float32
        assert torch.equal(restored[name], state[name].to(stored_dtype).float())
    assert torch.equal(restored["blocks.0.attn_scale"], state["blocks.0.attn_scale"])
    assert restored[name].dtype == torch.float32
    record = plan["tensors"][name]
    expected_error = (state[name] - restored[name]).norm() / state[name].norm()
    assert record["rel_error"] == pytest.approx(expected_error.item(), rel=1e-6)


def test_loading_refuses_levels_outside_the_scheme(tmp_path):
    state = {"w": heavy_tailed(16, 32, seed=3)}
    tensors, records = quantize_state(state, {"w": "int5"})
    check_quantized(tensors, {"tensors": records}, "q")
    tensors["w"][0, 0] = 16
    save_quantized(tmp_path, tensors, {"tensors": records})
    with pytest.raises(InvalidInput, match=r"safetensors: 'w' has levels outside int5's \[-16, 15\]"):
        load_quantized(tmp_path)
    tensors["w"][0, 0] = 15
    save_quantized(tmp_path, tensors, {"tensors": {**records, "ghost": records["w"]}})
    with pytest.raises(InvalidInput, match="no stored tensor 'ghost'"):
        load_quantized(tmp_path)
