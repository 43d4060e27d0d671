"""pgolf.record_import (`pgolf import`) without the record scripts: translating the records' env settings,
refusing what pgolf cannot express or safely read, renaming the 04-16 banked state dict, and an imported
checkpoint going through quantize -> compress -> eval (tests/test_records.py checks against the scripts)."""

import dataclasses
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from pgolf.artifacts import sha256_file
from pgolf.errors import InvalidInput, UsageError
from pgolf.model import GPT, ModelConfig
from pgolf.record_import import (
    ImportConfig,
    import_checkpoint,
    read_env_file,
    record_model_config,
    record_settings,
)
from pgolf.stage_model import load_stage_model
from tests.demo_data import TOKENIZER_NAME

# A 6-layer 04-16 model with every feature on: loops over blocks 1-2, lanes from block 4, both gates.
SETTINGS_0416 = dict(VOCAB_SIZE=1024, NUM_LAYERS=6, MODEL_DIM=32, EMBEDDING_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2,
                     ROPE_DIMS=4, LOOP_START=1, LOOP_END=2, PARALLEL_START_LAYER=4, SMEAR_GATE=1, GATE_ATTN_OUT=1,
                     GATE_ATTN_SRC="q", GATE_WIDTH=8, TRAIN_SEQ_LEN=64, EVAL_SEQ_LEN=64)


def as_settings(values: dict) -> tuple[str, ...]:
    return tuple(f"{key}={value}" for key, value in values.items())


def config_of(record: str, values: dict) -> ModelConfig:
    given = [(key, str(value), "test") for key, value in values.items()]
    return record_model_config(record, record_settings(record, given)[0])


