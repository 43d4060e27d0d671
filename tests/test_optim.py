"""pgolf.optim: Muon (Newton-Schulz batches, the update with decoupled decay) and the optimizer groups at the
baseline's rates; the 04-16 record's MuonEq-R row normalization, Polar Express coefficients and AdamW groups."""

import math

import pytest
import torch

from pgolf.model import GPT, ModelConfig, param_groups
from pgolf.optim import (
    ORTHOGONALIZERS,
    Muon,
    build_optimizers,
    row_normalized,
    zeropower_via_newtonschulz5,
    zeropower_via_polar_express,
)
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


# ---- the 04-16 record's variants: MuonEq-R, Polar Express, AdamW groups ----------------------------------------


def test_row_normalization_divides_each_row_by_its_l2_norm():
    # Rows (3, 4) and (0, -2) have norms 5 and 2; a zero row stays zero (its norm is floored, not divided by 0).
    first = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    second = torch.tensor([[1.0, 0.0], [-5.0, 12.0], [8.0, 6.0]])
    expected = torch.stack([torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]]),
                            torch.tensor([[1.0, 0.0], [-5 / 13, 12 / 13], [0.8, 0.6]])])
    result = row_normalized(torch.stack([first, second]))
    assert torch.allclose(result, expected, rtol=0, atol=1e-7)
    assert torch.isfinite(result).all()


def test_muon_with_row_normalize_orthogonalizes_the_row_normalized_nesterov_update():
    torch.manual_seed(0)
    # Rows of very different scales: without MuonEq-R the large rows dominate the orthogonalized update.
    grad = torch.randn(32, 16) * torch.logspace(-2, 1, 32)[:, None]
    lr, momentum = 0.05, 0.9
    results = {}
    for row_normalize in (False, True):
        weight = torch.nn.Parameter(torch.zeros(32, 16))
        muon = Muon([weight], lr=lr, momentum=momentum, row_normalize=row_normalize)
        weight.grad = grad.clone()
        muon.step()
        results[row_normalize] = weight.detach().clone()
    direction = grad + momentum * grad  # Nesterov on the first step: grad + momentum * (momentum buffer = grad)
    by_hand = direction / torch.sqrt((direction**2).sum(dim=1, keepdim=True))
    update = zeropower_via_newtonschulz5(by_hand[None])[0] * math.sqrt(32 / 16)
    assert torch.allclose(results[True], -lr * update.float(), atol=1e-6)
    assert not torch.allclose(results[False], results[True], atol=1e-3)


def polar_distance(orthogonalized: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """||X - U V^T||_F / ||U V^T||_F per matrix, U V^T the exact polar factor (float64 SVD)."""
    u, _, vh = torch.linalg.svd(matrices.double(), full_matrices=False)
    polar = u @ vh
    return (orthogonalized.double() - polar).norm(dim=(-2, -1)) / polar.norm(dim=(-2, -1))


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (128, 128)])
def test_polar_express_orthogonalizes_at_least_as_well_as_the_standard_coefficients_in_5_steps(shape):
    torch.manual_seed(0)
    matrices = torch.randn(4, *shape)
    standard = zeropower_via_newtonschulz5(matrices, steps=5)
    polar = zeropower_via_polar_express(matrices, steps=5)
    assert polar.dtype == torch.bfloat16 and polar.shape == matrices.shape
    assert (polar_distance(polar, matrices) <= polar_distance(standard, matrices)).all()
    # It was about half the standard's distance (0.09-0.11 vs 0.21-0.23) where this was written.
    assert polar_distance(polar, matrices).max() < 0.15
    if shape[0] != shape[1]:  # a square Gaussian matrix has singular values near 0 that 5 steps cannot lift
        singular = torch.linalg.svdvals(polar.float())
        assert singular.min() > 0.8 and singular.max() < 1.2
    with pytest.raises(ValueError, match="5 published steps"):
        zeropower_via_polar_express(matrices, steps=6)


def test_optimizers_follow_the_configs_orthogonalizer_and_row_normalization():
    model = GPT(ModelConfig(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2))
    default = next(opt for opt in build_optimizers(model, TrainConfig(), fused=False) if isinstance(opt, Muon))
    assert default.orthogonalize is zeropower_via_newtonschulz5 and not default.param_groups[0]["row_normalize"]
    record = TrainConfig(muon_ns_coefficients="polar-express", muon_row_normalize=True)
    muon = next(opt for opt in build_optimizers(model, record, fused=False) if isinstance(opt, Muon))
    assert muon.orthogonalize is ORTHOGONALIZERS["polar-express"] is zeropower_via_polar_express
    assert muon.param_groups[0]["row_normalize"]


def test_adamw_decay_reaches_exactly_the_embedding_and_scalar_groups():
    """With zero gradients Adam's update is 0, so each parameter moves only by its decoupled decay."""
    model = GPT(ModelConfig(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2, tie_embeddings=False,
                            bigram_buckets=16, bigram_dim=8))
    config = TrainConfig(embed_weight_decay=0.1, scalar_weight_decay=0.2)
    optimizers = build_optimizers(model, config, fused=False)
    embed, head, muon, scalar = optimizers
    assert type(embed) is torch.optim.AdamW and type(scalar) is torch.optim.AdamW
    assert type(head) is torch.optim.Adam and isinstance(muon, Muon)
    groups = param_groups(model)
    torch.manual_seed(0)
    with torch.no_grad():  # no zero-initialized tensor (head, projections, bigram table) hides a decay
        for p in model.parameters():
            p.normal_()
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        opt.step()
    shrink = {id(p): 1 - 0.6 * 0.1 for p in groups["embed"]} | {id(p): 1 - 0.04 * 0.2 for p in groups["scalar"]}
    assert len(groups["embed"]) == 2  # the token and bigram tables share the embedding group and its decay
    for name, p in model.named_parameters():
        expected = start[name] * shrink.get(id(p), 1.0)
        assert torch.allclose(p.detach(), expected, rtol=1e-6, atol=0), name
        assert torch.equal(p.detach(), start[name]) == (id(p) not in shrink), name
    untouched = {id(p) for p in groups["matrix"] + groups["head"]}
    assert untouched and not untouched & set(shrink)


def test_default_config_keeps_plain_adam_everywhere():
    model = GPT(ModelConfig(num_layers=1, model_dim=64, num_heads=4, num_kv_heads=2, tie_embeddings=False))
    adams = [opt for opt in build_optimizers(model, TrainConfig(), fused=False) if not isinstance(opt, Muon)]
    assert len(adams) == 3 and all(type(opt) is torch.optim.Adam for opt in adams)
