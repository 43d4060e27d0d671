"""pgolf.clips: the challenge's int8 rule bit for bit, the clip search, GPTQ error feedback, and the contract
every registered clip method honours (so a new one is checked by these tests too)."""

import pytest
import torch

from pgolf.clips import CLIPS, ClipOptions, clip_method, gptq_sdclip_levels, quantize_matrix
from pgolf.gptq import hessian_error
from pgolf.quant import QUANT_RANGES
from tests.matrices import heavy_tailed


def weight(rows=24, cols=40, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


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


def test_int5_uses_minus_16_to_15():
    assert QUANT_RANGES[5] == (-16, 15)
    # A row whose negative tail reaches past the clip gets level -16 from gptq-lite's clipped candidates.
    row = torch.cat([torch.linspace(-1.0, 1.0, 999), torch.tensor([-1.5])])[None]
    levels, scales, _ = quantize_matrix(row, 5, "gptq-lite")
    assert int(levels.min()) == -16 and int(levels.max()) <= 15


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_gptq_lite_is_never_worse_than_percentile_on_any_row(bits):
    weight = heavy_tailed(128, 256, seed=4)
    errors = {}
    for clip in ("percentile", "gptq-lite"):
        levels, scales, _ = quantize_matrix(weight, bits, clip)
        errors[clip] = (weight - levels.float() * scales.float()[:, None]).square().sum(dim=1)
    assert torch.all(errors["gptq-lite"] <= errors["percentile"])
    assert errors["gptq-lite"].sum() < errors["percentile"].sum()  # and strictly better overall


def correlated_hessian(columns: int = 96) -> torch.Tensor:
    """E[x x^T] of correlated inputs (a random mixing of a few strong directions): where error feedback pays."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(4096, 16, generator=generator) @ torch.randn(16, columns, generator=generator)
    inputs += 0.1 * torch.randn(4096, columns, generator=generator)
    return inputs.T @ inputs / len(inputs)


def test_gptq_lowers_the_output_error_below_round_to_nearest():
    hessian = correlated_hessian()
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


@pytest.mark.parametrize("name", list(CLIPS))
def test_every_clip_method_returns_in_range_levels_and_fp16_scales(name):
    rows = weight(32, 64, seed=1)
    hessian = rows.T @ rows / 32 + torch.eye(64) if CLIPS[name].needs_calibration else None
    for bits, (qmin, qmax) in QUANT_RANGES.items():
        levels, scales, used = CLIPS[name].quantize(rows, bits, ClipOptions(1e-12, hessian=hessian))
        assert used == name and levels.dtype == torch.int8 and scales.dtype == torch.float16
        assert levels.shape == rows.shape and scales.shape == (32,)
        assert qmin <= int(levels.min()) and int(levels.max()) <= qmax
        error = (rows - levels.float() * scales.float()[:, None]).norm() / rows.norm()
        assert error < 0.5  # a reconstruction, whatever the method trades error for (sdclip: compressibility)


def test_gptq_without_a_hessian_falls_back_to_gptq_lite_and_says_so():
    assert CLIPS["gptq"].needs_calibration and not CLIPS["gptq-lite"].needs_calibration
    assert CLIPS["gptq"].quantize(weight(), 6, ClipOptions(1e-12))[2] == "gptq-lite"
    valid = "percentile, gptq-lite, gptq, sdclip, gptq-sdclip"
    with pytest.raises(ValueError, match=f"clip must be one of {valid}, got 'sd'"):
        clip_method("sd")


# ---- sdclip, the 04-16 record's export clip -------------------------------------------------------------

def record_sdclip(weight: torch.Tensor, sigmas: float, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 04-16 record's per-row scale, restated from its rule: s = k * std(row) / qmax, stored fp16; levels by
    rounding w / s and clamping to +-qmax (its GPTQ's column rule, here without error feedback)."""
    scales = (sigmas * weight.float().std(dim=1) / qmax).clamp_min(1e-10).to(torch.float16)
    levels = torch.clamp(torch.round(weight.float() / scales.float()[:, None]), -qmax, qmax).to(torch.int8)
    return levels, scales


@pytest.mark.parametrize("name, sigmas", [("tok_emb.weight", 15.0), ("blocks.3.mlp.proj.weight", 12.0),
                                          ("blocks.3.attn.c_q.weight", 13.0), ("bigram.proj.weight", 12.85)])
def test_sdclip_is_the_records_rule_with_its_clip_width_per_tensor_group(name, sigmas):
    weight = heavy_tailed(48, 200, seed=8)
    for bits in (6, 7, 8):  # the record's int6 matrices and int7 embeddings; qmax = 2^(bits-1) - 1 as there
        levels, scales, used = quantize_matrix(weight, bits, "sdclip", name=name)
        expected_levels, expected_scales = record_sdclip(weight, sigmas, QUANT_RANGES[bits][1])
        assert used == "sdclip"
        assert torch.equal(scales, expected_scales) and torch.equal(levels, expected_levels)


def test_sdclip_uses_fewer_distinct_levels_than_the_percentile_clip():
    """Why the records clip at k standard deviations: wide clips leave most rows on few levels, which
    compresses; the percentile clip spreads each row over the whole range."""
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(9))
    sd, _, _ = quantize_matrix(weight, 6, "sdclip", name="blocks.0.mlp.fc.weight")
    percentile, _, _ = quantize_matrix(weight, 6, "percentile")
    entropy = {}
    for label, levels in (("sd", sd), ("percentile", percentile)):
        counts = torch.bincount(levels.flatten().long() + 31).float()
        probabilities = counts[counts > 0] / counts.sum()
        entropy[label] = float(-(probabilities * probabilities.log2()).sum())
    assert entropy["sd"] < entropy["percentile"] - 1.0  # bits per weight before the codec


