"""The input size a network actually sees: for tracing its channel groups, checking a removal and
counting MACs.

A timm model's ``pretrained_cfg["input_size"]`` is what it was *published* at (224x224 for most),
not what it is trained on here (32x32 CIFAR, digits...); MACs scale with the input's area, so the
size has to come from the data whenever there is data.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["input_size_of", "first_batch_size"]


def _shape_of(batch: Any) -> Optional[Tuple[int, ...]]:
    """``(C, H, W)`` of the first 4-D tensor in a batch (``x``, ``(x, y)``, ``{"image": x}``...)."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape[1:]) if batch.ndim == 4 else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        shape = _shape_of(item)
        if shape is not None:
            return shape
    return None


def first_batch_size(trainer: Any) -> Optional[Tuple[int, ...]]:
    """``(C, H, W)`` of the first training batch the trainer's fit will draw, or None.

    Reads one batch of the training dataloader (the datamodule's or the one given to ``fit``)
    inside :func:`torch.random.fork_rng`, so the run's random draws (shuffle, augmentation)
    are the same as if it had not looked.
    """
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is None or not source.is_defined():
        return None
    with torch.random.fork_rng(devices=[]):
        try:
            loader = source.dataloader()
            batch = next(iter(loader))
        except Exception:  # noqa: BLE001  (no data yet: the caller falls back)
            return None
    return _shape_of(batch)


def input_size_of(
    net: nn.Module,
    given: Optional[Sequence[int]] = None,
    pl_module: Any = None,
    trainer: Any = None,
) -> Tuple[int, ...]:
    """The ``(C, H, W)`` of one input of ``net``, from the first source that knows it:

    1. ``given`` (a callback's ``input_size=``);
    2. ``pl_module.example_input_array``;
    3. the first training batch of ``trainer`` (:func:`first_batch_size`);
    4. ``net.pretrained_cfg["input_size"]`` (timm), else ``(3, 224, 224)``.
    """
    if given is not None:
        return tuple(int(v) for v in given)
    example = getattr(pl_module, "example_input_array", None) if pl_module is not None else None
    if isinstance(example, torch.Tensor) and example.ndim == 4:
        return tuple(example.shape[1:])
    if trainer is not None:
        shape = first_batch_size(trainer)
        if shape is not None:
            return shape
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))
