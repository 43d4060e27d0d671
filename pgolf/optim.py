"""Optimizers of the challenge's baseline: Muon for block matrices, Adam for embeddings, head and scalars.

Muon (https://kellerjordan.github.io/posts/muon/) replaces each matrix's Nesterov-momentum update by its
nearest semi-orthogonal matrix, found with 5 Newton-Schulz steps in bf16, scaled by sqrt(max(1, rows / cols)).
Matrices of the same shape are orthogonalized as one batch; under torch.distributed each rank does its share
and an all-reduce shares the results. Weight decay is decoupled (p *= 1 - lr * wd), as in the seeds.
"""

import torch
import torch.distributed as dist

from pgolf.model import GPT, param_groups

# Quintic Newton-Schulz coefficients of modded-nanogpt and the challenge's train_gpt.py.
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(grads: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize each matrix of a [batch, rows, cols] stack (bf16 result)."""
    a, b, c = NEWTON_SCHULZ_COEFFS
    x = grads.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = grads.size(-2) > grads.size(-1)
    if transposed:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> Newton-Schulz orthogonalization -> decoupled weight decay and update, per matrix.

    `orthogonalize` is zeropower_via_newtonschulz5 or a torch.compile'd version of it (compiled on CUDA).
    Momentum buffers are kept for every parameter on every rank, so rank 0 holds the whole optimizer state.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, weight_decay: float = 0.0,
                 nesterov: bool = True, orthogonalize=zeropower_via_newtonschulz5):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults)
        self.orthogonalize = orthogonalize

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params, rank, world_size)
        return loss

    def _step_group(self, group: dict, params: list, rank: int, world_size: int) -> None:
        momentum = group["momentum"]
        grads = [p.grad for p in params]
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = self._orthogonalized(params, grads, buffers, group, rank, world_size)
        lr, weight_decay = group["lr"], group["weight_decay"]
        if weight_decay > 0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        updates = [u if u.dtype == p.dtype else u.to(p.dtype) for u, p in zip(updates, params, strict=True)]
        torch._foreach_add_(params, updates, alpha=-lr)

    def _orthogonalized(self, params, grads, buffers, group, rank, world_size) -> list[torch.Tensor]:
        """Scaled Newton-Schulz updates (rounded to bf16, returned in fp32), one batch per matrix shape.

        Each batch's directions (Nesterov: grad + momentum * buffer) are written straight into one stacked
        tensor by multi-tensor kernels, and each batch's result is converted to fp32 in one kernel: no per-matrix
        copies (a profile of the 11-layer model showed the per-matrix stack and slice copies dominating the
        optimizer's GPU time). Under torch.distributed each rank orthogonalizes its share of each batch and
        an all-reduce of one flat bf16 buffer shares the results."""
        by_shape: dict[tuple, list[int]] = {}
        for index, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(index)
        updates: list[torch.Tensor | None] = [None] * len(params)
        flat = offsets = None
        if world_size > 1:
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            flat = torch.zeros(offsets[-1], device=params[0].device, dtype=torch.bfloat16)
        for shape, indices in by_shape.items():
            mine = indices[rank::world_size]
            if not mine:
                continue
            stacked = torch.empty((len(mine), *shape), device=grads[mine[0]].device, dtype=grads[mine[0]].dtype)
            rows = list(stacked.unbind(0))
            if group["nesterov"]:
                torch._foreach_copy_(rows, [grads[i] for i in mine])
                torch._foreach_add_(rows, [buffers[i] for i in mine], alpha=group["momentum"])
            else:
                torch._foreach_copy_(rows, [buffers[i] for i in mine])
            orthogonal = self.orthogonalize(stacked, group["backend_steps"])
            orthogonal = orthogonal * max(1.0, shape[0] / shape[1]) ** 0.5
            if flat is None:
                for i, row in zip(mine, orthogonal.float().unbind(0), strict=True):
                    updates[i] = row
            else:
                for i, row in zip(mine, orthogonal.unbind(0), strict=True):
                    flat[offsets[i] : offsets[i + 1]] = row.reshape(-1)
        if flat is not None:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat = flat.float()
            updates = [flat[offsets[i] : offsets[i + 1]].view_as(p) for i, p in enumerate(params)]
        return updates


def build_optimizers(model: GPT, config, fused: bool, orthogonalize=zeropower_via_newtonschulz5) -> list:
    """[Adam(embeddings), (Adam(head),) Muon(matrices), Adam(scalars)], each group holding its `base_lr`.

    `config` is a TrainConfig. Token embedding: tied_embed_lr when tied, else embed_lr; the bigram table
    shares the embedding group. Empty groups (e.g. a model with no scalars) get no optimizer.
    """
    groups = param_groups(model)
    embed_lr = config.tied_embed_lr if model.config.tie_embeddings else config.embed_lr
    adam_options = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused)

    def adam(params, lr):
        return torch.optim.Adam([{"params": params, "lr": lr, "base_lr": lr}], **adam_options)

    optimizers = [adam(groups["embed"], embed_lr)]
    if groups.get("head"):
        optimizers.append(adam(groups["head"], config.head_lr))
    if groups["matrix"]:
        muon = Muon(groups["matrix"], lr=config.matrix_lr, momentum=config.muon_momentum,
                    backend_steps=config.muon_backend_steps, weight_decay=config.muon_weight_decay,
                    orthogonalize=orthogonalize)
        for group in muon.param_groups:
            group["base_lr"] = config.matrix_lr
        optimizers.append(muon)
    if groups["scalar"]:
        optimizers.append(adam(groups["scalar"], config.scalar_lr))
    return optimizers
