"""Exact bits per byte (REFERENCE.md, "Exact bits per byte").

For each token id of the SentencePiece model: control/unknown/unused ids (and ids >= the model's vocab size) are
boundary tokens with 0 bytes; byte-fallback ids count 1 byte; any other piece counts the UTF-8 length of the piece
without its leading U+2581, plus 1 byte for that leading space unless the previous token is a boundary token.
val_bpb = sum NLL / (ln 2 * sum bytes).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.errors import InvalidInput

SPACE = "\u2581"


def load_tokenizer(path: Path):
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: tokenizer model not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise InvalidInput(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None
    return sp


@dataclass(frozen=True)
class ByteTables:
    """Per-token-id lookup tables, of length >= the model's vocab size."""

    base_bytes: np.ndarray  # int16: UTF-8 bytes of the piece without its leading space
    has_leading_space: np.ndarray  # bool: piece starts with U+2581
    is_boundary: np.ndarray  # bool: control/unknown/unused (and out-of-vocab ids): 0 bytes, resets the space rule

    @property
    def size(self) -> int:
        return len(self.base_bytes)

    def token_bytes(self, prev_ids: np.ndarray, target_ids: np.ndarray) -> np.ndarray:
        """Bytes of each scored target given the token before it."""
        prev_ids = np.asarray(prev_ids, dtype=np.int64)
        target_ids = np.asarray(target_ids, dtype=np.int64)
        space = self.has_leading_space[target_ids] & ~self.is_boundary[prev_ids]
        return self.base_bytes[target_ids].astype(np.int64) + space

    def count_bytes(self, tokens: np.ndarray) -> int:
        """Total bytes of every target tokens[1:] scored after tokens[:-1] (a whole split: BOS first)."""
        tokens = np.asarray(tokens)
        total = 0
        step = 1 << 24
        for start in range(0, max(len(tokens) - 1, 0), step):
            end = min(start + step, len(tokens) - 1)
            total += int(self.token_bytes(tokens[start:end], tokens[start + 1 : end + 1]).sum())
        return total

    def torch(self, device=None):
        """(base_bytes, has_leading_space, is_boundary) as torch tensors for on-device byte counting."""
        import torch

        return (
            torch.as_tensor(self.base_bytes.astype(np.int32), device=device),
            torch.as_tensor(self.has_leading_space, device=device),
            torch.as_tensor(self.is_boundary, device=device),
        )


def build_byte_tables(sp, table_size: int | None = None) -> ByteTables:
    vocab = sp.GetPieceSize()
    size = max(vocab, table_size or 0)
    base_bytes = np.zeros(size, dtype=np.int16)
    has_leading_space = np.zeros(size, dtype=bool)
    is_boundary = np.ones(size, dtype=bool)
    for token_id in range(vocab):
        if sp.IsControl(token_id) or sp.IsUnknown(token_id) or sp.IsUnused(token_id):
            continue
        is_boundary[token_id] = False
        if sp.IsByte(token_id):
            base_bytes[token_id] = 1
            continue
        piece = sp.IdToPiece(token_id)
        if piece.startswith(SPACE):
            has_leading_space[token_id] = True
            piece = piece[1:]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return ByteTables(base_bytes, has_leading_space, is_boundary)


def tokenizer_problems(sp) -> list[str]:
    """Reasons a tokenizer would make bpb wrong or inflated; empty when it is fit for the challenge."""
    problems = []
    space_id = sp.PieceToId(SPACE)
    if sp.IdToPiece(space_id) != SPACE or sp.IsUnknown(space_id):
        problems.append(f"no standalone '{SPACE}' piece (each space would cost byte tokens; bpb under-reported)")
    byte_ids = [i for i in range(sp.GetPieceSize()) if sp.IsByte(i)]
    if len(byte_ids) != 256:
        problems.append(f"no byte fallback ({len(byte_ids)} of 256 <0xNN> pieces)")
    if sp.bos_id() != 1:
        problems.append(f"BOS id is {sp.bos_id()}, the challenge format needs 1")
    return problems


def check_tokenizer(sp, path: Path, force: bool = False) -> list[str]:
    """Refuse (exit 3) a tokenizer with problems unless `force`; returns the problems either way."""
    problems = tokenizer_problems(sp)
    if problems and not force:
        raise InvalidInput(f"{path}: {'; '.join(problems)} (pass --force to use it anyway)")
    return problems


def bits_per_byte(nll_nats_sum: float, byte_count: int) -> float:
    return nll_nats_sum / (math.log(2) * byte_count)
