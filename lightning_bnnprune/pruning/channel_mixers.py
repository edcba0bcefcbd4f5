"""Layers that mix neighbouring channels with no per-channel parameter: while gated, they see the kept channels only.

ECA (Wang et al., "ECA-Net", CVPR 2020, eq. 4-5) weighs channel ``c`` by ``sigmoid(sum_j w_j y_{c+j})``,
a 1-D conv of ``k`` taps across the channels' spatial means ``y`` (timm's ``CecaModule``: with
circular padding). Nothing in it is per channel, so a cut leaves it as it is; but after the cut the
window of channel ``c`` runs over its *kept* neighbours. While gates are attached,
:func:`attach_kept_channels` makes such a layer run its own forward on the open channels only (the
closed ones pass as they are: only consumers that the same gates mask read them), so a closed gate
is exactly a removed channel. The gates get no gradient through this layer (which channels are open
is a discrete choice); they get theirs from the consumers.

For the trace, :mod:`.traceable` gives these layers a channel-wise form and :mod:`.tracing`
registers them as layers whose input channel ``c`` is output channel ``c``; :mod:`.groups` makes
them members of their channels' groups with nothing to cut.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["CHANNEL_MIXERS", "attach_kept_channels", "is_channel_mixer"]


def _mixers() -> Tuple[type, ...]:
    try:
        from timm.layers.eca import CecaModule, EcaModule
    except ImportError:  # pragma: no cover  (timm without ECA: nothing to gate)
        return ()
    return (EcaModule, CecaModule)


#: layer types that mix neighbouring channels with no per-channel parameter
CHANNEL_MIXERS: Tuple[type, ...] = _mixers()


def is_channel_mixer(m) -> bool:
    return bool(CHANNEL_MIXERS) and isinstance(m, CHANNEL_MIXERS)


def attach_kept_channels(layer: nn.Module, mask: Callable[[int], Tensor]) -> RemovableHandle:
    """Make ``layer`` compute its open channels (``mask(width) > 0`` for an input of ``width``
    channels) as it will once the closed ones are removed; returns the hook's handle
    (``handle.remove()`` restores the plain layer)."""

    def hook(module: nn.Module, args, output: Tensor) -> Tensor:
        x = args[0]
        kept = torch.nonzero(mask(x.shape[1]).detach() > 0).flatten().to(x.device)
        if kept.numel() == x.shape[1]:
            return output
        return output.index_copy(1, kept, module.forward(x.index_select(1, kept)))  # forward: no hook again

    return layer.register_forward_hook(hook)
