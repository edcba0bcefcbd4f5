"""Seeded in-memory data for a few training steps: random images, or a learnable task."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["pattern_images", "random_images"]


def random_images(n: int = 8, batch_size: int = 4, seed: int = 0, size: int = 32, classes: int = 10) -> DataLoader:
    """``n`` random ``3 x size x size`` images and labels in ``[0, classes)``, drawn (images first)
    from one generator seeded with ``seed``; batches in order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def pattern_images(n: int = 32, batch_size: int = 16, seed: int = 0) -> DataLoader:
    """A learnable task: each of 10 classes is a fixed random image, seen through noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = patterns[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
