"""Record-level quantization through quantize_model on a small model (CPU, real brotli sizing): LQER on the
worst-quantized tensors, int8 gates, and the clip-k and +-1 pruning fits; every result round-trips exactly
through quantized.safetensors + plan.json and through the blob."""

import pytest
import torch

from pgolf.codecs import blob_plan, pack_blob, unpack_blob
from pgolf.errors import OverBudget, UsageError
from pgolf.model import GPT, ModelConfig
from pgolf.plans import PlanSpec
from pgolf.quantize import QuantizeConfig, quantize_model
from pgolf.quantized import QUANTIZED_FORMAT_VERSION, dequantize_state, load_quantized, save_quantized
from pgolf.schemes import SCHEMES

MODEL = ModelConfig(vocab_size=256, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, max_seq_len=64,
                    attn_out_gate_width=8, smear_gate=True)
BASE = {"name": "t", "default": "int6", "embedding": "int7", "clip": "sdclip", "gates": "int8"}


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    weights = GPT(MODEL).state_dict()
    generator = torch.Generator().manual_seed(1)
    return {name: (t + 0.05 * torch.randn(t.shape, generator=generator)) if t.is_floating_point() else t
            for name, t in weights.items()}


def run(state, target=None, **plan):
    config = QuantizeConfig(codec="brotli", code_bytes=0, device="cpu", keep_float_numel=1000, target_bytes=target)
    return quantize_model(state, MODEL, PlanSpec(**{**BASE, **plan}), config)


def assert_round_trips(made, tmp_path):
    save_quantized(tmp_path, made.tensors, made.plan)
    loaded, plan = load_quantized(tmp_path)
    assert plan == made.plan and plan["format_version"] == QUANTIZED_FORMAT_VERSION
    assert loaded.keys() == made.tensors.keys() and all(torch.equal(loaded[n], t) for n, t in made.tensors.items())
    blob_tensors, carried = unpack_blob(pack_blob(made.tensors, made.plan, "brotli"))
    assert carried == blob_plan(made.plan) and all(torch.equal(blob_tensors[n], t) for n, t in made.tensors.items())
    restored = dequantize_state(blob_tensors, carried)
    assert all(torch.equal(restored[n], t) for n, t in dequantize_state(made.tensors, made.plan).items())
    GPT(MODEL).load_state_dict(restored)


def test_lqer_on_the_top_k_tensors_lowers_their_error_and_round_trips(state, tmp_path):
    plain = run(state)
    made = run(state, lqer_top_k=2, lqer_rank=4, lqer_bits=4)
    errors = {name: (state[name] - SCHEMES[s].restore(name, plain.tensors)).norm().item()
              for name, s in plain.schemes.items() if SCHEMES[s].integer}
    worst = sorted(errors, key=lambda name: -errors[name])[:2]
    assert sorted(n for n, s in made.schemes.items() if "+lqer" in s) == sorted(worst)
    for name in worst:
        record, before = made.plan["tensors"][name], plain.plan["tensors"][name]
        assert record["scheme"] == before["scheme"] + "+lqer4"
        assert record["rel_error"] < before["rel_error"]
        rows, cols = state[name].shape[0], state[name][0].numel()
        assert record["bytes"] == before["bytes"] + (rows * 4 + 1) // 2 + rows * 4 + (4 * cols + 1) // 2 + 4 * 4
    assert_round_trips(made, tmp_path)


def test_gates_are_per_row_int8(state, tmp_path):
    made = run(state)
    gates = [n for n in state if "out_gate" in n or "smear.gate" in n]
    assert gates and all(made.plan["tensors"][n]["scheme"] == "int8-gate" for n in gates)
    assert all(made.plan["tensors"][n]["rel_error"] < 0.01 for n in gates)
    assert_round_trips(made, tmp_path)