def test_gptq_sdclip_keeps_the_sd_scales_and_lowers_the_output_error():
    hessian = correlated_hessian()
    weight = heavy_tailed(64, 96, seed=6)
    name = "blocks.1.attn.proj.weight"
    rtn_levels, rtn_scales, _ = quantize_matrix(weight, 6, "sdclip", name=name)
    levels, scales, used = quantize_matrix(weight, 6, "gptq-sdclip", name=name, hessian=hessian)
    assert used == "gptq-sdclip" and torch.equal(scales, rtn_scales)
    errors = {label: hessian_error(weight - q.float() * scales.float()[:, None], hessian).sum()
              for label, q in (("rtn", rtn_levels), ("gptq", levels))}
    assert errors["gptq"] < 0.8 * errors["rtn"]
    assert quantize_matrix(weight, 6, "gptq-sdclip", name=name)[2] == "sdclip"  # no Hessian: no GPTQ



def test_one_stacked_gptq_sdclip_solve_gives_each_factor_s_own_levels():
    """gptq_sdclip_levels solves every k factor of a fit round at once (the rows stacked once per factor): each
    factor's levels are what quantize_matrix finds for it alone. Summation order inside the stacked matmuls may
    differ from the single solve's, so a rounding tie may fall the other way: at most a level apart, rarely."""
    hessian = correlated_hessian()
    weight = heavy_tailed(64, 96, seed=7)
    name, factors = "blocks.0.mlp.fc.weight", [0.4, 0.9, 1.3]
    stacked = gptq_sdclip_levels(weight, 6, factors, name=name, hessian=hessian)
    for factor, levels in zip(factors, stacked, strict=True):
        alone, _, _ = quantize_matrix(weight, 6, "gptq-sdclip", name=name, hessian=hessian, k_scale=factor)
        differ = levels != alone
        assert differ.float().mean() <= 1e-3 and (levels.int() - alone.int()).abs().max() <= 1, factor
    assert not torch.equal(stacked[0], stacked[2])  # each factor its own scales
    # quantize_matrix takes a stacked solve's levels as they are
    reused, _, _ = quantize_matrix(weight, 6, "gptq-sdclip", name=name, hessian=hessian, k_scale=0.9,
                                   gptq_levels=stacked[1])
    assert torch.equal(reused, stacked[1])
