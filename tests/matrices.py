"""Test matrices shaped like trained weights."""

import torch


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Heavy-tailed rows of different widths, like trained weights (outliers in most rows)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cols, generator=generator)
    noise /= torch.rand(rows, cols, generator=generator).add(0.05).sqrt()
    return noise * torch.linspace(0.02, 2.0, rows)[:, None]
