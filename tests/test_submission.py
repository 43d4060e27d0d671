"""pgolf.submission / pgolf.bundle's BAKED settings: every field of every config a run recorded reaches the
bundled train_gpt.py unchanged, because the bundle bakes each manifest's config (to_dict) and the submission
rebuilds it (from_dict) — there is no hand-kept list of settings to forget a new field in."""

import ast
import dataclasses

import pytest

from pgolf.bundle import baked_settings, bundle_source
from pgolf.compress import CompressConfig
from pgolf.config import to_dict
from pgolf.errors import InvalidInput, UsageError
from pgolf.evaluate import EvalConfig
from pgolf.model import ModelConfig
from pgolf.plans import PlanSpec, plan_from_mapping
from pgolf.quantize import QuantizeConfig
from pgolf.submission import SUBMISSION_CONFIGS, submission_configs
from pgolf.train_config import TrainConfig
from pgolf.ttt import TTTConfig

# Every field away from its default (test_every_field_is_away_from_its_default keeps it that way as fields are
# added), each value valid on its own and together.
NON_DEFAULT = {
    "model": ModelConfig(
        vocab_size=2048, num_layers=4, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=3.0,
        activation="swiglu", leaky_slope=0.25, tie_embeddings=False, tied_embed_init_std=0.01, rope_base=500.0,
        rope_dims=16, qk_gain_init=5.0, logit_softcap=15.0, unet_skips=False, xsa_last_n=2, smear_gate=True,
        bigram_buckets=97, bigram_dim=16, orthogonal_init=True, ln_scale=True, value_residual=True,
        gated_attention=True, attn_out_gate_width=12, attn_out_gate_src="q", bos_isolation=False,
        smear_gate_width=8, value_embed_layers=(1, 3), value_embed_dim=32, skip_gates=True, num_loops=1, loop_start=1,
        loop_end=1, parallel_start_layer=2, parallel_final_lane="attn", rope_ntk_seq_len=128, rope_bf16_freqs=True,
        max_seq_len=256),
    "train": TrainConfig(
        iterations=7, wallclock_seconds=30.5, batch_tokens=4096, seq_len=256, micro_batch_tokens=512,
        isolate_documents=True,
        warmup_steps=3, warmdown_iters=9, warmdown_frac=0.5, matrix_lr=0.03, scalar_lr=0.02, tied_embed_lr=0.07,
        embed_lr=0.5, head_lr=0.01, muon_momentum=0.97, muon_momentum_warmup_start=0.92,
        muon_momentum_warmup_steps=11, muon_momentum_warmup_frac=0.1, muon_backend_steps=4, muon_weight_decay=0.1,
        muon_row_normalize=True, muon_ns_coefficients="polar-express", embed_weight_decay=0.085,
        scalar_weight_decay=0.02, min_lr=0.1, enable_looping_at=0.35,
        adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-9, grad_clip_norm=0.3, ema_decay=0.997, ema_start_frac=0.2,
        qat_bits=6, qat_mlp_bits=5, qat_start_frac=0.6, seed=42, val_every=13, log_every=17, checkpoint_every=19,
        compile="off", gptq_calibration_batches=2, gptq_reserve_seconds=1.5, attention_kernel="cudnn"),
    "quantize": QuantizeConfig(
        plan="center-out-int5", clip="gptq", target_bytes=15_900_000, code_bytes=50_000, codec="zstd",
        keep_float_numel=1024, calib_tokens=4096, calib_seq_len=128, calibration="generated",
        calib_temperature=0.9, gptq_damp=0.05, gptq_block=64, device="cpu",
        weights="master"),
    "compress": CompressConfig(codec="lzma", level=6, shuffle="on", bitpack="off"),
    "eval": EvalConfig(seq_len=128, sliding_stride=32, doc_isolated=True, batch_seqs=8, compile=False,
                       ngram_order=(3,), alpha=(0.2,), alpha_mode="entropy", ngram_buckets=4096, ttt=True,
                       time_budget_seconds=600.0, budget_gpus=4, enforce_time_budget=True),
    "ttt": TTTConfig(
        mode="phased", lr=0.0005, epochs=2, momentum=0.5, chunk_tokens=48, freeze_blocks=1, batch_seqs=16,
        grad_clip=0.5, lora_rank=96, lora_alpha=100.0, lora_targets=("attn.c_q", "mlp.fc"), lora_weight_decay=0.5,
        lora_reset="batch", lora_batch_docs=32, lora_warm_start=False, phases=2, prefix_docs=100, phase_lr=0.002,
        phase_momentum=0.8, phase_epochs=2, phase_chunk_tokens=1024, eval_seq_len=1024, lora_o_input="attn",
        batched_targets=("q", "head"), compile="aot_eager",
        attention_kernel="cudnn"),
}
# The n-gram cache and the token tilt are alternatives (both at once would be a two-point sweep, which bundle
# refuses), so the tilt's fields round-trip in a second eval config.
TILT_EVAL = dataclasses.replace(NON_DEFAULT["eval"], ngram_order=(), alpha=(0.4,), tilt_order=(4,), tilt_boost=(0.5,),
                                tilt_threshold=(0.8,), tilt_min_count=3, tilt_gamma=1.0)
