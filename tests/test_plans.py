"""pgolf.plans: which scheme each tensor gets (the challenge export's defaults, named plans, plan files and their
errors) and block demotion through the model's block layout."""

import json

import pytest
import torch

from pgolf.errors import UsageError
from pgolf.model import GPT, BlockLayout, ModelConfig
from pgolf.plans import PlanQuantizer, PlanSpec, assign_schemes, demote_blocks, load_plan, plan_names


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
    valid = "center-out-int5, int6, int6-fp16emb, int6-sdclip-fit, int8, record-int6, sensitivity-int5"
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


def test_plan_spec_validates_its_fields():
    with pytest.raises(ValueError, match="clip = 'best'"):
        PlanSpec(name="x", clip="best")
    with pytest.raises(ValueError, match="demote = 'random'"):
        PlanSpec(name="x", demote="random")
    with pytest.raises(ValueError, match="demote_to = 'fp16'"):
        PlanSpec(name="x", demote="center-out", demote_to="fp16")


def test_record_int6_plan_quantizes_gates_explicitly_and_fits_by_clip_k_then_prune():
    spec = load_plan("record-int6")
    assert (spec.default, spec.embedding, spec.clip, spec.embedding_k) == ("int6", "int7", "gptq-sdclip", 15.0)
    assert spec.fit_mode == "clip-k+prune" and spec.gates == "int8"
    state = baseline_state(num_layers=2, attn_out_gate_width=12, smear_gate=True)
    schemes = assign_schemes(spec, state)
    gates = [name for name in state if "out_gate" in name or "smear.gate" in name]
    assert gates and all(schemes[name] == "int8-gate" for name in gates)
    assert schemes["tok_emb.weight"] == "int7" and schemes["blocks.0.attn_scale"] == "fp32"
    floats = assign_schemes(load_plan("int6"), state)  # gates = "float": the export's rule keeps them float
    assert all(floats[name] in ("fp16", "fp32") for name in gates)


@pytest.mark.parametrize("settings, message", [
    ({"fit": "shrink"}, "fit = 'shrink': must be one of demote, clip-k, prune, clip-k\\+prune"),
    ({"fit": "demote"}, "fit = 'demote' needs demote"),
    ({"fit": "prune", "demote": "center-out"}, "pick one way to fit"),
    ({"gates": "int6"}, "gates = 'int6': must be one of float, int8"),
    ({"lqer_bits": 3}, "lqer_bits = 3: must be one of 2, 4"),
    ({"clip_k_max": 0.5}, "clip_k_max = 0.5: must be in"),
])
def test_fit_gate_and_lqer_settings_are_validated(settings, message):
    with pytest.raises(ValueError, match=message):
        PlanSpec(name="p", **settings)


def test_demotion_keeps_an_lqer_tensor_lqer():
    schemes = {"blocks.0.mlp.fc.weight": "int6+lqer2", "blocks.0.mlp.proj.weight": "int6", "tok_emb.weight": "int7"}
    demoted = demote_blocks(schemes, [0], "int5", BlockLayout(1, (0,)))
    assert demoted == {"blocks.0.mlp.fc.weight": "int5+lqer2", "blocks.0.mlp.proj.weight": "int5",
                       "tok_emb.weight": "int7"}


def test_prefetch_fills_the_cache_with_each_factor_s_own_entry():
    """PlanQuantizer.prefetch quantizes plain int tensors under gptq-sdclip at a round's factors in one stacked
    solve; quantize() then serves those entries, each the factor's own (as a quantizer without prefetch makes
    it); tensors without a Hessian and other clips are left to quantize()."""
    generator = torch.Generator().manual_seed(3)
    state = {"blocks.0.attn.c_q.weight": torch.randn(32, 48, generator=generator),
             "blocks.0.mlp.proj.weight": torch.randn(48, 32, generator=generator)}
    inputs = {cols: torch.randn(512, cols, generator=generator) for cols in (48, 32)}
    hessians = {name: inputs[t.size(1)].T @ inputs[t.size(1)] / 512 for name, t in state.items()}
    schemes = dict.fromkeys(state, "int6")

    def quantizer(clip="gptq-sdclip", with_hessians=True):
        made = PlanQuantizer(state, clip=clip, scale_floor="none")
        made.hessians.update(hessians if with_hessians else {})
        return made

    prefetched = quantizer()
    prefetched.prefetch(schemes, [0.5, 1.25])
    assert set(prefetched.cache) == {(name, "int6", k) for name in state for k in (0.5, 1.25)}
    for k in (0.5, 1.25):
        tensors, records = prefetched.quantize(schemes, k)
        expected, expected_records = quantizer().quantize(schemes, k)
        for name in tensors:
            assert (tensors[name] != expected[name]).float().mean() <= 1e-3, (name, k)
        assert records.keys() == expected_records.keys()
    for other in (quantizer(clip="sdclip"), quantizer(with_hessians=False)):
        other.prefetch(schemes, [0.5, 1.25])
        assert not other.cache
