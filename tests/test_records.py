"""pgolf's model against the challenge records' own: each record script (../shared/reference/records, read at test
time, never copied) builds its GPT at tiny dims on the CPU, every weight randomized, its state dict is saved as
the record saves final_model.pt, `pgolf import` turns that file into a pgolf checkpoint, and pgolf's logits must
equal the record's forward_logits. Also: the import presets hold the scripts' real defaults and env names.

The scripts import FlashAttention-3 and triton at module level; the stubs below stand in (attention as SDPA, GQA
included; triton only for definitions, since the fused MLP kernel runs in training mode only: models here are in
eval mode). Skipped, with the path, when the reference scripts are absent.
"""

import dataclasses
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import load_preset
from pgolf.errors import InvalidInput
from pgolf.model import build_model
from pgolf.record_import import RECORD_PRESET_KIND, ImportConfig, import_checkpoint, record_preset
from pgolf.stage_model import load_stage_model
from tests.demo_data import write_demo_tokenizer

RECORDS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "records"
VOCAB = 1024  # the demo tokenizer's (the import checks the tokenizer against the model)
# Float32 with another order of operations (lerp vs (1-g)x + g x', SDPA layouts, fused vs split ops) over up to 17
# block runs: differences of a few 1e-6 on logits of magnitude ~5; a real mismatch is orders of magnitude larger.
FLOAT32 = dict(rtol=1e-4, atol=1e-4)
# Tiny dims for both records: head_dim 8, partial RoPE on 4 of its dims, MLP 4x (0416) / 3x (0322).
TINY = dict(VOCAB_SIZE=VOCAB, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, ROPE_DIMS=4, TRAIN_SEQ_LEN=64,
            EVAL_SEQ_LEN=64)
TINY_0416 = {**TINY, "EMBEDDING_DIM": 32, "NUM_LAYERS": 11, "MLP_MULT": 4}  # loops 3-5, lanes from 8: defaults
TINY_0322 = {**TINY, "NUM_LAYERS": 11, "MLP_MULT": 3, "BIGRAM_VOCAB_SIZE": 64, "BIGRAM_DIM": 16, "VE_DIM": 8}


