"""The training token stream, read as the challenge's train_gpt.py reads it.

Train shards are streamed in order (wrapping around at the end). Every micro-step takes one contiguous chunk
of world_size * (local_tokens + 1) tokens from the stream; rank r keeps the r-th span, and x = span[:-1],
y = span[1:], reshaped to [local_tokens / seq_len, seq_len]. Rank r's micro-step i of N ranks reads the span
of micro-step i * N + r of one rank, so a step sees the same tokens at any world size. Only train shards are
ever opened here.
"""

from pathlib import Path

import numpy as np
import torch

from pgolf.errors import InvalidInput
from pgolf.shards import load_shard


class TokenStream:
    """Shards in order, forever; `position` is (shard index, token offset) and restores the stream exactly.

    Each shard's token ids are checked against the model's vocabulary when the shard is first opened.
    """

    def __init__(self, paths: list, vocab_size: int, position: tuple[int, int] = (0, 0)):
        if not paths:
            raise InvalidInput("no train shards (fineweb_train_*.bin) to read")
        self.paths = [Path(p) for p in paths]
        self.vocab_size = vocab_size
        self.shard_index, self.offset = position
        self.tokens = self._open(self.shard_index)

    def _open(self, index: int) -> np.ndarray:
        tokens = load_shard(self.paths[index])
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            bad = int(np.argmax(tokens >= self.vocab_size))
            raise InvalidInput(f"{self.paths[index]}: token {int(tokens[bad])} at position {bad} >= model "
                               f"vocab_size {self.vocab_size} (tokenizer/shard mismatch)")
        return tokens

    @property
    def position(self) -> tuple[int, int]:
        return self.shard_index, self.offset

    def take(self, count: int) -> np.ndarray:
        chunks = []
        empty_opens = 0
        while count > 0:
            available = len(self.tokens) - self.offset
            if available <= 0:
                empty_opens += 1
                if empty_opens > len(self.paths):  # a whole lap without a token: the stream would never end
                    raise InvalidInput(f"{self.paths[0].parent}: the train shards hold no tokens")
                self.shard_index = (self.shard_index + 1) % len(self.paths)
                self.tokens, self.offset = self._open(self.shard_index), 0
                continue
            empty_opens = 0
            size = min(count, available)
            chunks.append(self.tokens[self.offset : self.offset + size])
            self.offset += size
            count -= size
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class TrainLoader:
    """(x, y) int64 micro-batches of one rank, on `device`.

    On CUDA the next micro-batch is sliced, pinned and its host-to-device copy queued (non_blocking) as soon
    as the current one is handed out, so the copy overlaps the GPU's work on the current one.
    """

    def __init__(self, paths: list, vocab_size: int, seq_len: int, local_tokens: int, rank: int,
                 world_size: int, device: torch.device, position: tuple[int, int] = (0, 0)):
        self.seq_len, self.local_tokens = seq_len, local_tokens
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.stream = TokenStream(paths, vocab_size, position)
        self.position = self.stream.position  # the stream position after the last batch handed out
        self.prefetched = self._load()

    def _load(self):
        span = self.local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span].astype(np.int32))
        if self.device.type == "cuda":
            local = local.pin_memory().to(self.device, non_blocking=True)
        return local, self.stream.position

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        local, self.position = self.prefetched
        self.prefetched = self._load()
        local = local.long()
        return local[:-1].view(-1, self.seq_len), local[1:].view(-1, self.seq_len)