def test_a_larger_sdclip_k_makes_a_smaller_artifact_and_clip_k_finds_the_smallest_that_fits(state, tmp_path):
    base = run(state).artifact_bytes
    loose = run(state, target=10**9, fit="clip-k", clip_k_max=3.0)  # nothing to fit: k x 1
    assert loose.fit["k_scale"] == 1.0 and len(loose.fit["clip_k_steps"]) == 1
    target = base - base // 50
    made = run(state, target=target, fit="clip-k", clip_k_max=3.0)
    steps, factor = made.fit["clip_k_steps"], made.fit["k_scale"]
    assert steps[0] == loose.fit["clip_k_steps"][0]
    by_k = sorted(steps, key=lambda s: s["k_scale"])
    assert by_k[-1]["bytes"] < by_k[0]["bytes"]  # a wider clip: coarser steps, fewer bytes
    assert 1.0 < factor <= 3.0 and made.artifact_bytes <= target
    assert any(factor / 1.01 <= s["k_scale"] < factor and s["bytes"] > target for s in steps)  # smallest to 1 %
    before = run(state).plan["tensors"]
    assert all(made.plan["tensors"][n]["rel_error"] > before[n]["rel_error"] for n, s in made.schemes.items()
               if SCHEMES[s].integer)  # the price: coarser steps round every weight further
    assert_round_trips(made, tmp_path)
    with pytest.raises(OverBudget, match="clip_k_max"):
        run(state, target=base // 4, fit="clip-k", clip_k_max=1.2)


def test_clip_k_min_below_one_spends_spare_bytes_on_a_finer_step(state, tmp_path):
    at_one = run(state)
    target = at_one.artifact_bytes + at_one.artifact_bytes // 10
    made = run(state, target=target, fit="clip-k", clip_k_min=0.3, clip_k_max=1.5)
    factor, steps = made.fit["k_scale"], made.fit["clip_k_steps"]
    assert steps[0]["k_scale"] == 0.3 and steps[0]["bytes"] > target  # the floor itself does not fit
    assert 0.3 < factor < 1.0 and at_one.artifact_bytes < made.artifact_bytes <= target
    assert any(factor / 1.01 <= s["k_scale"] < factor and s["bytes"] > target for s in steps)
    integer = [n for n, s in made.schemes.items() if SCHEMES[s].integer]
    error = lambda m: sum(m.plan["tensors"][n]["rel_error"] for n in integer)  # noqa: E731
    assert error(made) < error(at_one)  # the bytes bought a finer step
    assert_round_trips(made, tmp_path)


def test_prune_zeroes_the_fewest_smallest_scale_plus_minus_one_levels_that_fit(state, tmp_path):
    plain = run(state)
    base = plain.artifact_bytes
    target = base - base // 100
    made = run(state, target=target, fit="prune")
    count, steps = made.fit["pruned"], made.fit["prune_steps"]
    assert 0 < count < made.fit["prune_candidates"] and made.artifact_bytes <= target
    assert next(s["bytes"] for s in steps if s["pruned"] == count) <= target
    assert next(s["bytes"] for s in steps if s["pruned"] == count - 1) > target  # one fewer does not fit
    zeroed = {n: int(((plain.tensors[n] != 0) & (made.tensors[n] == 0)).sum()) for n in made.schemes
              if SCHEMES[made.schemes[n]].integer}
    assert sum(zeroed.values()) == count
    assert all(made.plan["tensors"][n]["pruned"] == z for n, z in zeroed.items() if z)
    assert all(int(plain.tensors[n][(plain.tensors[n] != made.tensors[n])].abs().max()) == 1
               for n, z in zeroed.items() if z)
    # Smallest |level * scale| first: every pruned level's row scale is <= every surviving +-1 level's.
    pruned_scales, kept_scales = [], []
    for name in zeroed:
        levels, after = plain.tensors[name].reshape(plain.tensors[name].size(0), -1), made.tensors[name]
        scales = plain.tensors[name + ".scale"].float()[:, None].expand_as(levels)
        ones = levels.abs() == 1
        pruned = ones & (after.reshape(levels.shape) == 0)
        pruned_scales.append(scales[pruned]), kept_scales.append(scales[ones & ~pruned])
    assert torch.cat(pruned_scales).max() <= torch.cat(kept_scales).min()
    assert_round_trips(made, tmp_path)


def test_clip_k_then_prune_prunes_only_what_clip_k_max_leaves(state, tmp_path):
    base = run(state).artifact_bytes
    target = base - base // 25
    made = run(state, target=target, fit="clip-k+prune", clip_k_max=1.05)
    assert made.fit["k_scale"] == 1.05 and made.fit["pruned"] > 0 and made.artifact_bytes <= target
    assert_round_trips(made, tmp_path)
    easy = run(state, target=base - base // 200, fit="clip-k+prune", clip_k_max=3.0)
    assert "pruned" not in easy.fit and easy.fit["k_scale"] > 1.0


def test_version_1_plans_still_read(state, tmp_path):
    made = run(state, gates="float")
    old = {**made.plan, "format_version": 1}
    save_quantized(tmp_path, made.tensors, old)
    assert load_quantized(tmp_path)[1]["format_version"] == 1


def test_clip_k_needs_an_sdclip_method(state):
    with pytest.raises(UsageError, match="fit = clip-k scales sdclip's k, so it needs clip = sdclip | gptq-sdclip"):
        run(state, target=10**6, fit="clip-k", clip="gptq-lite")
