"""pgolf.checkpoint: bit-exact round trips, atomic writes, and refusal (exit 3) of anything else."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from pgolf.checkpoint import load_checkpoint, model_config_from_json, model_config_to_json, save_checkpoint
from pgolf.errors import InvalidInput
from pgolf.model import GPT, ModelConfig

CONFIG = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, max_seq_len=32,
                     smear_gate=True, bigram_buckets=31, bigram_dim=8, tie_embeddings=False)
METADATA = {"vocab_size": "64", "tokenizer_sha256": "ab" * 32}


def trained_like_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # no zero-init tensors: every value must survive the trip
    return model


def test_round_trip_is_bit_exact_and_atomic(tmp_path):
    model = trained_like_model()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model.state_dict(), CONFIG, METADATA)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind
    state_dict, config, metadata = load_checkpoint(path)
    assert config == CONFIG and metadata == METADATA
    assert state_dict.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert state_dict[name].dtype == tensor.dtype and torch.equal(state_dict[name], tensor), name
    restored = GPT(config)
    restored.load_state_dict(state_dict)
    tokens = torch.randint(0, 64, (2, 16))
    assert torch.equal(restored.logits(tokens), model.logits(tokens))


def test_bf16_weights_round_trip_in_their_dtype(tmp_path):
    state = {name: tensor.to(torch.bfloat16) for name, tensor in trained_like_model().state_dict().items()}
    save_checkpoint(tmp_path / "bf16.safetensors", state, CONFIG, {})
    loaded, _, _ = load_checkpoint(tmp_path / "bf16.safetensors")
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor), name


def test_model_config_json_round_trips_and_fills_new_fields_with_defaults():
    assert model_config_from_json(model_config_to_json(CONFIG)) == CONFIG
    with_tuple = dataclasses.replace(CONFIG, value_embed_layers=(0, 1))  # JSON turns the tuple into a list
    assert model_config_from_json(model_config_to_json(with_tuple)) == with_tuple
    older = {k: v for k, v in json.loads(model_config_to_json(CONFIG)).items() if k != "attn_out_gate_width"}
    assert model_config_from_json(json.dumps(older)).attn_out_gate_width == 0
    with pytest.raises(ValueError, match="unknown model config fields: layers"):
        model_config_from_json(json.dumps({"layers": 3}))
    with pytest.raises(ValueError, match="num_heads"):
        model_config_from_json(json.dumps({"model_dim": 30, "num_heads": 4}))


def test_metadata_must_be_strings_and_not_reserved(tmp_path):
    state = trained_like_model().state_dict()
    with pytest.raises(ValueError, match="str to str"):
        save_checkpoint(tmp_path / "a.safetensors", state, CONFIG, {"vocab_size": 64})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "a.safetensors", state, CONFIG, {"format": "other"})
    assert not list(tmp_path.iterdir())


def refused(path, problem: str):
    with pytest.raises(InvalidInput, match=problem) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: ") and info.value.exit_code == 3


def test_refuses_missing_and_non_safetensors_files(tmp_path):
    refused(tmp_path / "absent.safetensors", "no such checkpoint")
    pickled = tmp_path / "model.pt"
    torch.save(trained_like_model().state_dict(), pickled)  # written only to prove it is never unpickled
    refused(pickled, "not a safetensors file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    refused(garbage, "not a safetensors file")


def test_refuses_safetensors_without_pgolf_metadata(tmp_path):
    state = trained_like_model().state_dict()
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    refused(bare, "not a pgolf checkpoint")
    no_config = tmp_path / "no_config.safetensors"
    save_file(state, str(no_config), metadata={"format": "pgolf-checkpoint"})
    refused(no_config, "no model_config")
    bad_config = tmp_path / "bad_config.safetensors"
    header = {"format": "pgolf-checkpoint", "model_config": '{"num_heads": 5}'}
    save_file(state, str(bad_config), metadata=header)
    refused(bad_config, "invalid model_config .*num_heads")


def test_refuses_tensors_that_do_not_match_the_config(tmp_path):
    state = trained_like_model().state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc.weight"}
    save_checkpoint(tmp_path / "missing.safetensors", missing, CONFIG, {})
    refused(tmp_path / "missing.safetensors", "missing: blocks.1.mlp.fc.weight")
    save_checkpoint(tmp_path / "extra.safetensors", {**state, "blocks.9.attn.c_q.weight": torch.zeros(2)},
                    CONFIG, {})
    refused(tmp_path / "extra.safetensors", "unexpected: blocks.9.attn.c_q.weight")
    wider = dataclasses.replace(CONFIG, model_dim=64)
    save_checkpoint(tmp_path / "shape.safetensors", state, wider, {})
    refused(tmp_path / "shape.safetensors", r"skip_weights has shape \(1, 32\), config needs \(1, 64\)")
    integer_gate = {**state, "smear.gate": torch.zeros(32, dtype=torch.int32)}
    save_checkpoint(tmp_path / "dtype.safetensors", integer_gate, CONFIG, {})
    refused(tmp_path / "dtype.safetensors", "smear.gate is torch.int32")
