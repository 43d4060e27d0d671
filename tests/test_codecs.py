"""The counted blob: bit-exact round trips for every codec x shuffle x bitpack, auto = smallest, bad blobs
refused, and `pgolf compress` end to end on a quantize output directory."""

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgolf.artifacts import StageOutput, read_manifest
from pgolf.cli import main
from pgolf.codecs import (
    BLOB_HEADER,
    CODECS,
    build_payload,
    decompress_bytes,
    encode_blob,
    pack_bits,
    pack_blob,
    read_blob,
    read_blob_header,
    shuffle_bytes,
    unpack_bits,
    unpack_blob,
    unshuffle_bytes,
)
from pgolf.errors import InvalidInput
from pgolf.model import GPT, ModelConfig
from pgolf.quantized import PLAN_FILE, QUANTIZED_FILE, quantize_state, save_quantized
from pgolf.stage_model import load_blob_model

TINY = ModelConfig(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)


def pgolf(*args):
    """The real entry point in a subprocess."""
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True)


def run_main(*args) -> int:
    """pgolf.cli.main in-process (no torch re-import per call); returns the exit code."""
    argv = sys.argv
    sys.argv = ["pgolf", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv


def run_cli(capsys, *args) -> subprocess.CompletedProcess:
    """run_main with stdout and stderr captured."""
    capsys.readouterr()
    code = run_main(*args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def tiny_quantized_state(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """A tiny GPT's weights quantized by pgolf.quant as the records do: int6 attention, int5 MLP, int8
    embedding (levels in int8 containers + fp16 scales), fp16/fp32 passthrough vectors."""
    torch.manual_seed(seed)
    state = {name: weight + 0.02 * torch.randn_like(weight)  # trained weights are dense, not init's 0s/1s
             for name, weight in GPT(TINY).state_dict().items()}
    schemes = {}
    for name, weight in state.items():
        if weight.ndim == 2 and weight.shape[0] >= 32:
            schemes[name] = "int8" if name == "tok_emb.weight" else "int5" if ".mlp." in name else "int6"
        else:
            schemes[name] = "fp32" if "scale" in name or "gain" in name else "fp16"
    tensors, records = quantize_state(state, schemes, clip="gptq-lite", scale_floor="none")
    # As plan.json holds it (JSON: tuple fields become lists), like pgolf.quantize's plan.
    return tensors, json.loads(json.dumps({"model_config": dataclasses.asdict(TINY), "tensors": records}))


def write_quantize_dir(out: Path, tensors: dict[str, torch.Tensor], plan: dict) -> Path:
    """A quantize stage output as `pgolf quantize` writes it: quantized.safetensors, plan.json, manifest."""
    with StageOutput(out, "quantize", argv=["test"]) as stage:
        save_quantized(stage.dir, tensors, plan)
        stage.add_output(QUANTIZED_FILE, "quantized")
        stage.add_output(PLAN_FILE, "plan")
        stage.finalize()
    return out


def assert_bit_exact(restored: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert restored.keys() == original.keys()
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and restored[name].shape == tensor.shape, name
        assert torch.equal(restored[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


@pytest.fixture(scope="module")
def state():
    return tiny_quantized_state()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("bitpack", [False, True])
def test_round_trip_is_bit_exact(state, codec, shuffle, bitpack):
    tensors, plan = state
    blob = pack_blob(tensors, plan, codec, shuffle=shuffle, bitpack=bitpack)
    header = read_blob_header(blob)
    assert (header["codec"], header["shuffle"], header["bitpack"]) == (codec, shuffle, bitpack)
    restored, restored_plan = unpack_blob(blob)
    assert_bit_exact(restored, tensors)
    assert restored_plan == plan


def test_bitpack_stores_int5_and_int6_in_their_width(state):
    tensors, plan = state

    def data_bytes(payload: bytes) -> int:
        return len(payload) - 4 - int.from_bytes(payload[:4], "little")

    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    assert data_bytes(build_payload(tensors, plan, shuffle=False, bitpack=False)) == raw
    # int8 embeddings span 8 bits and stay in their container; int6 attention and int5 MLP levels shrink.
    packed = sum((t.numel() * (5 if ".mlp." in n else 6) + 7) // 8
                 if t.dtype == torch.int8 and n != "tok_emb.weight" else t.numel() * t.element_size()
                 for n, t in tensors.items())
    assert data_bytes(build_payload(tensors, plan, shuffle=False, bitpack=True)) == packed < raw


def test_auto_keeps_the_smallest_blob(state):
    tensors, plan = state
    sizes = [len(pack_blob(tensors, plan, codec, shuffle=s, bitpack=b))
             for codec in CODECS for s in (False, True) for b in (False, True)]
    assert len(pack_blob(tensors, plan, "auto")) == min(sizes)
    assert len(pack_blob(tensors, plan, "zstd")) == min(sizes[4:8])


def test_levels_and_unknown_codec(state):
    tensors, plan = state
    assert read_blob_header(pack_blob(tensors, plan, "zstd", level=3))["level"] == 3
    with pytest.raises(ValueError, match="valid: zlib, zstd, lzma, brotli"):
        pack_blob(tensors, plan, "gzip")
    with pytest.raises(ValueError, match="out of range"):
        pack_blob(tensors, plan, "zlib", level=12)


@pytest.mark.parametrize("bits", range(0, 8))
def test_pack_bits_inverts(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=1001, dtype=np.uint8)
    packed = pack_bits(values, bits)
    assert len(packed) == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_bits(packed, bits, 1001), values)


def test_shuffle_makes_byte_planes():
    halves = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16)
    raw = halves.view(torch.uint8).numpy()
    planes = shuffle_bytes(raw, 2)
    assert list(planes[:3]) == list(raw[0::2]) and list(planes[3:]) == list(raw[1::2])
    assert np.array_equal(unshuffle_bytes(planes, 2), raw)


def test_empty_and_constant_tensors_round_trip():
    tensors = {"empty": torch.zeros(0, 4, dtype=torch.int8),
               "constant": torch.full((3, 5), -7, dtype=torch.int8),
               "bf16": torch.randn(7).to(torch.bfloat16), "flag": torch.tensor([True, False])}
    for bitpack in (False, True):
        restored, plan = unpack_blob(pack_blob(tensors, {}, "zlib", shuffle=True, bitpack=bitpack))
        assert_bit_exact(restored, tensors)


@pytest.fixture(scope="module")
def zstd_blob(state):
    return pack_blob(state[0], state[1], "zstd", shuffle=True, bitpack=False)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:10], "truncated blob"),
    (lambda b: b + b"\0", "trailing bytes"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a pgolf blob"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "format version 9"),
    (lambda b: b[:5] + bytes([7]) + b[6:], "codec id 7"),
    (lambda b: b[:5] + bytes([3, 11]) + b[7:], "brotli stream is corrupt"),  # a zstd stream labelled brotli
    (lambda b: b[:-40] + bytes(x ^ 0x55 for x in b[-40:]), "corrupt"),
])
def test_bad_blobs_are_refused(zstd_blob, damage, message):
    with pytest.raises(InvalidInput, match=message):
        unpack_blob(damage(zstd_blob))


def test_foreign_zlib_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "final_model.int8.ptz"
    path.write_bytes(b"\x78\xda" + bytes(100))  # what the records' int8+zlib export looks like to us
    with pytest.raises(InvalidInput, match=f"{path}: not a pgolf blob"):
        read_blob(path)


def test_header_is_small_and_counted(state):
    tensors, plan = state
    blob = pack_blob(tensors, plan, "lzma", shuffle=False, bitpack=False)
    assert BLOB_HEADER.size == 16 and read_blob_header(blob)["stream_bytes"] == len(blob) - 16


@pytest.fixture(scope="module")
def quantize_dir(state, tmp_path_factory):
    return write_quantize_dir(tmp_path_factory.mktemp("run") / "q", *state)


def test_compress_cli_auto_writes_the_smallest_blob(state, quantize_dir, tmp_path):
    out = tmp_path / "blob"
    result = pgolf("compress", quantize_dir, "--codec", "auto", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = read_manifest(out)
    assert manifest["stage"] == "compress" and manifest["outputs"][0]["role"] == "blob"
    assert len(manifest["metrics"]["tried"]) == len(CODECS) * 4
    assert summary["bytes"] == min(row["bytes"] for row in manifest["metrics"]["tried"])
    assert summary["bytes"] == (out / "model.blob").stat().st_size
    restored, plan = read_blob(out / "model.blob")
    assert_bit_exact(restored, state[0])
    assert plan == state[1]
    assert {i["role"] for i in manifest["inputs"]} == {"quantized", "plan"}


def test_compress_cli_named_codec_and_refusals(quantize_dir, tmp_path, capsys):
    out = tmp_path / "blob"
    result = run_cli(capsys, "compress", quantize_dir, "--codec", "zstd", "--level", "19", "--shuffle", "on",
                   "--bitpack", "off", "--out", out)
    assert result.returncode == 0, result.stderr
    assert read_blob_header((out / "model.blob").read_bytes())["level"] == 19
    assert [row["codec"] for row in read_manifest(out)["metrics"]["tried"]] == ["zstd"]
    exists = run_cli(capsys, "compress", quantize_dir, "--codec", "zstd", "--out", out)
    assert exists.returncode == 3 and "--force" in exists.stderr

    unknown = run_cli(capsys, "compress", quantize_dir, "--codec", "gzip", "--out", tmp_path / "x")
    assert unknown.returncode == 2 and "zlib, zstd, lzma, brotli, auto" in unknown.stderr
    level_without_codec = run_cli(capsys, "compress", quantize_dir, "--level", "5", "--out", tmp_path / "x")
    assert level_without_codec.returncode == 2 and "level" in level_without_codec.stderr
    assert not (tmp_path / "x").exists()


def test_compress_refuses_a_tampered_quantize_dir(quantize_dir, tmp_path, capsys):
    bad = tmp_path / "q"
    bad.mkdir()
    for path in quantize_dir.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    text = (bad / "plan.json").read_text()
    (bad / "plan.json").write_text(text.replace('"bits": 8', '"bits": 6'))  # same size, different digest
    result = run_cli(capsys, "compress", bad, "--codec", "zlib", "--out", tmp_path / "blob")
    assert result.returncode == 3 and "plan.json" in result.stderr and "sha256" in result.stderr
    assert not (tmp_path / "blob").exists()


# ---- crafted blobs: refused with one InvalidInput, never half-loaded, never another exception ---------------
def reencoded(tensors: dict, plan: dict, header_change=None, payload_change=None) -> bytes:
    """A blob whose payload (header JSON and/or bytes) was altered after packing, with a valid CRC, so only
    the payload checks can catch it."""
    payload = build_payload(tensors, plan, shuffle=False, bitpack=True)
    if header_change is not None:
        (length,) = struct.unpack_from("<I", payload)
        header = json.loads(payload[4 : 4 + length])
        header_change(header)
        encoded = json.dumps(header).encode()
        payload = struct.pack("<I", len(encoded)) + encoded + payload[4 + length:]
    if payload_change is not None:
        payload = payload_change(payload)
    return encode_blob(payload, "zlib", 9, False, True)


def first_entry(name: str):
    def change(header):
        return next(entry for entry in header["tensors"] if entry[0] == name)
    return change


CRAFTED = {
    "negative shape": lambda h: first_entry("tok_emb.weight")(h).__setitem__(2, [-4, 64]),
    "shape of strings": lambda h: first_entry("tok_emb.weight")(h).__setitem__(2, ["a"]),
    "unknown dtype": lambda h: first_entry("tok_emb.weight")(h).__setitem__(1, "complex64"),
    "unknown encoding": lambda h: first_entry("tok_emb.weight")(h).__setitem__(3, "rle"),
    "bit width 9": lambda h: next(e for e in h["tensors"] if isinstance(e[3], list)).__setitem__(3, ["pack", 9, 0]),
    "entries not a list": lambda h: h.__setitem__("tensors", 5),
    "plan not an object": lambda h: h.__setitem__("plan", [1]),
    "tensor listed twice": lambda h: h["tensors"].append(h["tensors"][0]),
    "record without shape": lambda h: h["plan"]["tensors"]["tok_emb.weight"].pop("shape"),
    "unknown scheme": lambda h: h["plan"]["tensors"]["tok_emb.weight"].__setitem__("scheme", "int3"),
    "a million layers": lambda h: h["plan"]["model_config"].__setitem__("num_layers", 10**6),
    "layers as text": lambda h: h["plan"]["model_config"].__setitem__("num_layers", "eleven"),
    "huge width": lambda h: h["plan"]["model_config"].__setitem__("model_dim", 10**12),
    "no model config": lambda h: h["plan"].pop("model_config"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_blob_is_refused_with_one_line(state, tmp_path, case):
    tensors, plan = state
    path = tmp_path / "model.blob"
    path.write_bytes(reencoded(tensors, plan, header_change=CRAFTED[case]))
    with pytest.raises(InvalidInput):
        load_blob_model(path)


def test_a_packed_range_that_reaches_the_top_of_int8_round_trips_and_a_crafted_overflow_is_refused():
    """Found by the property test: [1, 65] packs in 7 bits from 1, and its top code would decode past 127."""
    tensors = {"w": torch.tensor([1, 65, 127], dtype=torch.int8)}
    plan = {"tensors": {"w": {"shape": [3]}}}
    restored, _ = unpack_blob(encode_blob(build_payload(tensors, plan, False, True), "zlib", 9, False, True))
    assert torch.equal(restored["w"], tensors["w"])
    payload = build_payload({"w": torch.tensor([1, 65], dtype=torch.int8)}, {"tensors": {}}, False, True)
    crafted = payload[:-2] + b"\xff\xff"  # both 7-bit codes all ones: 1 + 127 = 128
    with pytest.raises(InvalidInput, match=r"blob tensor 'w' does not decode \(bit-packed value 128"):
        unpack_blob(encode_blob(crafted, "zlib", 9, False, True))


def test_a_header_nested_too_deep_for_json_is_one_line(tmp_path):
    nested = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "model.blob"
    path.write_bytes(encode_blob(struct.pack("<I", len(nested)) + nested, "zlib", 9, False, False))
    with pytest.raises(InvalidInput, match=r"model.blob: blob header is unreadable \(.*recursion"):
        read_blob(path)


@pytest.mark.parametrize("codec", CODECS)
def test_a_decompression_bomb_is_refused_before_it_is_expanded(codec, tmp_path):
    """A few KB that would expand past the payload limit (lowered here to keep the test small)."""
    bomb = encode_blob(bytes(4 << 20), codec, 1 if codec in ("zstd", "brotli") else 0, False, False)
    with pytest.raises(InvalidInput, match=f"{codec} stream decompresses to more than 1,048,576 bytes"):
        decompress_bytes(bomb[BLOB_HEADER.size:], codec, read_blob_header(bomb)["level"], limit=1 << 20)


def test_non_finite_values_in_a_blob_are_refused(state, tmp_path):
    tensors, plan = state
    scales = {**tensors, "tok_emb.weight.scale": tensors["tok_emb.weight.scale"].clone()}
    scales["tok_emb.weight.scale"][2] = float("inf")
    vector = next(name for name, record in plan["tensors"].items() if record["scheme"] == "fp16")
    passthrough = {**tensors, vector: tensors[vector].clone()}
    passthrough[vector].view(-1)[0] = float("nan")
    for bad, message in ((scales, "'tok_emb.weight.scale' holds 1 NaN/Inf"), (passthrough, f"'{vector}' holds 1")):
        path = tmp_path / "model.blob"
        path.write_bytes(pack_blob(bad, plan, "zlib"))
        with pytest.raises(InvalidInput, match=message):
            read_blob(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_payload_corruption_raises_only_invalid_input(state, tmp_path, data):
    tensors, plan = state
    payload = bytearray(build_payload(tensors, plan, shuffle=True, bitpack=True))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del payload[data.draw(st.integers(0, len(payload) - 1)):]
    path = tmp_path / "model.blob"
    path.write_bytes(encode_blob(bytes(payload), "zlib", 1, True, True))
    try:
        load_blob_model(path)
    except InvalidInput:
        pass


# ---------------------------------------------------------------------------------------------------------
# Property tests: any values, shapes, dtypes and layouts round-trip bit-exactly

BLOB_TEST_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
                    torch.bfloat16, torch.float32, torch.float64, torch.bool)


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(0, 8), values=st.lists(st.integers(0, 255), max_size=300))
def test_pack_bits_round_trips_any_values_that_fit(bits, values):
    array = np.array([v & ((1 << bits) - 1) for v in values], dtype=np.uint8)
    packed = pack_bits(array, bits)
    assert len(packed) == (len(array) * bits + 7) // 8
    assert np.array_equal(unpack_bits(packed, bits, len(array)), array)


@settings(max_examples=100, deadline=None)
@given(itemsize=st.sampled_from([1, 2, 4, 8]), count=st.integers(0, 64), seed=st.integers(0, 2**32 - 1))
def test_shuffle_round_trips_any_bytes(itemsize, count, seed):
    raw = np.random.default_rng(seed).integers(0, 256, size=itemsize * count, dtype=np.uint8)
    assert np.array_equal(unshuffle_bytes(shuffle_bytes(raw, itemsize), itemsize), raw)


@st.composite
def blob_tensors(draw):
    """A dict of tensors of the blob's dtypes, any shape (empty included), raw bytes drawn at random (so NaN
    payloads, -0.0 and subnormals occur), and int8 tensors whose values span a few bits (what bit-packing
    stores narrower)."""
    tensors = {}
    for index in range(draw(st.integers(1, 5))):
        dtype = draw(st.sampled_from(BLOB_TEST_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        itemsize = torch.empty(0, dtype=dtype).element_size()
        raw = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
        if dtype == torch.bool:
            tensor = torch.tensor([b & 1 for b in raw], dtype=torch.bool)
        elif dtype == torch.int8 and draw(st.booleans()):
            low = draw(st.integers(-128, 120))
            width = draw(st.integers(1, 7))
            tensor = torch.tensor([low + b % (1 << width) for b in raw], dtype=torch.int16).clamp(-128, 127) \
                .to(torch.int8)
        else:
            tensor = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
        tensors[f"t{index}.weight"] = tensor.reshape(shape).clone()
    return tensors


@settings(max_examples=80, deadline=None)
@given(tensors=blob_tensors(), codec=st.sampled_from(CODECS), shuffle=st.booleans(), bitpack=st.booleans())
def test_any_tensors_round_trip_through_the_blob_format(tensors, codec, shuffle, bitpack):
    """The blob's layer below the plan check: payload + codec + header, for arbitrary tensors."""
    plan = {"format_version": 1, "tensors": {name: {"shape": list(t.shape)} for name, t in tensors.items()}}
    payload = build_payload(tensors, plan, shuffle, bitpack)
    level = 1 if codec in ("zstd", "brotli") else 0  # any level decodes the same; the fastest keeps this quick
    restored, restored_plan = unpack_blob(encode_blob(payload, codec, level, shuffle, bitpack))
    assert_bit_exact(restored, tensors)
    assert restored_plan == plan
