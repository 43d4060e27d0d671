"""pgolf.model: baseline size and init, config validation, causality, document separation, document-isolated
attention, every option taking effect, QAT switching under torch.compile, and a tiny model learning real text."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters

from pgolf.model import (
    BOS_ID,
    GPT,
    BlockLayout,
    CastedLinear,
    ModelConfig,
    block_layout,
    casted_linear_names,
    document_attention_kind,
    document_mask,
    flex_attention_api,
    param_groups,
    rotary_tables,
    set_qat_enabled,
    set_qat_plan,
)
from pgolf.quant import fake_quantize
from tests.demo_data import demo_documents, demo_tokenizer_bytes

TINY = ModelConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=4, num_kv_heads=2, max_seq_len=64)
ALL_ON = dict(
    activation="swiglu", xsa_last_n=-1, smear_gate=True, bigram_buckets=97, bigram_dim=8,
    orthogonal_init=True, rope_dims=4, ln_scale=True, value_residual=True, gated_attention=True,
    attn_out_gate_width=8, tie_embeddings=False,
)
# Options that make a position look at other positions (beyond causal attention) or change what flows where.
CROSS_POSITION = dict(smear_gate=True, bigram_buckets=97, xsa_last_n=-1, value_residual=True,
                      gated_attention=True, attn_out_gate_width=8)


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def randomized(config: ModelConfig, seed: int = 0, dtype=torch.float64) -> GPT:
    """A model with every parameter random, so zero-initialized paths carry signal too."""
    torch.manual_seed(seed)
    model = GPT(config).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


def random_tokens(batch: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (batch, seq_len), generator=generator)
    return tokens


# --- baseline -----------------------------------------------------------------------------------------------


def test_default_config_is_the_challenge_baseline_with_its_exact_parameter_count():
    # tok_emb 1024*512 + 9 blocks * (q 512*512 + k,v 2*512*256 + proj 512*512 + fc,proj 2*512*1024
    # + q_gain 8 + attn/mlp scales 2*512 + resid_mix 2*512) + skip_weights 4*512
    expected = 1024 * 512 + 9 * (512 * 512 * 2 + 2 * 512 * 256 + 2 * 512 * 1024 + 8 + 4 * 512) + 4 * 512
    assert expected == 17_059_912
    model = GPT(ModelConfig())
    assert sum(p.numel() for p in model.parameters()) == expected
    config = ModelConfig()
    assert (config.num_layers, config.model_dim, config.num_heads, config.num_kv_heads) == (9, 512, 8, 4)
    assert (config.mlp_mult, config.activation, config.tie_embeddings) == (2.0, "relu2", True)
    assert (config.rope_base, config.qk_gain_init, config.logit_softcap) == (10000.0, 1.5, 30.0)


def test_zero_init_projections_and_small_tied_embedding():
    torch.manual_seed(0)
    model = GPT(ModelConfig())
    for block in model.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
        assert torch.count_nonzero(block.attn.c_q.weight) > 0
        assert torch.equal(block.attn.q_gain, torch.full((8,), 1.5))
        assert torch.equal(block.resid_mix[0], torch.ones(512))
        assert torch.count_nonzero(block.resid_mix[1]) == 0
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 0.0002
    untied = GPT(tiny(tie_embeddings=False))
    assert torch.count_nonzero(untied.lm_head.weight) == 0


def test_state_dict_names_are_stable_for_ttt_and_quantization():
    names = set(GPT(tiny(**ALL_ON)).state_dict())
    for expected in ("tok_emb.weight", "bigram.embed.weight", "bigram.proj.weight", "bigram.scale",
                     "smear.gate", "blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight",
                     "blocks.0.attn.c_v.weight",
                     "blocks.0.attn.proj.weight", "blocks.0.attn.q_gain", "blocks.0.attn.head_gate.weight",
                     "blocks.0.attn.out_gate.weight", "blocks.1.attn.v_mix", "blocks.0.mlp.fc.weight",
                     "blocks.0.mlp.gate.weight", "blocks.0.mlp.proj.weight", "blocks.0.resid_mix",
                     "skip_weights", "lm_head.weight"):
        assert expected in names
    assert "blocks.0.attn.v_mix" not in names  # layer 0 is the source of the value residual
    assert not any("rope" in name or "qat" in name for name in names)  # tables and switches are not weights
    assert "blocks.2.mlp.fc" in casted_linear_names(GPT(TINY))


def test_block_layout_describes_the_model_it_belongs_to():
    model = GPT(tiny(**ALL_ON))
    layout = model.layout
    assert layout == block_layout(model.config) and layout.execution == (0, 1, 2)
    for name in model.state_dict():
        block = layout.block_of(name)
        if name.startswith("blocks."):
            assert name.startswith(layout.prefix(block)) and layout.runs(block) == 1
        else:
            assert block is None
    groups = {name: layout.forward_group(name) for name in model.state_dict()}
    assert groups["bigram.embed.weight"] == groups["smear.gate"] == 0  # read before the first block
    assert [groups[f"blocks.{i}.mlp.fc.weight"] for i in range(3)] == [1, 2, 3]
    assert groups["lm_head.weight"] == groups["tok_emb.weight"] == 4  # the head, after every block
    assert layout.first_blocks(2) == [0, 1] and layout.center_out() == [1, 0, 2]
    assert layout.block_of("blocks.7.mlp.fc.weight") is None  # no such block in this model


def test_a_looped_layout_runs_a_block_twice_and_orders_it_by_its_first_run():
    looped = BlockLayout(4, (0, 1, 2, 1, 2, 3))
    assert looped.runs(1) == looped.runs(2) == 2 and looped.runs(3) == 1
    assert looped.first_blocks(3) == [0, 1, 2]
    assert [looped.forward_group(f"blocks.{i}.attn.c_q.weight") for i in range(4)] == [1, 2, 3, 6]
    assert looped.forward_group("lm_head.weight") == 7


def test_param_groups_partition_parameters_like_the_challenge():
    model = GPT(tiny(**ALL_ON))
    groups = param_groups(model)
    assert set(groups) == {"matrix", "embed", "scalar", "head"}
    grouped = [id(p) for group in groups.values() for p in group]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    matrix = {names[id(p)] for p in groups["matrix"]}
    assert "blocks.0.attn.c_q.weight" in matrix and "blocks.0.mlp.gate.weight" in matrix
    assert "bigram.proj.weight" in matrix and all(names[id(p)].endswith(".weight") for p in groups["matrix"])
    assert {names[id(p)] for p in groups["embed"]} == {"tok_emb.weight", "bigram.embed.weight"}
    assert [names[id(p)] for p in groups["head"]] == ["lm_head.weight"]
    scalar = {names[id(p)] for p in groups["scalar"]}
    assert {"skip_weights", "blocks.0.resid_mix", "blocks.0.attn.head_gate.weight",
            "blocks.0.attn.out_gate.weight", "smear.gate", "bigram.scale"} <= scalar
    assert "head" not in param_groups(GPT(TINY))


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=5), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(model_dim=24, num_heads=8), "num_heads"),  # head_dim 3 is odd: no RoPE pairs
    (dict(rope_dims=3), "rope_dims"),
    (dict(rope_dims=10), "rope_dims"),
    (dict(activation="gelu"), "activation"),
    (dict(xsa_last_n=4), "xsa_last_n"),
    (dict(xsa_last_n=-2), "xsa_last_n"),
    (dict(bigram_buckets=1), "bigram_buckets"),
    (dict(attn_out_gate_width=33), "attn_out_gate_width"),
    (dict(mlp_mult=0.0), "mlp_mult"),
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(vocab_size=1), "vocab_size"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(num_layers=0), "num_layers"),
])
def test_invalid_configs_name_the_field_and_range(changes, field):
    with pytest.raises(ValueError, match=rf"^{field} = .*must be"):
        tiny(**changes)


def test_logits_and_loss_are_float32_under_bf16_autocast():
    model = GPT(TINY)
    tokens = random_tokens(2, 16, TINY.vocab_size, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model.logits(tokens), model(tokens, tokens)
    assert logits.shape == (2, 16, TINY.vocab_size) and logits.dtype == torch.float32
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert model.to(torch.float64).logits(tokens).dtype == torch.float64


def test_sequences_longer_than_max_seq_len_are_refused():
    model = GPT(tiny(max_seq_len=16))
    model.logits(torch.ones(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.logits(torch.ones(1, 17, dtype=torch.long))


# --- causality and document separation ----------------------------------------------------------------------


def assert_causal(config: ModelConfig, seed: int) -> None:
    model = randomized(config, seed)
    tokens = random_tokens(2, 24, config.vocab_size, seed)
    tokens[:, 9] = BOS_ID  # a document boundary inside the window
    cut = 12
    changed = tokens.clone()
    changed[:, cut + 1 :] = random_tokens(2, 24 - cut - 1, config.vocab_size, seed + 1)
    with torch.no_grad():
        before, after = model.logits(tokens), model.logits(changed)
    assert torch.equal(before[:, : cut + 1], after[:, : cut + 1]), config
    assert not torch.allclose(before[:, cut + 1 :], after[:, cut + 1 :])  # the later tokens do matter


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=len(CROSS_POSITION))))
def test_every_combination_of_cross_position_features_is_causal(flags):
    changes = {name: value for (name, value), on in zip(CROSS_POSITION.items(), flags, strict=True) if on}
    assert_causal(tiny(**changes), seed=sum(flags))


@pytest.mark.parametrize("changes", [
    dict(activation="leaky_relu2"), dict(activation="swiglu"), dict(rope_dims=4), dict(ln_scale=True),
    dict(unet_skips=False), dict(tie_embeddings=False), dict(orthogonal_init=True), dict(xsa_last_n=1),
    dict(num_layers=4, **ALL_ON), dict(num_kv_heads=4), dict(num_kv_heads=1),
], ids=str)
def test_each_option_and_all_together_are_causal(changes):
    assert_causal(tiny(**changes), seed=7)


def test_documents_after_bos_do_not_see_the_previous_document_through_smear_or_bigram():
    for config in (tiny(smear_gate=True), tiny(bigram_buckets=97), tiny(smear_gate=True, bigram_buckets=97)):
        model = randomized(config, seed=3)
        tokens = random_tokens(1, 20, config.vocab_size, seed=3)
        tokens[0, 0] = tokens[0, 10] = BOS_ID  # document 1 = [0, 10), document 2 = [10, 20)
        changed = tokens.clone()
        changed[0, 9] = (tokens[0, 9] + 1) % config.vocab_size or 2  # last token of document 1
        with torch.no_grad():
            before, after = model.embed(tokens), model.embed(changed)
        assert torch.equal(before[:, 10:], after[:, 10:]), config
        assert not torch.allclose(before[:, 9], after[:, 9])
        # The same change does reach the next position when no BOS separates them: the path exists.
        joined, joined_changed = tokens.clone(), changed.clone()
        joined[0, 10] = joined_changed[0, 10] = 5
        with torch.no_grad():
            assert not torch.allclose(model.embed(joined)[:, 10], model.embed(joined_changed)[:, 10])


# --- every option changes the forward -----------------------------------------------------------------------


@pytest.mark.parametrize("changes", [
    dict(activation="leaky_relu2"), dict(activation="swiglu"),
    dict(leaky_slope=0.75, activation="leaky_relu2"), dict(xsa_last_n=1), dict(xsa_last_n=-1),
    dict(smear_gate=True), dict(bigram_buckets=97),
    dict(rope_dims=4), dict(ln_scale=True), dict(value_residual=True), dict(gated_attention=True),
    dict(attn_out_gate_width=8), dict(unet_skips=False), dict(tie_embeddings=False), dict(logit_softcap=5.0),
    dict(rope_base=500.0), dict(rope_bf16_freqs=True),
], ids=str)
def test_each_option_changes_the_forward(changes):
    base = randomized(TINY, seed=1)
    variant = randomized(tiny(**changes), seed=2)
    shared = {k: v for k, v in base.state_dict().items() if k in variant.state_dict()}
    variant.load_state_dict(shared, strict=False)  # same shared weights; new ones stay random
    tokens = random_tokens(2, 16, TINY.vocab_size, seed=5)
    with torch.no_grad():
        assert not torch.allclose(base.logits(tokens), variant.logits(tokens), atol=1e-6)


def test_rope_bf16_freqs_rounds_only_the_unscaled_frequencies():
    """The records' bf16 models hold RoPE's inverse frequencies in a bf16 buffer; 03-22 computes the rescaled ones
    (past rope_ntk_seq_len) afresh in float32."""
    config = tiny(rope_dims=4, rope_bf16_freqs=True, rope_ntk_seq_len=16)
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, 4, 2, dtype=torch.float32) / 4))
    angles = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq.bfloat16().float())
    cos, sin = rotary_tables(config)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    assert not torch.equal(cos, rotary_tables(dataclasses.replace(config, rope_bf16_freqs=False))[0])
    rounded, exact = GPT(config), GPT(dataclasses.replace(config, rope_bf16_freqs=False))
    assert torch.equal(rounded.rotary(32)[0], exact.rotary(32)[0])  # rescaled: never rounded
    assert not torch.equal(rounded.rotary(16)[0], exact.rotary(16)[0])


def test_init_options_change_the_initial_weights():
    torch.manual_seed(0)
    orthogonal = GPT(tiny(model_dim=64, orthogonal_init=True))
    weight = orthogonal.blocks[0].attn.c_q.weight
    assert torch.allclose(weight @ weight.T, torch.eye(64), atol=1e-5)
    torch.manual_seed(0)
    default = GPT(tiny(model_dim=64))
    assert not torch.allclose(default.blocks[0].attn.c_q.weight @ default.blocks[0].attn.c_q.weight.T,
                              torch.eye(64), atol=1e-2)
    gain = GPT(tiny(qk_gain_init=4.0)).blocks[0].attn.q_gain
    assert torch.equal(gain, torch.full((4,), 4.0))
    assert GPT(tiny(tied_embed_init_std=0.05)).tok_emb.weight.std() > 0.03
    shapes = GPT(tiny(mlp_mult=3.0)).blocks[0].mlp.fc.weight.shape
    assert tuple(shapes) == (96, 32)


def test_gates_start_open_so_new_options_begin_near_the_baseline():
    torch.manual_seed(0)
    model = GPT(tiny(gated_attention=True, attn_out_gate_width=8, smear_gate=True, bigram_buckets=97))
    attn = model.blocks[0].attn
    assert torch.count_nonzero(attn.head_gate.weight) == 0 and torch.all(attn.head_gate.bias == 4.0)
    assert torch.count_nonzero(attn.out_gate.weight) == 0  # 2 * sigmoid(0) = 1: transparent
    assert torch.count_nonzero(model.bigram.embed.weight) == 0  # the bigram branch starts silent
    assert torch.count_nonzero(model.smear.gate) == 0


# --- document-isolated attention (isolate_documents) ---------------------------------------------------------

# The 04-16 record's cross-position machinery in small: GQA, XSA, value residual, SmearGate + BigramHash with BOS
# isolation, depth recurrence (block 1 runs twice), parallel lanes, gated skips and output gates, partial RoPE.
RECORD_LIKE = dict(num_layers=4, xsa_last_n=-1, value_residual=True, smear_gate=True, bigram_buckets=97,
                   bigram_dim=8, num_loops=1, loop_start=1, loop_end=1, parallel_start_layer=3, skip_gates=True,
                   rope_dims=4, ln_scale=True, attn_out_gate_width=8, gated_attention=True)
# The other SmearGate (input-dependent, on the raw embedding), value embeddings and the q-sourced output gate.
RECORD_LIKE_TOKEN_SMEAR = {**RECORD_LIKE, "smear_gate": False, "smear_gate_width": 8, "value_embed_layers": (0, 3),
                           "value_embed_dim": 8, "attn_out_gate_src": "q"}
# Row 0: three whole documents; row 1 starts mid-document (no BOS) and then one document starts.
PACKED_SEGMENTS = [[(0, 11), (11, 28), (28, 40)], [(0, 9), (9, 40)]]


def packed_rows(config: ModelConfig, seed: int) -> torch.Tensor:
    tokens = random_tokens(len(PACKED_SEGMENTS), 40, config.vocab_size, seed)
    for row, segments in enumerate(PACKED_SEGMENTS):
        for start, _ in segments:
            if start > 0 or row == 0:
                tokens[row, start] = BOS_ID
    return tokens


def isolated_logits(model: GPT, tokens: torch.Tensor, isolate: bool = True, mask=None) -> torch.Tensor:
    return model.logits_from_hidden(model.hidden(tokens, isolate_documents=isolate, mask=mask))


@pytest.mark.parametrize("kind", ["sdpa_mask", "flex", "flex-prebuilt"])
@pytest.mark.parametrize("changes", [RECORD_LIKE, RECORD_LIKE_TOKEN_SMEAR], ids=["smear+bigram", "token-smear+ve"])
def test_isolated_documents_match_each_document_run_alone(changes, kind):
    if kind.startswith("flex") and flex_attention_api() is None:
        pytest.skip("this torch has no flex_attention")
    config = tiny(**changes)
    model = randomized(config, seed=11)
    tokens = packed_rows(config, seed=11)
    # flex-prebuilt: the caller builds the BlockMask (as outside torch.compile) and the model only uses it.
    prebuilt = document_mask(tokens, "flex") if kind == "flex-prebuilt" else None
    model.document_attention = "sdpa_mask" if prebuilt is not None else kind  # the passed mask must win
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")  # CPU reference
        packed = isolated_logits(model, tokens, isolate=prebuilt is None, mask=prebuilt)
        for row, segments in enumerate(PACKED_SEGMENTS):
            for start, end in segments:
                alone = model.logits(tokens[row : row + 1, start:end])[0]
                # Only RoPE's float32 tables differ between positions (relative in exact arithmetic): ~1e-7 here.
                torch.testing.assert_close(packed[row, start:end], alone, rtol=0, atol=1e-5)


def test_without_isolation_later_documents_see_earlier_ones():
    config = tiny(**RECORD_LIKE)
    model = randomized(config, seed=12)
    tokens = packed_rows(config, seed=12)
    with torch.no_grad():
        packed = isolated_logits(model, tokens, isolate=False)
        for row, segments in enumerate(PACKED_SEGMENTS):
            start, end = segments[1]
            alone = model.logits(tokens[row : row + 1, start:end])[0]
            assert (packed[row, start:end] - alone).abs().max() > 1e-2
            first_start, first_end = segments[0]  # the first segment is causal either way
            torch.testing.assert_close(packed[row, first_start:first_end], isolated_logits(model, tokens)[
                row, first_start:first_end], rtol=0, atol=1e-12)


def test_isolated_training_forward_has_gradients_for_every_parameter():
    config = tiny(**RECORD_LIKE_TOKEN_SMEAR)
    model = randomized(config, seed=13).train()
    tokens = packed_rows(config, seed=13)
    targets = torch.roll(tokens, -1, dims=1)
    model(tokens, targets, isolate_documents=True).backward()
    isolated = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(tokens, targets).backward()
    for name, grad in isolated.items():
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
    assert not torch.allclose(isolated["blocks.1.attn.c_q.weight"], model.blocks[1].attn.c_q.weight.grad)


def test_auto_picks_flex_only_for_cuda_inside_torch_compile():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: CUDA itself is never touched
    assert document_attention_kind(cpu) == document_attention_kind(cuda) == "sdpa_mask"  # eager
    with mock.patch("torch.compiler.is_compiling", return_value=True):
        assert document_attention_kind(cpu) == "sdpa_mask"
        assert document_attention_kind(cuda) == ("flex" if flex_attention_api() else "sdpa_mask")
        assert document_attention_kind(cuda, "sdpa_mask") == "sdpa_mask"
    assert document_attention_kind(cpu, "flex") == "flex"
    with pytest.raises(ValueError, match="document attention 'dense'"):
        document_attention_kind(cpu, "dense")

    @torch.compile(backend="eager", fullgraph=True)
    def traced_choice(x):  # what dynamo makes of the CUDA branch (the CPU one never reaches is_compiling)
        return x + (document_attention_kind(cuda) == "flex")

    assert traced_choice(torch.zeros(())).item() == (flex_attention_api() is not None)


@pytest.mark.parametrize("kind", ["auto", "flex"])
def test_isolated_forward_compiles_whole_and_matches_eager(kind):
    if kind == "flex" and flex_attention_api() is None:
        pytest.skip("this torch has no flex_attention")
    torch._dynamo.reset()
    config = tiny(**RECORD_LIKE)
    model = randomized(config, seed=14, dtype=torch.float32)
    model.document_attention = kind
    tokens = packed_rows(config, seed=14)
    targets = torch.roll(tokens, -1, dims=1)
    # fullgraph=True raises at the first graph break. flex_attention has no backward on CPU: its compiled
    # forward is checked without gradients.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    grad = torch.enable_grad() if kind == "auto" else torch.no_grad()
    with grad, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        eager, dense = model(tokens, targets, isolate_documents=True), model(tokens, targets)
        counters.clear()  # (eager flex_attention compiles a graph of its own)
        loss = compiled(tokens, targets, isolate_documents=True)
        torch.testing.assert_close(loss, eager, rtol=0, atol=1e-5)
        assert not torch.allclose(loss, dense, atol=1e-3)
        if kind == "auto":
            loss.backward()
            assert all(p.grad is not None for p in model.parameters())
        other_batch = packed_rows(config, seed=15)  # other document boundaries: the same graph, no recompile
        compiled(other_batch, targets, isolate_documents=True)
    assert counters["stats"]["unique_graphs"] == 1


def test_doc_attention_benchmark_runs_every_candidate_in_tiny_mode(tiny_data_dir, tmp_path):
    """benchmarks/doc_attention.py on the CPU: the candidates that run report times, the others (no flex_attention
    backward, no flash varlen on the CPU) report their error, and the run still writes its JSON line."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "doc_attention.py"
    out = tmp_path / "doc_attention.jsonl"
    command = [sys.executable, script, "--tiny", "--compile", "off", "--steps", "1", "--warmup", "1", "--data",
               tiny_data_dir, "--out", out]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = out.read_text().splitlines()
    row = json.loads(line)
    assert row["data"] == str(tiny_data_dir) and row["auto_choice"] == "sdpa_mask" and row["device"] == "cpu"
    assert set(row["model"]) == {"causal", "sdpa_mask", "flex", "flex-prebuilt"}
    assert set(row["kernels"]) == {"causal", "sdpa_mask", "flex", "varlen"}
    for section in ("model", "kernels"):
        assert row[section]["causal"]["ratio_to_causal"] == 1.0
        assert row[section]["sdpa_mask"]["ms_per_step"] > 0
        assert all("ms_per_step" in r or r["error"] for r in row[section].values())
    assert row["kernels"]["sdpa_mask"]["max_abs_diff_vs_sdpa_mask"] == 0.0
    assert 0 < row["documents"]["attention_work_ratio"] < 1  # the demo documents start inside rows


