"""pgolf.quant / pgolf.gptq / pgolf.plans on known tensors: round trips, the challenge's int8 rule, clip
search, GPTQ error feedback, plan resolution and the center-out fit."""

import json

import pytest
import torch

from pgolf.clips import quantize_matrix
from pgolf.errors import InvalidInput, OverBudget, UsageError
from pgolf.gptq import hessian_error
from pgolf.model import GPT, ModelConfig
from pgolf.plans import (
    PlanSpec,
    assign_schemes,
    center_out_order,
    demote_blocks,
    fit_plan_to_target,
    load_plan,
    plan_names,
)
from pgolf.quant import QUANT_RANGES
from pgolf.quantized import check_quantized, dequantize_state, load_quantized, quantize_state, save_quantized


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed rows of different widths, like trained weights (outliers in most rows)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cols, generator=generator)
    noise /= torch.rand(rows, cols, generator=generator).add(0.05).sqrt()
    return noise * torch.linspace(0.02, 2.0, rows)[:, None]


def challenge_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The challenge's train_gpt.py int8 export for a 2-D tensor, restated independently from its rule:
    per-row clip at quantile 0.9999984 of |w|, clamp, scale = max(clip / 127, 1 / 127), round, clamp to +-127,
    scale stored fp16."""
    clip = torch.quantile(t.abs(), 99.99984 / 100.0, dim=1)
    clamped = torch.maximum(torch.minimum(t, clip[:, None]), -clip[:, None])
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    return torch.clamp(torch.round(clamped / scale[:, None]), -127, 127).to(torch.int8), scale.half()


def test_int8_percentile_matches_the_challenge_export_bit_for_bit():
    weight = heavy_tailed(64, 300, seed=1)
    weight[3] = 0.0  # an all-zero row: the floor keeps the scale finite
    weight[5] *= 1e-3  # a row far under 1.0: the challenge's 1/127 floor decides its scale
    levels, scales, clip = quantize_matrix(weight, 8, "percentile", "challenge")
    expected_levels, expected_scales = challenge_int8(weight)
    assert clip == "percentile"
    assert torch.equal(levels, expected_levels) and torch.equal(scales, expected_scales)
    assert scales.dtype == torch.float16 and scales[3] == torch.tensor(1 / 127).half()
    # Without the challenge's floor, a small row keeps its own scale (and far more levels).
    levels_free, scales_free, _ = quantize_matrix(weight, 8, "percentile", "none")
    assert scales_free[5] < scales[5] and levels_free[5].abs().max() > levels[5].abs().max()


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


def test_int5_uses_minus_16_to_15():
    assert QUANT_RANGES[5] == (-16, 15)
    # A row whose negative tail reaches past the clip gets level -16 from gptq-lite's clipped candidates.
    row = torch.cat([torch.linspace(-1.0, 1.0, 999), torch.tensor([-1.5])])[None]
    levels, scales, _ = quantize_matrix(row, 5, "gptq-lite")
    assert int(levels.min()) == -16 and int(levels.max()) <= 15


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


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_gptq_lite_is_never_worse_than_percentile_on_any_row(bits):
    weight = heavy_tailed(128, 256, seed=4)
    errors = {}
    for clip in ("percentile", "gptq-lite"):
        levels, scales, _ = quantize_matrix(weight, bits, clip)
        errors[clip] = (weight - levels.float() * scales.float()[:, None]).square().sum(dim=1)
    assert torch.all(errors["gptq-lite"] <= errors["percentile"])
    assert errors["gptq-lite"].sum() < errors["percentile"].sum()  # and strictly better overall


def test_gptq_lowers_the_output_error_below_round_to_nearest():
    generator = torch.Generator().manual_seed(5)
    # Correlated inputs (a random mixing of a few strong directions): where error feedback pays off.
    inputs = torch.randn(4096, 16, generator=generator) @ torch.randn(16, 96, generator=generator)
    inputs += 0.1 * torch.randn(4096, 96, generator=generator)
    hessian = inputs.T @ inputs / len(inputs)
    weight = heavy_tailed(64, 96, seed=6)
    output_error = {}
    for clip in ("percentile", "gptq-lite", "gptq"):
        levels, scales, used = quantize_matrix(weight, 5, clip, hessian=hessian)
        assert used == clip
        diff = weight - levels.float() * scales.float()[:, None]
        output_error[clip] = hessian_error(diff, hessian)
    assert torch.all(output_error["gptq"] <= output_error["gptq-lite"] + 1e-6)
    assert output_error["gptq"].sum() < 0.8 * output_error["percentile"].sum()
    # Without a Hessian, gptq falls back to gptq-lite and says so.
    assert quantize_matrix(weight, 5, "gptq")[2] == "gptq-lite"


def baseline_state(**overrides) -> dict:
    """The state dict of GPT(ModelConfig(...)) with shapes only (meta tensors: nothing allocated)."""
    with torch.device("meta"):
        return GPT(ModelConfig(**overrides)).state_dict()


def test_baseline_model_keeps_the_challenge_exports_float_tensors():
    state = baseline_state()
    schemes = assign_schemes(load_plan("int8"), state)
    controls = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")  # the challenge's list
    for name, tensor in state.items():
        if tensor.numel() <= 65_536:
            assert schemes[name] == ("fp32" if any(c in name for c in controls) else "fp16"), name
        else:
            assert schemes[name] == "int8", name
    assert schemes["tok_emb.weight"] == "int8" and schemes["blocks.8.mlp.proj.weight"] == "int8"
    assert schemes["skip_weights"] == "fp32" and schemes["blocks.0.attn.q_gain"] == "fp32"


def test_named_plans_assign_blocks_embedding_and_extras():
    state = baseline_state(bigram_buckets=4096, smear_gate=True, gated_attention=True)
    int6 = assign_schemes(load_plan("int6"), state)
    assert int6["blocks.3.attn.c_q.weight"] == "int6" and int6["tok_emb.weight"] == "int8"
    assert int6["bigram.embed.weight"] == "int8"  # a lookup table: embedding-like
    assert int6["bigram.scale"] == "fp32" and int6["smear.gate"] == "fp32"
    assert int6["blocks.0.attn.head_gate.weight"] == "fp32"
    fp16emb = assign_schemes(load_plan("int6-fp16emb"), state)
    assert fp16emb["tok_emb.weight"] == "fp16" and fp16emb["blocks.3.mlp.fc.weight"] == "int6"
    assert set(plan_names()) >= {"int8", "int6", "int6-fp16emb", "center-out-int5", "sensitivity-int5"}
    assert load_plan("center-out-int5").demote == "center-out"
    assert load_plan("sensitivity-int5").demote == "sensitivity"


def test_plan_file_patterns_first_match_wins(tmp_path):
    state = baseline_state(num_layers=4)
    toml = tmp_path / "mixed.toml"
    toml.write_text(
        'default = "int6"\nembedding = "fp16"\n[tensors]\n'
        '"blocks.*.mlp.*" = "int5"\n"blocks.0.*" = "int8"\n"*.q_gain" = "fp16"\n'
    )
    schemes = assign_schemes(load_plan(str(toml)), state)
    assert schemes["blocks.0.mlp.fc.weight"] == "int5"  # the first pattern wins over "blocks.0.*"
    assert schemes["blocks.0.attn.c_q.weight"] == "int8"
    assert schemes["blocks.1.attn.c_q.weight"] == "int6"  # no pattern: the default
    assert schemes["blocks.2.attn.q_gain"] == "fp16"  # a control tensor, overridden by name
    assert schemes["blocks.0.attn_scale"] == "fp32"  # "blocks.0.*" = int8 cannot apply to a gain vector
    assert schemes["tok_emb.weight"] == "fp16"
    as_json = tmp_path / "mixed.json"
    rules = {"blocks.*.mlp.*": "int5", "blocks.0.*": "int8", "*.q_gain": "fp16"}
    as_json.write_text(json.dumps({"default": "int6", "embedding": "fp16", "tensors": rules}))
    assert assign_schemes(load_plan(str(as_json)), state) == schemes


def test_bad_plans_are_usage_errors_naming_the_problem(tmp_path):
    state = baseline_state(num_layers=2)
    valid = "center-out-int5, int6, int6-fp16emb, int8, sensitivity-int5"
    with pytest.raises(UsageError, match=rf"unknown plan 'int4' \(valid: {valid}; or a .toml"):
        load_plan("int4")
    unmatched = tmp_path / "typo.toml"
    unmatched.write_text('default = "int6"\n[tensors]\n"block.*.mlp.*" = "int5"\n')
    with pytest.raises(UsageError, match=r"pattern 'block\.\*\.mlp\.\*' matches no tensor"):
        assign_schemes(load_plan(str(unmatched)), state)
    bad_scheme = tmp_path / "bad.toml"
    bad_scheme.write_text('default = "int4"\n')
    with pytest.raises(UsageError, match="bad.toml: default = 'int4': must be one of int5, int6, int7, int8"):
        load_plan(str(bad_scheme))
    vector_int = tmp_path / "vector.toml"
    vector_int.write_text('[tensors]\n"*.attn_scale" = "int6"\n')
    with pytest.raises(UsageError, match=r"'\*.attn_scale' = int6 matches only tensors that must stay float"):
        assign_schemes(load_plan(str(vector_int)), state)
    unknown_key = tmp_path / "key.toml"
    unknown_key.write_text('defualt = "int6"\n')
    with pytest.raises(UsageError, match="unknown plan setting 'defualt'"):
        load_plan(str(unknown_key))
    with pytest.raises(UsageError, match="plan file not found"):
        load_plan(str(tmp_path / "missing.toml"))


def test_center_out_order_starts_in_the_middle_and_alternates_outward():
    assert center_out_order(9) == [4, 3, 5, 2, 6, 1, 7, 0, 8]
    assert center_out_order(10) == [5, 4, 6, 3, 7, 2, 8, 1, 9, 0]
    assert center_out_order(11) == [5, 4, 6, 3, 7, 2, 8, 1, 9, 0, 10]
    assert center_out_order(1) == [0]


def test_fit_demotes_the_fewest_blocks_that_fit_in_center_out_order():
    schemes = {f"blocks.{i}.mlp.fc.weight": "int6" for i in range(9)} | {"tok_emb.weight": "int8"}
    # A size model that is exact for raw levels: 1000 params per block matrix, 1000 in the embedding.
    size_of = lambda s: sum(1000 * int(scheme[3:]) // 8 for scheme in s.values())  # noqa: E731
    order = center_out_order(9)
    fitted, steps = fit_plan_to_target(schemes, order, "int5", size_of, target=size_of(schemes) - 300)
    # Each demotion saves 125 bytes: three blocks fit, two do not (both measured by the bisection).
    assert steps[-1]["demoted"] == [4, 3, 5] and steps[-2]["demoted"] == [4, 3]
    assert steps[-1]["bytes"] <= size_of(schemes) - 300 < steps[-2]["bytes"]
    assert steps[0] == {"demoted": [], "bytes": size_of(schemes)} and len(steps) < len(order)
    assert fitted == demote_blocks(schemes, [4, 3, 5], "int5") and fitted["tok_emb.weight"] == "int8"
    unchanged, steps = fit_plan_to_target(schemes, order, "int5", size_of, target=10**9)
    assert unchanged == schemes and len(steps) == 1
    smallest = size_of(demote_blocks(schemes, order, "int5"))
    with pytest.raises(OverBudget, match=f"{smallest:,} bytes, the smallest this plan can make"):
        fit_plan_to_target(schemes, order, "int5", size_of, target=smallest - 1)


@pytest.mark.parametrize("workers", [1, 2, 3, 8, 16])
def test_parallel_fit_finds_what_a_linear_scan_finds(workers):
    schemes = {f"blocks.{i}.mlp.fc.weight": "int6" for i in range(11)}
    # Uneven savings per block, so every count is a distinct size.
    size_of = lambda s: sum(100 + 7 * int(n.split(".")[1]) for n, sc in s.items() if sc == "int6")  # noqa: E731
    order = center_out_order(11)
    sizes = [size_of(demote_blocks(schemes, order[:k], "int5")) for k in range(12)]
    for target in range(sizes[-1], sizes[0] + 2):
        expected = next(k for k in range(12) if sizes[k] <= target)
        fitted, steps = fit_plan_to_target(schemes, order, "int5", size_of, target, workers=workers)
        assert fitted == demote_blocks(schemes, order[:expected], "int5")
        assert steps[-1] == {"demoted": order[:expected], "bytes": sizes[expected]}
        if expected > 0:  # the count just below the answer was measured and is over the target
            assert steps[-2]["demoted"] == order[: expected - 1] and steps[-2]["bytes"] > target


def test_fit_confirms_the_count_below_its_answer_in_every_layout():
    schemes = {f"blocks.{i}.mlp.fc.weight": "int6" for i in range(9)}
    best_layout = lambda s: sum(1000 * int(scheme[3:]) // 8 for scheme in s.values())  # noqa: E731
    # The layout frozen at the undemoted sizing loses 150 bytes once any block is int5 (a byte-shuffle flip).
    frozen = lambda s: best_layout(s) + (150 if "int5" in s.values() else 0)  # noqa: E731
    confirmed = []

    def confirm(s):
        confirmed.append(sorted(n for n, scheme in s.items() if scheme == "int5"))
        return best_layout(s)

    order = center_out_order(9)
    target = best_layout(schemes) - 300  # 125 bytes per demoted block: 3 fit in the best layout, 4 when frozen
    fitted, steps = fit_plan_to_target(schemes, order, "int5", frozen, target, confirm=confirm)
    assert fitted == demote_blocks(schemes, order[:3], "int5")
    assert steps[-1] == {"demoted": order[:3], "bytes": best_layout(fitted)} and steps[-1]["bytes"] <= target
    assert steps[-2]["demoted"] == order[:2] and steps[-2]["bytes"] > target
    assert len(confirmed) == 2  # 3 blocks (fits: step down), then 2 (over: stop)
    without, _ = fit_plan_to_target(schemes, order, "int5", frozen, target)
    assert without == demote_blocks(schemes, order[:4], "int5")
    confirmed.clear()
    fit_plan_to_target(schemes, order, "int5", frozen, target=10**9, confirm=confirm)
    assert confirmed == []  # nothing demoted: nothing to confirm


def test_plan_spec_validates_its_fields():
    with pytest.raises(ValueError, match="clip = 'best'"):
        PlanSpec(name="x", clip="best")
    with pytest.raises(ValueError, match="demote = 'random'"):
        PlanSpec(name="x", demote="random")
    with pytest.raises(ValueError, match="demote_to = 'fp16'"):
        PlanSpec(name="x", demote="center-out", demote_to="fp16")
