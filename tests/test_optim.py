"""pgolf.optim: Muon (Newton-Schulz batches, the update with decoupled decay) and the optimizer groups at the
baseline's rates."""

import math

import pytest
import torch

from pgolf.model import GPT, ModelConfig, param_groups
from pgolf.optim import Muon, build_optimizers, zeropower_via_newtonschulz5
from pgolf.train_config import TrainConfig


def test_newton_schulz_batches_match_one_matrix_at_a_time_and_orthogonalize():
    torch.manual_seed(0)
    stack = torch.randn(3, 64, 32)
    batched = zeropower_via_newtonschulz5(stack, steps=5)
    for matrix, result in zip(stack, batched, strict=True):
        assert torch.equal(zeropower_via_newtonschulz5(matrix[None], steps=5)[0], result)
    assert batched.dtype == torch.bfloat16 and batched.shape == stack.shape
    # The quintic iteration pushes every singular value into roughly [0.7, 1.2] (not exactly 1, by design).
    singular = torch.linalg.svdvals(batched.float())
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert torch.linalg.svdvals(stack).max() / torch.linalg.svdvals(stack).min() > 3


def test_muon_step_is_nesterov_momentum_then_scaled_orthogonal_update_with_decoupled_decay():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 16))
    start = weight.detach().clone()
    grads = [torch.randn(48, 16) for _ in range(2)]
    lr, momentum, decay = 0.05, 0.9, 0.1
    muon = Muon([weight], lr=lr, momentum=momentum, weight_decay=decay)
    expected, buffer = start.clone(), torch.zeros_like(start)
    for grad in grads:
        weight.grad = grad.clone()
        muon.step()
        buffer = momentum * buffer + grad
        # Scaled in bf16 (as Muon does), then applied in the parameter's dtype.
        orthogonal = zeropower_via_newtonschulz5((grad + momentum * buffer)[None])[0]
        update = (orthogonal * math.sqrt(48 / 16)).float()
        expected = expected * (1 - lr * decay) - lr * update
    assert torch.allclose(weight.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_equals_one_matrix_at_a_time_bit_for_bit(nesterov):
    """Same-shape matrices share one stacked Newton-Schulz batch; the result must not depend on that."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (48, 16), (32, 32), (48, 16)]
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in shapes]
    expected = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in expected]
    lr, momentum, decay = 0.05, 0.9, 0.1
    muon = Muon(params, lr=lr, momentum=momentum, weight_decay=decay, nesterov=nesterov)
    for _ in range(3):
        grads = [torch.randn(*shape) for shape in shapes]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad.clone()
        muon.step()
        for i, (grad, (rows, cols)) in enumerate(zip(grads, shapes, strict=True)):
            buffers[i] = buffers[i] * momentum + grad
            direction = torch.add(grad, buffers[i], alpha=momentum) if nesterov else buffers[i]
            update = zeropower_via_newtonschulz5(direction[None])[0] * max(1.0, rows / cols) ** 0.5
            expected[i] = torch.add(expected[i] * (1 - lr * decay), update.float(), alpha=-lr)
    for param, want in zip(params, expected, strict=True):
        assert torch.equal(param.detach(), want)


def test_optimizer_groups_cover_every_parameter_once_with_the_baselines_rates():
    model = GPT(ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2))
    optimizers = build_optimizers(model, TrainConfig(), fused=False)
    seen = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    adam_embed, muon, adam_scalar = optimizers
    assert isinstance(muon, Muon) and muon.param_groups[0]["lr"] == 0.04 == muon.param_groups[0]["base_lr"]
    assert muon.param_groups[0]["params"] == param_groups(model)["matrix"]
    assert adam_embed.param_groups[0]["lr"] == 0.05 and adam_scalar.param_groups[0]["lr"] == 0.04
    assert adam_embed.param_groups[0]["betas"] == (0.9, 0.95) and adam_embed.param_groups[0]["eps"] == 1e-8
    untied = GPT(ModelConfig(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2, tie_embeddings=False))
    rates = [opt.param_groups[0]["lr"] for opt in build_optimizers(untied, TrainConfig(), fused=False)]
    assert rates == [0.6, 0.008, 0.04, 0.04]
