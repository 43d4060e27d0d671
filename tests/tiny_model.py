"""A small GPT trained briefly on real tokens: the model the eval, quantize and TTT tests score."""

import numpy as np
import torch

from pgolf.model import GPT, ModelConfig
from pgolf.shards import list_shards, load_split

TINY_MODEL = dict(vocab_size=1024, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
                  max_seq_len=128)
TRAIN_STEPS = 120
TRAIN_BATCH, TRAIN_SEQ = 8, 128


def train_tiny_model(data_dir, steps: int = TRAIN_STEPS, config=None, lr: float = 1e-2, batch: int = TRAIN_BATCH,
                     seq: int = TRAIN_SEQ):
    """A small GPT (default TINY_MODEL) trained with AdamW on random crops of the train split; deterministic
    (seed 0; the session runs one torch thread)."""
    torch.manual_seed(0)
    config = config or ModelConfig(**TINY_MODEL)
    model = GPT(config)
    tokens = torch.from_numpy(load_split(list_shards(data_dir, "train")).astype(np.int64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=generator)
        crops = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
        loss = model(crops[:, :-1], crops[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval(), config
