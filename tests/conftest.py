"""Shared session fixtures built from the suite's own real data (tests/demo_data.py: no ../shared needed).

- `tiny_data_dir`: a `tokenize`-shaped output (manifest included) of the demo corpus with a 1024-piece tokenizer
  trained on its train split: ten documents of 1.3k-3.9k tokens are the val split (about 24k tokens, two
  shards), the others train.
- `tiny_checkpoint_dir`: a `train`-shaped output holding a small GPT (2 layers x 64, max_seq_len 128)
  trained for 120 AdamW steps on that train split (seed 0, deterministic, one thread), with the tokenizer's
  sha256 in the checkpoint metadata.
"""

import shutil

import numpy as np
import pytest
import torch

from pgolf.artifacts import StageOutput, sha256_file
from pgolf.bpb import build_byte_tables, load_tokenizer
from pgolf.shards import BOS_ID, ShardWriter, list_shards, load_split
from tests.demo_data import TOKENIZER_NAME, demo_splits, write_demo_tokenizer
from tests.tiny_model import train_tiny_model


def _write_split(directory, split, token_docs, shard_tokens):
    writer = ShardWriter(directory, split, shard_tokens=shard_tokens)
    for ids in token_docs:
        writer.write(np.array([BOS_ID, *ids]))
    return writer.close()


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    tokenizer = write_demo_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    sp = load_tokenizer(tokenizer)
    tables = build_byte_tables(sp)
    out = tmp_path_factory.mktemp("data") / "sp1024"
    metrics = {"tokenizer_sha256": sha256_file(tokenizer), "vocab_size": sp.GetPieceSize()}
    with StageOutput(out, "tokenize", argv=["conftest"]) as stage:
        val_texts, train_texts = demo_splits()
        for split, texts, shard_tokens in (("val", val_texts, 15_000), ("train", train_texts, 200_000)):
            paths = _write_split(stage.dir, split, [sp.encode(text) for text in texts], shard_tokens)
            for path in paths:
                stage.outputs.append((path.name, f"{split}_shard"))
            tokens = load_split(paths)
            text_bytes = sum(len(text.encode()) for text in texts)
            metrics[split] = {"documents": len(texts), "tokens": len(tokens),
                              "bytes": tables.count_bytes(tokens), "text_bytes": text_bytes}
        shutil.copy(tokenizer, stage.add_output(TOKENIZER_NAME, "tokenizer"))
        metrics["tokens_per_byte"] = metrics["val"]["tokens"] / metrics["val"]["bytes"]
        stage.metrics = metrics
        stage.finalize()
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tiny_data_dir, tmp_path_factory):
    from pgolf.checkpoint import save_checkpoint

    model, config = train_tiny_model(tiny_data_dir)
    out = tmp_path_factory.mktemp("run") / "train"
    metadata = {"vocab_size": str(config.vocab_size), "tokenizer_sha256": sha256_file(tiny_data_dir / TOKENIZER_NAME)}
    with StageOutput(out, "train", argv=["conftest"]) as stage:
        checkpoint = stage.add_output("model.safetensors", "checkpoint")
        save_checkpoint(checkpoint, model.state_dict(), config, metadata)
        stage.finalize()
    return out


@pytest.fixture(scope="session")
def tiny_eval_inputs(tiny_data_dir, tiny_checkpoint_dir):
    """(model on the CPU, val tokens, byte tables) of the tiny checkpoint and data."""
    from pgolf.model import build_model
    from pgolf.stage_model import load_stage_model

    state, config, _ = load_stage_model(tiny_checkpoint_dir, tiny_data_dir / TOKENIZER_NAME)
    tokens = np.asarray(load_split(list_shards(tiny_data_dir, "val")), dtype=np.int64)
    tables = build_byte_tables(load_tokenizer(tiny_data_dir / TOKENIZER_NAME), config.vocab_size)
    return build_model(state, config, "cpu"), tokens, tables


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread per test process: `make test` runs two xdist workers on two cores, and more threads than
    cores make OpenMP spin-wait (tiny models ran ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
