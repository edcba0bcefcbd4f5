"""A latency table of LCE's cost shape for tests: nothing is timed."""
from __future__ import annotations

import math

import timm
import torch

from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.latency_table import WORD, LatencyTable, binary_conv_sites

__all__ = ["engine_like_table"]

SIZE = 32


def engine_like_table(model: str = "test_resnet", float_ms: float = 0.05) -> LatencyTable:
    """A table of ``model``'s binary convs from LCE's cost shape (words x blocks x pixels), no timing."""
    import lightning_bnnprune.models  # noqa: F401  (the CIFAR models)

    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=10)
    binarize_model(net)
    x = torch.randn(1, 3, SIZE, SIZE)
    sites = binary_conv_sites(net, find_channel_groups(net, x), x)
    points = {}
    for s in sites:
        hw = [int(v) for v in s.geometry.split("-in")[1].split("x")]
        pixels = hw[0] * hw[1]
        counts_in = sorted({min(s.in_channels, WORD), s.in_channels, max(1, s.in_channels // 2)})
        counts_out = sorted({4, s.out_channels, max(4, s.out_channels // 2), 12})
        points[s.geometry] = {(i, o): 1e-5 * pixels * math.ceil(i / WORD) * math.ceil(o / 4) + 1e-6 * (i + o)
                              for i in counts_in for o in counts_out}
    return LatencyTable(points, float_ms=float_ms)