def run_cli(*args, monkeypatch, capsys) -> tuple[int, str, str]:
    """`pgolf ARGS` in this process through the real entry point: (exit code, stdout, stderr)."""
    from pgolf.cli import main

    monkeypatch.setattr(sys, "argv", ["pgolf", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


# ---- settings -> ModelConfig ------------------------------------------------------------------------------
def test_record_defaults_translate_to_the_record_architectures():
    r0416 = config_of("0416", {})
    assert (r0416.vocab_size, r0416.num_layers, r0416.model_dim, r0416.mlp_mult, r0416.max_seq_len) == \
        (8192, 11, 512, 4.0, 2048)
    assert (r0416.num_loops, r0416.loop_start, r0416.loop_end, r0416.parallel_start_layer) == (2, 3, 5, 8)
    assert r0416.activation == "leaky_relu2" and r0416.skip_gates and r0416.ln_scale and r0416.xsa_last_n == 11
    assert r0416.rope_dims == 16 and r0416.qk_gain_init == 5.0 and not r0416.bos_isolation and r0416.rope_bf16_freqs
    assert r0416.smear_gate_width == 0 and r0416.attn_out_gate_width == 0 and r0416.rope_ntk_seq_len == 0
    r0322 = config_of("0322", {})
    assert (r0322.vocab_size, r0322.mlp_mult, r0322.activation, r0322.xsa_last_n) == (1024, 3.0, "relu2", 4)
    assert r0322.smear_gate and (r0322.bigram_buckets, r0322.bigram_dim) == (2048, 128)
    assert r0322.value_embed_layers == (9, 10) and r0322.value_embed_dim == 128 and r0322.rope_ntk_seq_len == 1024
    assert r0322.num_loops == 0 and not r0322.skip_gates and not r0322.bos_isolation


def test_settings_that_are_not_one_field_translate_as_the_scripts_read_them():
    gates = config_of("0416", dict(SMEAR_GATE=1, SMEAR_GATE_WIDTH=7, GATE_ATTN_OUT=1, GATE_WIDTH=24))
    assert gates.smear_gate_width == 7 and gates.attn_out_gate_width == 24 and gates.attn_out_gate_src == "input"
    assert config_of("0416", dict(GATE_ATTN_OUT=1, GATE_ATTN_SRC="q")).attn_out_gate_src == "q"
    off = config_of("0416", dict(SMEAR_GATE=0, SMEAR_GATE_WIDTH=7, GATE_ATTN_OUT=0, GATE_WIDTH=24))
    assert off.smear_gate_width == 0 and off.attn_out_gate_width == 0
    assert config_of("0416", dict(PARALLEL_START_LAYER=11)).parallel_start_layer == 0  # no block >= 11: off
    assert config_of("0416", dict(PARALLEL_FINAL_LANE="MLP")).parallel_final_lane == "mlp"
    assert config_of("0416", dict(PARALLEL_FINAL_LANE="other")).parallel_final_lane == "mean"  # the fallback
    assert config_of("0416", dict(XSA_LAST_N=40)).xsa_last_n == 11 and config_of("0416", dict(XSA_LAST_N=-1)) \
        .xsa_last_n == 0
    unlooped = config_of("0416", dict(NUM_LOOPS=0))
    assert (unlooped.num_loops, unlooped.loop_start, unlooped.loop_end) == (0, 0, 0)
    assert config_of("0416", dict(TRAIN_SEQ_LEN=1024, EVAL_SEQ_LEN=4096)).max_seq_len == 4096
    assert config_of("0322", dict(VE_ENABLED=0)).value_embed_layers == ()
    assert config_of("0322", dict(VE_LAYERS="8, 10")).value_embed_layers == (8, 10)
    assert config_of("0322", dict(BIGRAM_VOCAB_SIZE=0)).bigram_buckets == 0


@pytest.mark.parametrize("record, values, named", [
    ("0416", dict(GATE_MLP_OUT=1), "GATE_MLP_OUT=1"),
    ("0416", dict(EMBEDDING_DIM=256), "EMBEDDING_DIM=256 differs from MODEL_DIM=512"),
    ("0416", dict(ROPE_YARN=1), "ROPE_YARN=1"),
    ("0416", dict(PARALLEL_START_LAYER=4), "parallel_start_layer = 4: must be past the looped segment"),
    ("0322", dict(DTG_ENABLED=1), "DTG_ENABLED=1"),
    ("0322", dict(BIGRAM_DIM=512), "BIGRAM_DIM = MODEL_DIM"),
    ("0322", dict(VE_DIM=256), r"VE_DIM = the KV width \(256\)"),
    ("0322", dict(VOCAB_SIZE=60000), "overflows int32"),
])
def test_settings_pgolf_cannot_express_are_refused_naming_them(record, values, named):
    with pytest.raises(UsageError, match=named):
        config_of(record, values)


def test_unknown_or_malformed_settings_are_usage_errors():
    with pytest.raises(UsageError, match="NUM_LAYER is not a setting the 0416 record's script reads; did you mean "
                                         "NUM_LAYERS"):
        record_settings("0416", [("NUM_LAYER", "9", "--set NUM_LAYER=9")])
    with pytest.raises(UsageError, match="BIGRAM_VOCAB_SIZE is not a setting the 0416"):
        record_settings("0416", [("BIGRAM_VOCAB_SIZE", "2048", "x")])
    with pytest.raises(UsageError, match="NUM_LAYERS = 'eleven' is not an int"):
        record_settings("0416", [("NUM_LAYERS", "eleven", "x")])
    with pytest.raises(UsageError, match="SKIP_GATES_ENABLED = 'true' is not a 0 or 1"):
        record_settings("0416", [("SKIP_GATES_ENABLED", "true", "x")])  # the script reads bool(int(...))
    values, ignored = record_settings("0416", [("SEED", "7", "x"), ("TTT_ENABLED", "1", "x"), ("QK_GAIN_INIT",
                                                                                               "5.25", "x")])
    assert ignored == ["SEED", "TTT_ENABLED"] and values["QK_GAIN_INIT"] == 5.25


def test_env_file_lines(tmp_path):
    env = tmp_path / "run.env"
    env.write_text("# the run\n\nexport SMEAR_GATE=1\nGATE_ATTN_SRC='q'\n  QK_GAIN_INIT = \"5.25\"  \n")
    assert [(key, value) for key, value, _ in read_env_file(env)] == \
        [("SMEAR_GATE", "1"), ("GATE_ATTN_SRC", "q"), ("QK_GAIN_INIT", "5.25")]
    env.write_text("SMEAR_GATE=1\nSEED=1 RUN_ID=x torchrun train_gpt.py\n")
    with pytest.raises(UsageError, match=rf"{env}:2: .*: an unquoted value with spaces"):
        read_env_file(env)
    env.write_text("torchrun --standalone train_gpt.py\n")
    with pytest.raises(UsageError, match=rf"{env}:1: .* is not a KEY=VALUE setting"):
        read_env_file(env)


# ---- the 04-16 state dict, banked --------------------------------------------------------------------------
def random_model(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


def banked_0416(state: dict, layers: int) -> dict:
    """A pgolf state dict in the 04-16 record's own naming: block matrices in four banks, its gate names."""
    def stacked(*patterns):
        return torch.stack([state[pattern.format(i)] for pattern in patterns for i in range(layers)])

    record = {"qo_bank": stacked("blocks.{}.attn.c_q.weight", "blocks.{}.attn.proj.weight"),
              "kv_bank": stacked("blocks.{}.attn.c_k.weight", "blocks.{}.attn.c_v.weight"),
              "mlp_up_bank": stacked("blocks.{}.mlp.fc.weight"), "mlp_down_bank": stacked("blocks.{}.mlp.proj.weight")}
    renames = {"token_smear.gate.weight": "smear_gate.weight", "token_smear.strength": "smear_lambda"}
    for name, tensor in state.items():
        if any(f".{part}." in name for part in ("c_q", "c_k", "c_v", "proj", "fc")) and name.startswith("blocks."):
            continue
        record[renames.get(name, name.replace(".out_gate.", ".attn_gate_proj."))] = tensor
    return record


@pytest.fixture
def record_0416(tmp_path, tiny_data_dir):
    """(pgolf model, its banked final_model.pt, tokenizer) of SETTINGS_0416."""
    model = random_model(config_of("0416", SETTINGS_0416))
    checkpoint = tmp_path / "final_model.pt"
    torch.save(banked_0416(model.state_dict(), SETTINGS_0416["NUM_LAYERS"]), checkpoint)
    return model, checkpoint, tiny_data_dir / TOKENIZER_NAME


def import_0416(checkpoint, out, tokenizer, **changes):
    return import_checkpoint(ImportConfig("0416", as_settings({**SETTINGS_0416, **changes})), checkpoint, out,
                             tokenizer=tokenizer)


def test_banked_state_dict_imports_to_the_same_model(record_0416, tmp_path):
    model, checkpoint, tokenizer = record_0416
    result = import_0416(checkpoint, tmp_path / "import", tokenizer)
    state, config, info = load_stage_model(result.out, tokenizer)
    assert config == model.config and info["tokenizer_sha256"] == sha256_file(tokenizer)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["stage"] == "import" and manifest["config"]["settings"]["GATE_ATTN_SRC"] == "q"
    assert {record["role"] for record in manifest["inputs"]} == {"record_checkpoint", "tokenizer"}
    assert result.metrics["tensors"] == len(state) and not result.metrics["dropped"]


def state_edits(layers: int) -> dict:
    """Ways a state dict can disagree with its settings, and the first tensor each must be refused for."""
    def extra(state):
        state["ema_step"] = torch.zeros(1)

    def missing(state):
        del state["blocks.3.attn_scale"]

    def reshaped(state):
        state["blocks.2.attn.q_gain"] = torch.zeros(8)

    def integer(state):
        state["skip_weights"] = state["skip_weights"].long()

    return {
        "extra": (extra, {}, "tensor ema_step has no place in the config's model"),
        "missing": (missing, {}, r"needs blocks\.3\.attn_scale \(32,\), which the checkpoint lacks"),
        "reshaped": (reshaped, {}, r"tensor blocks\.2\.attn\.q_gain has shape \(8,\), the config's model needs \(4,"),
        "integer": (integer, {}, "tensor skip_weights is torch.int64, not floating point"),
        "fewer layers": (lambda state: None, {"NUM_LAYERS": layers - 1, "PARALLEL_START_LAYER": 3},
                         r"tensor qo_bank has shape \(12, 32, 32\), the config's model needs \(10, 32, 32\)"),
        "other gate width": (lambda state: None, {"GATE_WIDTH": 6},
                             r"tensor blocks\.0\.attn\.attn_gate_proj\.weight \(as blocks\.0\.attn\.out_gate\.weight\) "
                             r"has shape \(4, 8\), the config's model needs \(4, 6\)"),
        "smear off": (lambda state: None, {"SMEAR_GATE": 0},
                      r"tensor smear_lambda \(as token_smear\.strength\) has no place"),
    }


@pytest.mark.parametrize("case", list(state_edits(6)))
def test_mismatched_state_dicts_are_refused_naming_the_first_tensor(case, record_0416, tmp_path):
    model, checkpoint, tokenizer = record_0416
    edit, changes, message = state_edits(SETTINGS_0416["NUM_LAYERS"])[case]
    state = torch.load(checkpoint, weights_only=True)
    edit(state)
    torch.save(state, checkpoint)
    with pytest.raises(InvalidInput, match=message):
        import_0416(checkpoint, tmp_path / "import", tokenizer, **changes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model.pt"]  # nothing written, no lock left


class NotATensor:  # a pickled object of a user class needs a full unpickle
    pass


def test_files_that_need_a_full_unpickle_or_hold_no_state_dict_are_refused(record_0416, tmp_path, monkeypatch,
                                                                            capsys):
    model, checkpoint, tokenizer = record_0416
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"tok_emb.weight": torch.zeros(2), "extra": NotATensor()}, unsafe)
    with pytest.raises(InvalidInput, match="cannot be read as plain tensors .*weights_only.*never unpickles"):
        import_0416(unsafe, tmp_path / "import", tokenizer)
    settings = [arg for setting in as_settings(SETTINGS_0416) for arg in ("--set", setting)]
    code, _, err = run_cli("import", unsafe, "--record", "0416", *settings, "--tokenizer", tokenizer, "--out",
                           tmp_path / "cli", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 3 and len(err.strip().splitlines()) == 1 and "weights_only" in err and "Traceback" not in err
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(InvalidInput, match="holds a list, not a state dict"):
        import_0416(listed, tmp_path / "import", tokenizer)
    plain = tmp_path / "plain.pt"
    torch.save({"tok_emb.weight": torch.zeros(2), "step": 7}, plain)  # loads, but is no state dict
    with pytest.raises(InvalidInput, match="entry 'step' is a int, not a tensor"):
        import_0416(plain, tmp_path / "import", tokenizer)
    assert not (tmp_path / "import").exists() and not (tmp_path / "cli").exists()


def test_cli_usage_errors(record_0416, tmp_path, monkeypatch, capsys):
    _, checkpoint, tokenizer = record_0416
    out = tmp_path / "out"
    for args, message in (
        (["--set", "SMEAR_GATE=1"], "need a record"),
        (["--record", "0417"], "record = '0417': must be one of 0416, 0322"),
        (["--record", "0416", "--config", tmp_path / "x.toml"], "one of the two"),
        (["--record", "0416", "--set", "GATE_MLP_OUT=1"], "GATE_MLP_OUT=1"),
        (["--record", "0416", "--set", "NUM_LAYERS"], "'NUM_LAYERS' is not a KEY=VALUE setting"),
    ):
        code, _, err = run_cli("import", checkpoint, *args, "--tokenizer", tokenizer, "--out", out,
                               monkeypatch=monkeypatch, capsys=capsys)
        assert code == 2 and message in err, (args, err)
    code, _, err = run_cli("import", checkpoint, "--record", "0416", "--out", out, monkeypatch=monkeypatch,
                           capsys=capsys)
    assert code == 2 and "the tokenizer is needed" in err
    code, _, err = run_cli("import", checkpoint, "--record", "0416", "--tokenizer", tokenizer, "--out", out,
                           monkeypatch=monkeypatch, capsys=capsys)  # the defaults: vocab 8192
    assert code == 3 and "tokenizer vocabulary is 1024 but the model's vocab_size is 8192" in err
    assert not out.exists()


# ---- into the pipeline -------------------------------------------------------------------------------------
def test_import_feeds_quantize_compress_and_eval(record_0416, tiny_data_dir, tmp_path, monkeypatch, capsys):
    """The 04-16 model (loops, lanes, gates) through every stage after train; bundle refuses the import."""
    model, checkpoint, _ = record_0416
    env = tmp_path / "run.env"
    env.write_text("".join(f"{key}={value}\n" for key, value in SETTINGS_0416.items()) + "SEED=1337\n")
    imported, q, blob = tmp_path / "import", tmp_path / "q", tmp_path / "blob"
    for args in (("import", checkpoint, "--record", "0416", "--env", env, "--data", tiny_data_dir, "--out",
                  imported),
                 ("quantize", imported, "--plan", "int6", "--keep-float-numel", "256", "--out", q),
                 ("compress", q, "--codec", "zlib", "--out", blob)):
        code, _, err = run_cli(*args, monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
    plan = json.loads((q / "plan.json").read_text())
    assert plan["tokenizer_sha256"] == sha256_file(tiny_data_dir / TOKENIZER_NAME) and \
        plan["model_config"]["num_loops"] == 2
    scores = {}
    for name, artifact in (("import", imported), ("blob", blob)):
        code, out, err = run_cli("eval", artifact, "--data", tiny_data_dir, "--json", "--out",
                                 tmp_path / f"eval-{name}", monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        scores[name] = json.loads(out)
    assert scores["import"]["kind"] == "import" and scores["blob"]["kind"] == "compress"
    assert scores["blob"]["val_bpb"] == pytest.approx(scores["import"]["val_bpb"], rel=0.05)
    code, _, err = run_cli("bundle", "--train", imported, "--blob", blob, "--name", "x", "--github-id", "y",
                           "--out", tmp_path / "bundle", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 3 and "is an imported record checkpoint" in err and not (tmp_path / "bundle").exists()


def test_safetensors_with_a_pgolf_config_scores_as_the_trained_checkpoint(tiny_checkpoint_dir, tiny_data_dir,
                                                                          tmp_path, monkeypatch, capsys):
    """A pgolf-named safetensors state dict described by a TOML [model] table: the same weights, the same score."""
    state, config, _ = load_stage_model(tiny_checkpoint_dir)
    checkpoint = tmp_path / "weights.safetensors"
    save_file(state, checkpoint)
    toml = tmp_path / "model.toml"
    toml.write_text("[model]\n" + "".join(f"{key} = {json.dumps(value)}\n"
                                          for key, value in dataclasses.asdict(config).items()
                                          if not isinstance(value, tuple)))
    argv = ("import", checkpoint, "--config", toml, "--data", tiny_data_dir, "--json", "--out", tmp_path / "import")
    code, out, err = run_cli(*argv, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0 and json.loads(out)["source_format"] == "safetensors", err
    code, again, err = run_cli(*argv, monkeypatch=monkeypatch, capsys=capsys)  # the same run: up to date
    assert code == 0 and f"{tmp_path / 'import'}: up to date (import, made " in err and again == out
    toml.write_text(toml.read_text() + "# the same model\n")
    code, _, err = run_cli(*argv, monkeypatch=monkeypatch, capsys=capsys)  # a --config file is an input
    assert code == 3 and f"input {toml.resolve()} changed since it was made" in err
    scores = []
    for artifact in (tiny_checkpoint_dir, tmp_path / "import"):
        code, out, err = run_cli("eval", artifact, "--data", tiny_data_dir, "--json", "--out",
                                 tmp_path / f"eval-{len(scores)}", monkeypatch=monkeypatch, capsys=capsys)
        assert code == 0, err
        scores.append(json.loads(out)["val_loss"])
    assert scores[0] == scores[1]
