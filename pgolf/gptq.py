"""GPTQ (Frantar et al., 2023): round a weight column by column, spreading each column's rounding error onto
the columns not yet rounded through the inverse Hessian of the layer's output error, H = E[x x^T] over
calibration inputs x. Rows are independent given H and the per-row scales, so several scale candidates can be
solved at once by stacking them as extra rows.

Calibration tokens always come from the TRAIN shards (never validation: the challenge forbids looking at it
before it is scored). Two ways, as in the records and after them:
- inside the training budget (TrainConfig gptq_calibration_batches / gptq_reserve_seconds): the train stage runs
  its exported weights over the next train batches and saves every linear layer's H in one pass of the float
  model (GPTQ_HESSIANS_FILE), so `pgolf quantize` reads no train data;
- at quantize time from --data (`gptq_hessians`): sequential, each group's H with the groups before it already
  quantized.
Or from no data at all: `pgolf quantize --calibration generated` samples the calibration windows from the
model itself (generated_windows, the records' autoregressive self-generated calibration), so neither the train
nor the validation split is read after training.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pgolf.artifacts import atomic_write_bytes, safetensors_bytes
from pgolf.errors import InvalidInput
from pgolf.shards import BOS_ID, load_shard

GPTQ_DAMP = 0.01  # dampening added to H's diagonal, as a fraction of its mean
GPTQ_BLOCK = 128  # columns per lazy-update block
GPTQ_BATCH_TOKENS = 65_536  # calibration tokens per forward pass
GPTQ_HESSIANS_FILE = "gptq_hessians.safetensors"  # a train output's Hessians (train_config gptq_calibration_*)


def calibration_windows(train_paths: list, tokens: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len + 1] int64 windows spread evenly over the train shards (deterministic, no RNG)."""
    shards = [load_shard(path) for path in train_paths]
    lengths = np.array([len(shard) for shard in shards], dtype=np.int64)
    usable = np.maximum(lengths - seq_len, 0)  # window starts a shard can hold
    if usable.sum() == 0:
        raise ValueError(f"no train shard holds a window of {seq_len + 1} tokens")
    count = max(1, tokens // seq_len)
    # Evenly spaced positions over the concatenated start ranges, each mapped into its shard.
    positions = np.linspace(0, usable.sum() - 1, count).astype(np.int64)
    bounds = np.cumsum(usable)
    windows = []
    for position in positions:
        shard = int(np.searchsorted(bounds, position, side="right"))
        start = int(position - (bounds[shard] - usable[shard]))
        windows.append(np.asarray(shards[shard][start : start + seq_len + 1], dtype=np.int64))
    return torch.from_numpy(np.stack(windows))


GENERATED_SEED = 0  # generated calibration samples the same windows on every run of one device type


@torch.no_grad()
def generated_windows(model: nn.Module, count: int, seq_len: int, temperature: float, device,
                      batch: int = 64) -> torch.Tensor:
    """[count, seq_len + 1] int64 windows the model samples itself: each starts at BOS and draws every next
    token from softmax(logits / temperature) of the window so far (no cache: each step reruns the prefix, which
    the calibration sizes, ~100 windows of 1-2 k tokens, keep to about a minute on a GPU). Deterministic for a
    device type."""
    generator = torch.Generator(device).manual_seed(GENERATED_SEED)
    model.eval()
    windows = []
    for first in range(0, count, batch):
        tokens = torch.full((min(batch, count - first), 1), BOS_ID, dtype=torch.int64, device=device)
        for _ in range(seq_len):
            with torch.autocast("cuda", torch.bfloat16, enabled=torch.device(device).type == "cuda"):
                hidden = model.hidden(tokens)
            logits = model.logits_from_hidden(hidden[:, -1]).float()
            probabilities = torch.softmax(logits / temperature, dim=-1)
            tokens = torch.cat([tokens, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
        windows.append(tokens.cpu())
    return torch.cat(windows)


def calibration_batches(windows: torch.Tensor, device, batch_tokens: int = GPTQ_BATCH_TOKENS) -> list:
    """(input_ids, target_ids) pairs on `device`, at most `batch_tokens` tokens each."""
    seq_len = windows.size(1) - 1
    per_batch = max(1, batch_tokens // seq_len)
    return [(chunk[:, :-1].to(device), chunk[:, 1:].to(device)) for chunk in windows.split(per_batch)]


class HessianAccumulator:
    """Running H = sum x x^T / n over the rows x of every input it sees (float32, on the input's device)."""

    def __init__(self):
        self.sum = None
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.detach().reshape(-1, inputs.size(-1)).float()
        if self.sum is None:
            self.sum = torch.zeros(rows.size(1), rows.size(1), device=rows.device)
        with torch.autocast(rows.device.type, enabled=False):  # a forward under bf16 autocast still sums in fp32
            self.sum.addmm_(rows.T, rows)
        self.rows += rows.size(0)

    def hessian(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


@torch.no_grad()
def collect_hessians(
    model: nn.Module, linear_weights: list[str], batches: list, head_weight: str | None = None
):
    """H for each listed `<module>.weight` of a linear layer, from its inputs over `batches`; and for
    `head_weight` (a tied embedding used as the output head) from the final hidden states. Runs
    model.hidden(input_ids) once per batch."""
    modules = dict(model.named_modules())
    accumulators = {name: HessianAccumulator() for name in linear_weights}
    hooks = [
        modules[name.removesuffix(".weight")].register_forward_pre_hook(
            lambda module, args, acc=accumulators[name]: acc.add(args[0])
        )
        for name in linear_weights
    ]
    head = HessianAccumulator() if head_weight else None
    try:
        for input_ids, _ in batches:
            hidden = model.hidden(input_ids)
            if head is not None:
                head.add(hidden)
    finally:
        for hook in hooks:
            hook.remove()
    hessians = {name: acc.hessian() for name, acc in accumulators.items()}
    if head is not None:
        hessians[head_weight] = head.hessian()
    return hessians


def hessian_error(diff: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row output error d H d^T of weight errors `diff` [rows, cols]."""
    return ((diff @ hessian) * diff).sum(dim=1)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; more damping if H is not positive
    definite."""
    eye = torch.eye(hessian.size(0), device=hessian.device)
    mean_diag = hessian.diagonal().mean().clamp_min(1e-12)
    for extra in (1.0, 10.0, 100.0, 1000.0):
        try:
            factor = torch.linalg.cholesky(hessian + damp * extra * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("calibration Hessian is not positive definite even with heavy dampening")


def gptq_levels(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scales: torch.Tensor,
    qmin: int,
    qmax: int,
    damp: float = GPTQ_DAMP,
    block_size: int = GPTQ_BLOCK,
) -> torch.Tensor:
    """Integer levels [rows, cols] (int8) of `weight` for fixed per-row `scales`, by GPTQ with columns taken
    in order of decreasing H diagonal (act-order) and lazy block updates."""
    work = weight.detach().float().clone()
    hessian = hessian.float().clone()
    dead = hessian.diagonal() == 0  # inputs that were always zero: any value works, 0 compresses best
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    order = torch.argsort(hessian.diagonal(), descending=True)
    work, hessian = work[:, order], hessian[order][:, order]
    inverse = inverse_hessian_factor(hessian, damp)
    scales = scales.float()[:, None]
    levels = torch.zeros_like(work)
    cols = work.size(1)
    for first in range(0, cols, block_size):
        last = min(first + block_size, cols)
        block = work[:, first:last].clone()
        errors = torch.zeros_like(block)
        block_inverse = inverse[first:last, first:last]
        for col in range(last - first):
            column = block[:, col : col + 1]
            rounded = torch.clamp(torch.round(column / scales), qmin, qmax)
            levels[:, first + col : first + col + 1] = rounded
            error = (column - rounded * scales) / block_inverse[col, col]
            block[:, col:] -= error @ block_inverse[col : col + 1, col:]
            errors[:, col : col + 1] = error
        work[:, last:] -= errors @ inverse[first:last, last:]
    return levels[:, torch.argsort(order)].to(torch.int8)


@torch.no_grad()
def gptq_hessians(model: nn.Module, quantizer, schemes: dict, targets: list[str], batches: list,
                  progress=None) -> dict:
    """Sequential GPTQ calibration of the `targets` (names of integer-quantized tensors) of a GPT: for each group
    of layers in forward order (model.layout.forward_group), collect the Hessians of its inputs with every
    earlier group already quantized, then quantize the group (standard GPTQ). A block the forward runs several
    times gathers its inputs from every run. Fills quantizer.hessians (pgolf.plans.PlanQuantizer: reused when
    demotion re-quantizes a block at fewer bits) and returns them."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    tied_head = "tok_emb.weight" if model.lm_head is None else None
    layout = model.layout
    groups = sorted({layout.forward_group(name) for name in targets})
    for group in groups:
        names = [name for name in targets if layout.forward_group(name) == group]
        linear = [name for name in names if isinstance(modules.get(name.removesuffix(".weight")), nn.Linear)]
        head = tied_head if tied_head in names else None
        if linear or head:
            quantizer.hessians.update(collect_hessians(model, linear, batches, head))
        for name in names:
            params[name].copy_(quantizer.restored(name, schemes[name]).to(params[name].device))
        if progress:
            progress(f"gptq: group {group}/{len(layout.execution) + 1}: {len(names)} tensors quantized")
    return quantizer.hessians


def save_gptq_hessians(path: Path, hessians: dict[str, torch.Tensor], metadata: dict) -> None:
    """Hessians (fp32) and their provenance (`metadata`: JSON values) as safetensors."""
    blob = safetensors_bytes({name: h.float().contiguous() for name, h in hessians.items()},
                             metadata={"gptq": json.dumps(metadata, sort_keys=True)})
    atomic_write_bytes(Path(path), blob)


def load_gptq_hessians(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(Hessians, provenance) of a GPTQ_HESSIANS_FILE; InvalidInput naming the file when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("gptq", "null"))
            hessians = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidInput(f"{path}: not a readable Hessians file ({e})") from None
    if not isinstance(metadata, dict):
        raise InvalidInput(f"{path}: no gptq metadata (not written by pgolf train)")
    for name, hessian in hessians.items():
        if hessian.dim() != 2 or hessian.size(0) != hessian.size(1) or not torch.isfinite(hessian).all():
            raise InvalidInput(f"{path}: {name} is not a finite square matrix {tuple(hessian.shape)}")
    return hessians, metadata


def saved_hessians(hessians: dict[str, torch.Tensor], state: dict, targets: list[str], where: str) -> dict:
    """The saved Hessians of `targets`, checked against their weights' input widths (InvalidInput naming the
    first mismatch). The train stage saves one per linear layer and tied head; a target without one (a hash
    embedding table: no input to calibrate) is rounded without GPTQ, as sequential calibration does."""
    picked = {}
    for name in targets:
        if name not in hessians:
            continue
        columns = state[name].size(1)
        if tuple(hessians[name].shape) != (columns, columns):
            raise InvalidInput(f"{where}: the Hessian of {name} is {tuple(hessians[name].shape)}, its weight has "
                               f"{columns} input columns")
        picked[name] = hessians[name]
    return picked
