"""Optimizers of the challenge's baseline: Muon for block matrices, Adam for embeddings, head and scalars.

Muon (https://kellerjordan.github.io/posts/muon/) replaces each matrix's Nesterov-momentum update by its
nearest semi-orthogonal matrix, found with 5 Newton-Schulz steps in bf16, scaled by sqrt(max(1, rows / cols)).
Matrices of the same shape are orthogonalized as one batch; under torch.distributed each rank does its share
and an all-reduce shares the results. Weight decay is decoupled (p *= 1 - lr * wd), as in the seeds.

The 04-16 record's variants, each off by default: MuonEq-R (`row_normalize`: each row of the Nesterov update is
divided by its L2 norm before Newton-Schulz), the Polar Express coefficient schedule (ORTHOGONALIZERS), and AdamW
(decoupled weight decay) for the embedding and scalar groups. Unlike the 04-16 record's Muon, which rounds each
gradient to bf16 and keeps its momentum in bf16, this one keeps gradients and momentum in fp32 (the orthogonalization
runs in bf16 in both).
"""

import torch
import torch.distributed as dist

from pgolf.model import GPT, param_groups

# Quintic Newton-Schulz coefficients of modded-nanogpt and the challenge's train_gpt.py, the same every step.
NEWTON_SCHULZ_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco, Gower 2025, https://arxiv.org/abs/2505.16932): one optimal quintic per
# step, computed for 5 steps with safety factor 2e-2 and cushion 2, as published in KellerJordan/modded-nanogpt's
# train_gpt.py ("Computed for num_iters=5, safety_factor=2e-2, cushion=2"). The input is divided by
# (1 + 2e-2) x its Frobenius norm there, so its spectral norm is safely below 1 before the first, steepest step.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
ROW_NORM_FLOOR = 1e-7  # MuonEq-R: rows with a smaller L2 norm are divided by this instead (the record's clamp)


def _quintic_steps(x: torch.Tensor, coefficients) -> torch.Tensor:
    """x <- a x + (b X + c X^2) x with X = x x^T, one (a, b, c) per step, on the wide orientation of each matrix."""
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.mT if transposed else x


def zeropower_via_newtonschulz5(grads: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize each matrix of a [batch, rows, cols] stack (bf16 result)."""
    x = grads.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    return _quintic_steps(x, [NEWTON_SCHULZ_COEFFS] * steps)


def zeropower_via_polar_express(grads: torch.Tensor, steps: int = 5, eps: float = 1e-6) -> torch.Tensor:
    """Orthogonalize each matrix of a [batch, rows, cols] stack with the first `steps` (<= 5) Polar Express
    polynomials (bf16 result): closer to the polar factor than zeropower_via_newtonschulz5 in as many steps."""
    if not 1 <= steps <= len(POLAR_EXPRESS_COEFFS):
        raise ValueError(f"Polar Express has {len(POLAR_EXPRESS_COEFFS)} published steps, asked for {steps}")
    x = grads.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * POLAR_EXPRESS_SAFETY + eps)
    return _quintic_steps(x, POLAR_EXPRESS_COEFFS[:steps])


# TrainConfig.muon_ns_coefficients -> the orthogonalization Muon runs.
ORTHOGONALIZERS = {"standard": zeropower_via_newtonschulz5, "polar-express": zeropower_via_polar_express}


def row_normalized(updates: torch.Tensor) -> torch.Tensor:
    """MuonEq-R: each row of each matrix divided by its L2 norm (computed in fp32, floored at ROW_NORM_FLOOR)."""
    norms = updates.float().norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_FLOOR)
    return updates / norms.to(updates.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum -> (row normalization ->) Newton-Schulz orthogonalization -> decoupled weight decay and
    update, per matrix.

    `orthogonalize` is one of ORTHOGONALIZERS or a torch.compile'd version of it (compiled on CUDA).
    `row_normalize` is MuonEq-R (the 04-16 record): each matrix's update divided by its row L2 norms first.
    Momentum buffers are kept for every parameter on every rank, so rank 0 holds the whole optimizer state.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, weight_decay: float = 0.0,
                 nesterov: bool = True, row_normalize: bool = False, orthogonalize=zeropower_via_newtonschulz5):
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay,
                        nesterov=nesterov, row_normalize=row_normalize)
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
            if group.get("row_normalize", False):  # absent from groups saved before the option existed
                stacked = row_normalized(stacked)
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


def build_optimizers(model: GPT, config, fused: bool, orthogonalize=None) -> list:
    """[Adam(embeddings), (Adam(head),) Muon(matrices), Adam(scalars)], each group holding its `base_lr`.

    `config` is a TrainConfig. Token embedding: tied_embed_lr when tied, else embed_lr; the bigram and value-
    embedding tables share the embedding group. The embedding and scalar groups get AdamW (decoupled decay
    p *= 1 - lr * wd) when embed_weight_decay / scalar_weight_decay > 0; the untied head stays Adam.
    `orthogonalize` defaults to ORTHOGONALIZERS[config.muon_ns_coefficients]. Empty groups (e.g. a model with
    no scalars) get no optimizer.
    """
    groups = param_groups(model)
    embed_lr = config.tied_embed_lr if model.config.tie_embeddings else config.embed_lr
    adam_options = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=fused)

    def adam(params, lr, weight_decay=0.0):
        param_group = [{"params": params, "lr": lr, "base_lr": lr}]
        if weight_decay > 0:
            return torch.optim.AdamW(param_group, weight_decay=weight_decay, **adam_options)
        return torch.optim.Adam(param_group, **adam_options)

    optimizers = [adam(groups["embed"], embed_lr, config.embed_weight_decay)]
    if groups.get("head"):
        optimizers.append(adam(groups["head"], config.head_lr))
    if groups["matrix"]:
        muon = Muon(groups["matrix"], lr=config.matrix_lr, momentum=config.muon_momentum,
                    backend_steps=config.muon_backend_steps, weight_decay=config.muon_weight_decay,
                    row_normalize=config.muon_row_normalize,
                    orthogonalize=orthogonalize or ORTHOGONALIZERS[config.muon_ns_coefficients])
        for group in muon.param_groups:
            group["base_lr"] = config.matrix_lr
        optimizers.append(muon)
    if groups["scalar"]:
        optimizers.append(adam(groups["scalar"], config.scalar_lr, config.scalar_weight_decay))
    return optimizers