# ---- running a record script on the CPU ------------------------------------------------------------------
def dense_attention(q, k, v, softmax_scale=None, causal=False, **_):
    """flash_attn_func: [B, T, H, D] layout, GQA when k has fewer heads."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                         scale=softmax_scale, enable_gqa=q.size(2) != k.size(2))
    return out.transpose(1, 2)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
                     causal=False, **_):
    """flash_attn_varlen_func: packed [T, H, D]; a query sees earlier keys of its own segment only."""
    positions = torch.arange(q.size(0))
    segment = torch.searchsorted(cu_seqlens_q.long(), positions, right=True)
    mask = (segment[:, None] == segment[None, :]) & (positions[:, None] >= positions[None, :] if causal else True)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=softmax_scale, enable_gqa=q.size(1) != k.size(1))
    return out[0].transpose(0, 1)


def stub_modules() -> dict[str, types.ModuleType]:
    flash = types.ModuleType("flash_attn_interface")
    flash.flash_attn_func, flash.flash_attn_varlen_func = dense_attention, varlen_attention
    triton = types.ModuleType("triton")
    triton.jit = lambda fn: fn
    triton.cdiv = lambda a, b: -(-a // b)
    language = types.ModuleType("triton.language")
    language.constexpr = object  # kernel parameter annotations, evaluated when the kernel is defined
    tools = types.ModuleType("triton.tools")
    descriptor = types.ModuleType("triton.tools.tensor_descriptor")
    descriptor.TensorDescriptor = object
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    return {"flash_attn_interface": flash, "triton": triton, "triton.language": language, "triton.tools": tools,
            "triton.tools.tensor_descriptor": descriptor}


def record_script(record: str) -> Path:
    script = RECORDS / load_preset(RECORD_PRESET_KIND, record)["script"]
    if not script.is_file():
        pytest.skip(f"record script not found: {script} (../shared/reference)")
    return script


def load_record(record: str, env: dict):
    """The record script executed as a module with exactly `env` set among the names it reads (its
    Hyperparameters read them when the class is defined). The stubs stand in only while it loads: torch's own
    compiler machinery would take the triton stub for the real package."""
    defaults, other = record_preset(record)
    script = record_script(record)
    with pytest.MonkeyPatch.context() as patch:
        for name in defaults.keys() | other:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, str(value))
        for name, module in stub_modules().items():
            patch.setitem(sys.modules, name, module)
        # The 04-16 script decorates a training-only function with torch.compile at import; nothing here compiles.
        patch.setattr(torch, "compile", lambda fn=None, **_: fn if fn is not None else (lambda f: f))
        spec = importlib.util.spec_from_file_location(f"record_{record}", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def build_0416(module):
    """The model as the script trains it (bf16 with fp32 control tensors), then float32 for the reference."""
    model = module.GPT(module.Hyperparameters()).bfloat16()
    module.restore_fp32_params(model)
    return model


def build_0322(module):
    args = module.Hyperparameters
    model = module.GPT(
        vocab_size=args.vocab_size, num_layers=args.num_layers, model_dim=args.model_dim, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, mlp_mult=args.mlp_mult, tie_embeddings=args.tie_embeddings,
        tied_embed_init_std=args.tied_embed_init_std, logit_softcap=args.logit_softcap, rope_base=args.rope_base,
        qk_gain_init=args.qk_gain_init, mtp_num_heads=args.mtp_num_heads, mtp_loss_weight=args.mtp_loss_weight,
        bigram_vocab_size=args.bigram_vocab_size, bigram_dim=args.bigram_dim, xsa_last_n=args.xsa_last_n,
        rope_dims=args.rope_dims, ln_scale=args.ln_scale, dtg=args.dtg_enabled, ve_enabled=args.ve_enabled,
        ve_dim=args.ve_dim, ve_layers=args.ve_layers,
    ).bfloat16()
    for layer in model.modules():
        if isinstance(layer, module.CastedLinear):
            layer.float()
    module.restore_low_dim_params_to_fp32(model)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (zero-initialised projections and gates would hide mapping mistakes): matrices
    N(0, 1/fan_in), vectors and scalars their init + N(0, 0.3^2) (q-gains stay near theirs, gates leave 0)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim >= 2:
            param.copy_(noise / param.size(-1) ** 0.5)
        else:
            param.add_(0.3 * noise.to(param.dtype))


def tokens_with_bos(seq_len: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random ids with BOS (1) mid-sequence: the records smear and hash across it, pgolf must do the same."""
    ids = torch.randint(2, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ids[:, seq_len // 3] = 1
    ids[-1, (2 * seq_len) // 3] = 1
    return ids


def export_and_import(model, record: str, env: dict, tmp_path: Path, exported=None):
    """Save the record model's state dict as its script does, run `pgolf import` on it, load pgolf's model."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint = tmp_path / "final_model.pt"
    torch.save(exported if exported is not None else model.state_dict(), checkpoint)
    settings = tuple(f"{key}={value}" for key, value in env.items())
    result = import_checkpoint(ImportConfig(record, settings), checkpoint, tmp_path / "import",
                               tokenizer=write_demo_tokenizer(tmp_path))
    state, config, info = load_stage_model(result.out)
    assert info["kind"] == "import"
    return build_model(state, config, "cpu"), result


# ---- 04-16 ------------------------------------------------------------------------------------------------
CASES_0416 = {
    "gates-from-proj": dict(SMEAR_GATE=1, GATE_ATTN_OUT=1, GATE_ATTN_SRC="proj"),
    "gates-from-q": dict(SMEAR_GATE=1, GATE_ATTN_OUT=1, GATE_ATTN_SRC="q", SMEAR_GATE_WIDTH=7, GATE_WIDTH=5,
                         PARALLEL_FINAL_LANE="MLP"),
    "seed-1790": dict(SMEAR_GATE=1, GATE_ATTN_OUT=1, GATE_WIDTH=24, QK_GAIN_INIT=5.25),
    "no-loops-no-lanes-plain-skips": dict(NUM_LOOPS=0, PARALLEL_START_LAYER=0, SKIP_GATES_ENABLED=0, XSA_LAST_N=3),
}


@pytest.mark.parametrize("case", CASES_0416)
def test_0416_logits_match_looped_and_unlooped(case, tmp_path):
    env = {**TINY_0416, **CASES_0416[case]}
    module = load_record("0416", env)
    torch.manual_seed(0)
    record = build_0416(module)
    randomize(record)
    pgolf, result = export_and_import(record, "0416", env, tmp_path)
    record = record.float().eval()
    ids = tokens_with_bos(64)
    for looping in (True, False):  # the exported model loops; training switches the loops on part-way
        record.looping_active, pgolf.looping = looping, looping
        with torch.no_grad():
            torch.testing.assert_close(pgolf.logits(ids), record.forward_logits(ids), **FLOAT32)
    if case == "no-loops-no-lanes-plain-skips":
        assert set(result.metrics["dropped"]) == {"parallel_resid_lambdas", "parallel_post_lambdas"}
    else:
        assert pgolf.config.num_loops == 2 and pgolf.config.parallel_start_layer == 8 and not result.metrics["dropped"]


def test_0416_document_packed_forward_matches_isolated_documents(tmp_path):
    """The record trains on packed documents (varlen attention over cu_seqlens cut at each BOS); pgolf's
    isolate_documents forward must see the same segments."""
    env = {**TINY_0416, **CASES_0416["seed-1790"]}
    module = load_record("0416", env)
    torch.manual_seed(0)
    record = build_0416(module)
    randomize(record, seed=3)
    pgolf, _ = export_and_import(record, "0416", env, tmp_path)
    record = record.float().eval()
    record.looping_active = True
    ids = tokens_with_bos(64, batch=1)
    starts = (ids[0] == 1).nonzero().flatten().tolist()
    cu_seqlens, max_seqlen = module._build_cu_seqlens(starts, ids.size(1), "cpu", 0, 64)
    with torch.no_grad():
        expected = record.forward_logits(ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        got = pgolf.logits_from_hidden(pgolf.hidden(ids, isolate_documents=True))
    torch.testing.assert_close(got, expected, **FLOAT32)


def test_0416_unbanked_export_imports_the_same(tmp_path):
    """The script's own unbanked naming (_unbank_state_dict, what its quantizer reads) is pgolf's already."""
    env = {**TINY_0416, **CASES_0416["gates-from-q"]}
    module = load_record("0416", env)
    record = build_0416(module)
    randomize(record, seed=5)
    banked, _ = export_and_import(record, "0416", env, tmp_path / "banked")
    flat = module._unbank_state_dict(record.state_dict(), env["NUM_LAYERS"])
    unbanked, _ = export_and_import(record, "0416", env, tmp_path / "flat", exported=flat)
    for name, tensor in banked.state_dict().items():
        assert torch.equal(unbanked.state_dict()[name], tensor), name


# ---- 03-22 ------------------------------------------------------------------------------------------------
def test_0322_logits_match(tmp_path):
    """11 layers, XSA on the last 4, BigramHash, value embeddings on 9 and 10, SmearGate, partial RoPE; with MTP
    heads in training, which the record's export leaves out."""
    env = {**TINY_0322, "MTP_NUM_HEADS": 2}
    module = load_record("0322", env)
    torch.manual_seed(0)
    record = build_0322(module)
    randomize(record)
    exported = {name: tensor for name, tensor in record.state_dict().items() if "mtp_heads" not in name}
    pgolf, _ = export_and_import(record, "0322", env, tmp_path, exported=exported)
    assert pgolf.config.value_embed_layers == (9, 10) and pgolf.config.xsa_last_n == 4
    record = record.float().eval()
    ids = tokens_with_bos(64)
    with torch.no_grad():
        torch.testing.assert_close(pgolf.logits(ids), record.forward_logits(ids), **FLOAT32)


def test_0322_rope_rescales_past_1024_tokens(tmp_path):
    """The record's Rotary raises its base for inputs longer than 1024 tokens (train_seq_len fixed at 1024): a
    2-layer variant at 1,100 tokens, where pgolf without rope_ntk_seq_len would disagree."""
    env = {**TINY_0322, "NUM_LAYERS": 2, "VE_LAYERS": "1", "XSA_LAST_N": 1, "TRAIN_SEQ_LEN": 1100,
           "EVAL_SEQ_LEN": 1100}
    module = load_record("0322", env)
    torch.manual_seed(0)
    record = build_0322(module)
    randomize(record, seed=2)
    pgolf, _ = export_and_import(record, "0322", env, tmp_path)
    assert pgolf.config.rope_ntk_seq_len == 1024 and pgolf.config.max_seq_len == 1100
    record = record.float().eval()
    ids = tokens_with_bos(1100, batch=1)
    with torch.no_grad():
        expected = record.forward_logits(ids)
        torch.testing.assert_close(pgolf.logits(ids), expected, **FLOAT32)
        pgolf.config = dataclasses.replace(pgolf.config, rope_ntk_seq_len=0)
        assert not torch.allclose(pgolf.logits(ids), expected, **FLOAT32)


def test_0322_checkpoint_with_mtp_heads_is_refused(tmp_path):
    env = {**TINY_0322, "NUM_LAYERS": 2, "VE_LAYERS": "1", "XSA_LAST_N": 1, "MTP_NUM_HEADS": 1}
    module = load_record("0322", env)
    with pytest.raises(InvalidInput, match=r"mtp_heads\.0\.weight .*MTP_NUM_HEADS"):
        export_and_import(build_0322(module), "0322", env, tmp_path)
    assert not (tmp_path / "import").exists()


# ---- the presets hold the scripts' own defaults and names -------------------------------------------------
@pytest.mark.parametrize("record", ["0416", "0322"])
def test_presets_hold_the_scripts_defaults_and_every_env_name(record):
    module = load_record(record, {})
    source = record_script(record).read_text()
    read = set(re.findall(r'os\.environ(?:\.get\(\s*|\[\s*)"([A-Z0-9_]+)"', source))
    read |= set(re.findall(r'"([A-Z0-9_]+)"\s+in\s+os\.environ', source))
    defaults, other = record_preset(record)
    assert defaults.keys() | other == read and not defaults.keys() & other
    for key, value in defaults.items():
        attribute = re.search(rf'^\s+(\w+) = .*os\.environ\.get\("{key}"', source, re.M).group(1)
        script_value = getattr(module.Hyperparameters, attribute)
        assert (type(script_value), script_value) == (type(value), value), key