PLAN = PlanSpec(name="my-plan.toml", default="int6", embedding="int7", tensors=(("blocks.*.mlp.*", "int5"),),
                clip="gptq-lite", scale_floor="challenge", demote="sensitivity", demote_to="int5",
                description="a plan file")


def manifests(non_default=NON_DEFAULT):
    """The manifests' config sections as pgolf's stages write them."""
    configs = {key: to_dict(config) for key, config in non_default.items()}
    train = {"config": {"preset": None, "model": configs["model"], "train": configs["train"]},
             "metrics": {"tokenizer_sha256": "ab" * 32}}
    evaluation = {"config": {"eval": configs["eval"], "ttt": configs["ttt"], "weights": "export"}}
    return train, {"config": configs["quantize"]}, {"config": configs["compress"]}, \
        {"plan": {**PLAN.to_dict(), "clip": "gptq"}}, evaluation


def baked_in_script(source: str) -> dict:
    """The BAKED literal of a bundled train_gpt.py, read back without running the script."""
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "BAKED")
    return ast.literal_eval(node.value)


def test_every_field_is_away_from_its_default():
    assert set(NON_DEFAULT) == set(SUBMISSION_CONFIGS)
    for key, config in NON_DEFAULT.items():
        default = type(config)()
        others = [TILT_EVAL] if key == "eval" else []
        same = [f.name for f in dataclasses.fields(config)
                if all(getattr(c, f.name) == getattr(default, f.name) for c in [config, *others])]
        assert not same, f"{key}: give {same} a non-default value here so the round trip covers them"


@pytest.mark.parametrize("evaluation", ["ngram", "tilt"])
def test_every_config_field_round_trips_into_the_bundled_script(evaluation):
    non_default = NON_DEFAULT if evaluation == "ngram" else {**NON_DEFAULT, "eval": TILT_EVAL}
    baked = baked_settings(*manifests(non_default))
    script = bundle_source(baked, "round trip")
    in_script = baked_in_script(script)
    assert in_script == baked
    assert submission_configs(in_script) == non_default
    spec = plan_from_mapping(in_script["plan"], "BAKED['plan']")
    assert spec == dataclasses.replace(PLAN, clip="gptq")
    assert in_script["tokenizer_sha256"] == "ab" * 32


def test_a_run_without_an_eval_bakes_eval_defaults_and_no_ttt():
    train, quantize, compress, plan, _ = manifests()
    configs = submission_configs(baked_settings(train, quantize, compress, plan, None))
    assert configs["eval"] == EvalConfig() and configs["ttt"] is None


def test_a_manifest_config_pgolf_cannot_read_fails_at_bundle_time():
    train, quantize, compress, plan, evaluation = manifests()
    quantize = {"config": {**quantize["config"], "gptq_blocks": 64}}
    with pytest.raises(InvalidInput, match="manifest config 'quantize': unknown setting 'gptq_blocks'"):
        baked_settings(train, quantize, compress, plan, evaluation)
    sweep = {"config": {**evaluation["config"], "eval": {**evaluation["config"]["eval"], "alpha": [0.2, 0.4]}}}
    with pytest.raises(UsageError, match="swept an n-gram grid"):
        baked_settings(train, manifests()[1], compress, plan, sweep)
    with pytest.raises(InvalidInput, match="the train output's manifest has no 'config.model'"):
        baked_settings({"config": {}, "metrics": {}}, quantize, compress, plan, evaluation)
