import numpy as np
import pytest

from pgolf.errors import InvalidInput
from pgolf.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardWriter,
    header_bytes,
    list_shards,
    load_shard,
    open_dataset,
    read_header,
    write_shard,
)


def test_header_layout_is_the_challenge_format(tmp_path):
    tokens = np.array([1, 5, 65535, 0, 1023], dtype=np.uint16)
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * len(tokens)
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert np.frombuffer(raw[1024:], dtype="<u2").tolist() == tokens.tolist()
    assert load_shard(path).tolist() == tokens.tolist()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw[:500], "truncated header"),
        (lambda raw: (123).to_bytes(4, "little") + raw[4:], "wrong magic"),
        (lambda raw: raw[:4] + (2).to_bytes(4, "little") + raw[8:], "unsupported version"),
        (lambda raw: raw[:-2], "size"),
        (lambda raw: raw + b"\0", "size"),
    ],
)
def test_bad_shards_are_rejected_with_file_and_reason(tmp_path, mutate, message):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(InvalidInput, match=message) as err:
        read_header(path)
    assert str(path) in str(err.value)


def test_writer_splits_into_fixed_size_shards_without_losing_tokens(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[1], rng.integers(4, 1024, rng.integers(1, 50))]).astype(np.uint16) for _ in range(40)]
    writer = ShardWriter(tmp_path, "train", shard_tokens=100)
    for doc in docs:
        writer.write(doc)
    paths = writer.close()
    stream = np.concatenate(docs)
    assert [p.name for p in paths] == [f"fineweb_train_{i:06d}.bin" for i in range(len(paths))]
    assert all(read_header(p) == 100 for p in paths[:-1]) and 0 < read_header(paths[-1]) <= 100
    assert np.concatenate([load_shard(p) for p in paths]).tolist() == stream.tolist()
    assert list_shards(tmp_path, "train") == paths
    assert not list(tmp_path.glob(".*tmp"))


def test_interrupted_writer_leaves_no_complete_looking_shard(tmp_path):
    writer = ShardWriter(tmp_path, "val", shard_tokens=1000)
    writer.write(np.ones(10, dtype=np.uint16))
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_dataset_reads_the_challenge_layout(tmp_path):
    root = tmp_path / "data"
    shard_dir = root / "datasets" / "fineweb10B_sp1024"
    shard_dir.mkdir(parents=True)
    (root / "tokenizers").mkdir()
    model = root / "tokenizers" / "fineweb_1024_bpe.model"
    model.write_bytes(b"placeholder")
    write_shard(shard_dir / "fineweb_val_000000.bin", np.ones(3, dtype=np.uint16))
    write_shard(shard_dir / "fineweb_train_000000.bin", np.ones(3, dtype=np.uint16))
    dataset = open_dataset(shard_dir)
    assert dataset.tokenizer == model and len(dataset.train) == len(dataset.val) == 1
    with pytest.raises(InvalidInput, match="no fineweb_"):
        open_dataset(root)


def test_header_constants():
    assert HEADER_BYTES == 1024 and MAGIC == 20240520 and len(header_bytes(7)) == 1024


def tokenize_like(directory, shards: dict) -> None:
    """A tokenize-shaped output listing `shards` (name -> tokens) and a tokenizer file."""
    from pgolf.artifacts import StageOutput

    with StageOutput(directory, "tokenize") as stage:
        for name, tokens in shards.items():
            write_shard(stage.add_output(name, f"{name.split('_')[1]}_shard"), np.asarray(tokens))
        stage.add_output("fineweb_1024_bpe.model", "tokenizer").write_bytes(b"model")
        stage.metrics = {"tokenizer_sha256": "0" * 64}
        stage.finalize()


def test_a_manifest_lists_exactly_the_shards_that_are_read(tmp_path):
    data = tmp_path / "data"
    tokenize_like(data, {"fineweb_val_000000.bin": [1, 5, 6], "fineweb_train_000000.bin": [1, 7, 8]})
    dataset = open_dataset(data)
    assert dataset.tokenizer == data / "fineweb_1024_bpe.model" and dataset.manifest["stage"] == "tokenize"
    extra = data / "fineweb_val_000001.bin"
    write_shard(extra, np.array([1, 9, 9]))  # scored as validation if it were read: double the tokens
    with pytest.raises(InvalidInput, match="fineweb_val_000001.bin: a shard .*manifest.json does not list"):
        open_dataset(data)
    extra.unlink()
    write_shard(data / "fineweb_train_000000.bin", np.array([1, 7, 9]))  # same size, other tokens
    with pytest.raises(InvalidInput, match="fineweb_train_000000.bin: sha256 does not match"):
        open_dataset(data)
    open_dataset(data, verify=("val",))  # eval reads only val: train shards are not hashed for it
    (data / "fineweb_train_000000.bin").unlink()
    with pytest.raises(InvalidInput, match="fineweb_train_000000.bin: listed in .* but missing"):
        open_dataset(data, verify=())


def test_an_empty_shard_is_refused_wherever_shards_are_read(tmp_path):
    from pgolf.train_loader import TokenStream

    write_shard(tmp_path / "fineweb_val_000000.bin", np.array([1, 2, 3]))
    write_shard(tmp_path / "fineweb_train_000000.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(InvalidInput, match="fineweb_train_000000.bin: holds 0 tokens"):
        open_dataset(tmp_path)
    with pytest.raises(InvalidInput, match="the train shards hold no tokens"):  # the loop that used to spin
        TokenStream([tmp_path / "fineweb_train_000000.bin"], vocab_size=1024).take(10)
