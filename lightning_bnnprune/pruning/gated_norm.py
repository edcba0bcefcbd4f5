"""A layer norm over channels whose statistics cover the kept channels only, while gates are attached.

A layer norm over the channels (ConvNeXt's ``LayerNorm2d`` on NCHW maps, ``nn.LayerNorm`` on
channels-last features) mixes every channel into every output through its statistics (Ba et al.,
"Layer Normalization", 2016, eq. 4):

    y_c = (x_c - mu) / sqrt(sigma^2 + eps) * w_c + b_c,   mu = 1/C sum_c x_c,   sigma^2 = 1/C sum_c (x_c - mu)^2

Once channels are removed, ``mu`` and ``sigma^2`` run over the remaining ones. While gates are
attached (:mod:`.gates`), :func:`attach_channel_mask` makes the norm compute them over the channels
whose gate is open, ``mu = sum_c g_c x_c / sum_c g_c`` and likewise ``sigma^2``, so a closed gate is
exactly a removed channel; the removal then slices the norm's weight and bias
(:func:`~.slicing.slice_channels`). The closed channels' outputs are finite and reach only consumers
that the same gates mask, or channel-wise layers of closed channels.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["attach_channel_mask", "channel_axis", "is_channel_norm", "masked_layer_norm"]

# The layer norms whose forward this module re-computes, by the axis they normalise: timm's NCHW
# forms permute inside (dimension 1), torch's and timm's plain ones normalise the last dimension;
# timm's "Act" forms apply their drop and activation after the norm.
_CHANNELS_FIRST = {"LayerNorm2d", "LayerNorm2dFp32", "LayerNormExp2d", "LayerNormAct2d", "LayerNormAct2dFp32"}
_CHANNELS_LAST = {"LayerNorm", "LayerNormFp32", "LayerNormAct", "LayerNormActFp32"}


def is_channel_norm(m: nn.Module) -> bool:
    """A layer norm over one dimension, the channels, of a form known here (torch's or timm's):
    cut with its channels while the gates make its statistics cover the kept channels only."""
    kind = type(m)
    return (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1
            and kind.__name__ in _CHANNELS_FIRST | _CHANNELS_LAST
            and kind.__module__.split(".")[0] in ("torch", "timm"))


def channel_axis(norm: nn.LayerNorm) -> int:
    """The axis the norm normalises: 1 for timm's NCHW forms, the last one for a plain layer norm
    on channels-last features."""
    return 1 if type(norm).__name__ in _CHANNELS_FIRST else -1


def masked_layer_norm(x: Tensor, mask: Tensor, weight, bias, eps: float, axis: int) -> Tensor:
    """Layer norm of ``x`` along ``axis`` with mean and variance over the channels where ``mask``
    is 1 (``mask``: one value per channel, 0 or 1; the result is in float32)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    m = mask.float().view(shape)
    x = x.float()
    kept = m.sum().clamp_min(1.0)  # a group keeps at least one channel; never divide by zero
    mean = (x * m).sum(axis, keepdim=True) / kept
    var = ((x - mean).square() * m).sum(axis, keepdim=True) / kept
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float().view(shape)
    if bias is not None:
        y = y + bias.float().view(shape)
    return y


def attach_channel_mask(norm: nn.LayerNorm, mask: Callable[[], Tensor]) -> RemovableHandle:
    """Make ``norm``'s statistics cover the channels where ``mask()`` is 1; returns the hook's handle
    (``handle.remove()`` restores the plain norm). The module's parameters and state-dict keys stay
    the same."""
    axis = channel_axis(norm)

    def hook(module: nn.LayerNorm, args, output: Tensor) -> Tensor:
        x = args[0]
        y = masked_layer_norm(x, mask().to(x.device), module.weight, module.bias, module.eps, axis).to(output.dtype)
        if hasattr(module, "act"):  # timm's LayerNormAct forms: norm, drop, activation
            y = module.act(module.drop(y))
        return y

    return norm.register_forward_hook(hook)
