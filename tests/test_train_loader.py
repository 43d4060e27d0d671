"""pgolf.train_loader: the train token stream, read in order as the challenge reads it, resumable, refusing
foreign tokens."""


import numpy as np
import pytest
import torch

from pgolf.errors import InvalidInput
from pgolf.shards import write_shard
from pgolf.train_loader import TokenStream, TrainLoader


@pytest.fixture
def shards(tmp_path):
    stream = np.arange(2, 2 + 2600, dtype=np.uint16) % 1000
    paths = [tmp_path / f"fineweb_train_{i:06d}.bin" for i in range(3)]
    for path, part in zip(paths, np.split(stream, [1000, 1700]), strict=True):
        write_shard(path, part)
    return paths, stream.astype(np.int64)


def test_stream_reads_shards_in_order_wraps_and_resumes_from_its_position(shards):
    paths, expected = shards
    stream = TokenStream(paths, vocab_size=1024)
    assert np.array_equal(stream.take(1500), expected[:1500])
    position = stream.position
    assert position == (1, 500)
    rest = stream.take(1500)
    assert np.array_equal(rest, np.concatenate([expected[1500:], expected[:400]]))
    assert np.array_equal(TokenStream(paths, 1024, position).take(1500), rest)


def test_loader_slices_ranks_like_the_challenge(shards):
    paths, expected = shards
    seq_len, local = 4, 8
    single = TrainLoader(paths, 1024, seq_len, local, rank=0, world_size=1, device="cpu")
    ranks = [TrainLoader(paths, 1024, seq_len, local, rank=r, world_size=2, device="cpu") for r in range(2)]
    for _ in range(3):
        per_rank = [loader.next_batch() for loader in ranks]
        for rank in range(2):
            x, y = single.next_batch()
            assert torch.equal(per_rank[rank][0], x) and torch.equal(per_rank[rank][1], y)
    x, y = TrainLoader(paths, 1024, seq_len, local, 0, 1, "cpu").next_batch()
    assert x.shape == (2, 4) and x.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.from_numpy(expected[:8])) and torch.equal(y.flatten(),
                                                                                  torch.from_numpy(expected[1:9]))
    assert single.position == (0, 6 * 9)


def test_stream_refuses_tokens_outside_the_vocab(shards):
    paths, _ = shards
    with pytest.raises(InvalidInput, match=f"{paths[0]}: token 999 at position 997 >= model vocab_size 999"):
        TokenStream(paths, vocab_size=999)
    with pytest.raises(InvalidInput, match="no train shards"):
        TokenStream([], vocab_size=1024)
