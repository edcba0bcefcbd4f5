"""Per-channel statistics of the data sets the library ships configs for.

Shared by the datamodules, which normalise with them (:mod:`~lightning_bnnprune.data`), and the
CIFAR networks' timm configs, which publish them (:mod:`~lightning_bnnprune.models.cifar`); kept
here so that a model does not import the data pipeline to know them.
"""
from __future__ import annotations

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD"]

# The CIFAR-10 training set's (std over all pixels, not the per-image std that some repositories
# copy around): the models' pretrained_cfg mean/std.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