# --- compile and QAT ----------------------------------------------------------------------------------------


def test_forward_has_no_graph_breaks_with_every_feature_on():
    model = GPT(tiny(num_layers=2, **ALL_ON))
    tokens = random_tokens(2, 16, TINY.vocab_size, seed=0)
    explanation = torch._dynamo.explain(model)(tokens, tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_qat_plan_rejects_unknown_layers_and_bit_widths():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="not a CastedLinear"):
        set_qat_plan(model, {"blocks.0.attn.nope": 6})
    with pytest.raises(ValueError, match="not a CastedLinear"):
        set_qat_plan(model, {"tok_emb.weight": 8})
    with pytest.raises(ValueError, match="bits"):
        set_qat_plan(model, {"blocks.0.mlp.fc": 4})
    set_qat_plan(model, {"blocks.0.mlp.fc.weight": 5, "blocks.1.attn.c_q": 6})
    assert model.blocks[0].mlp.fc.qat_bits == 5 and model.blocks[1].attn.c_q.qat_bits == 6
    set_qat_plan(model, {})
    assert all(m.qat_bits == 0 for m in model.modules() if isinstance(m, CastedLinear))


def test_late_qat_switch_takes_effect_inside_a_compiled_model():
    torch._dynamo.reset()
    counters.clear()
    config = tiny(num_layers=2, **ALL_ON)
    model = randomized(config, seed=4, dtype=torch.float32)
    plan = {name: (5 if ".mlp." in name else 6) for name in casted_linear_names(model)}
    set_qat_plan(model, plan)
    tokens = random_tokens(2, 16, config.vocab_size, seed=4)
    targets = random_tokens(2, 16, config.vocab_size, seed=5)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)

    # The fake-quantized reference: an eager copy whose weights are replaced by their quantized values.
    quantized = randomized(config, seed=4, dtype=torch.float32)
    with torch.no_grad():
        for name in plan:
            layer = quantized.get_submodule(name)
            layer.weight.copy_(fake_quantize(layer.weight, plan[name]))

    with torch.no_grad():
        plain = model(tokens, targets)
        assert torch.equal(compiled(tokens, targets), plain)
        set_qat_enabled(model, True)
        switched = compiled(tokens, targets)
        assert not torch.allclose(switched, plain)
        assert torch.equal(switched, model(tokens, targets))  # eager, switch on
        assert torch.allclose(switched, quantized(tokens, targets), rtol=0, atol=1e-6)
        set_qat_enabled(model, False)
        assert torch.equal(compiled(tokens, targets), plain)
    assert counters["stats"]["unique_graphs"] == 1  # the switch is read at run time: no recompiles


def test_qat_gradient_is_straight_through():
    model = randomized(TINY, seed=6, dtype=torch.float32)
    set_qat_plan(model, {"blocks.0.mlp.fc": 6})
    set_qat_enabled(model, True)
    tokens = random_tokens(2, 16, TINY.vocab_size, seed=6)
    model(tokens, tokens).backward()
    grad = model.blocks[0].mlp.fc.weight.grad
    assert grad is not None and torch.count_nonzero(grad) > 0


# --- learning real text -------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes", [{}, ALL_ON], ids=["baseline", "all-features"])
def test_tiny_model_overfits_a_real_batch(changes):
    sentencepiece = pytest.importorskip("sentencepiece")
    processor = sentencepiece.SentencePieceProcessor(model_proto=demo_tokenizer_bytes())
    ids = [BOS_ID]
    for text in demo_documents()[:3]:
        ids += processor.encode(text)
        if len(ids) > 65:
            break
    batch = torch.tensor(ids[:65]).view(1, -1)
    config = ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2,
                         max_seq_len=64, **{**changes, "bigram_dim": 16} if changes else {})
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(30):
        loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 6.0  # about ln(1024) at init
    assert losses[-1] < 1.0, losses[::10]
