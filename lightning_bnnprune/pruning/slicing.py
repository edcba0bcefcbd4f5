"""Cutting channels out of a layer's tensors, in place: the one operation every removal is made of.

``"out"`` is a layer's output side (a conv's or linear layer's filters, a norm's channels, all the
channels of a depthwise conv), ``"in"`` its input side, and ``"param:<name>"`` one free per-channel
parameter of a module (a layer scale's ``gamma``: :func:`param_dim`). The physical removal
(:mod:`.surgery`) and the replay of a saved record (:mod:`.rebuild`) both cut through
:func:`slice_channels`, and the channel groups (:mod:`.groups`) count through
:func:`channel_count`, so the three agree on what a channel of a layer is.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from .block_sizes import cut_position, position_count, position_rule
from .gated_norm import is_channel_norm

__all__ = [
    "OUT", "IN", "channel_count", "is_blur_pool", "is_channel_multiplier", "is_channel_norm", "is_depthwise",
    "is_grouped", "is_param_dim", "param_dim", "per_channel_axis", "slice_channels",
]

OUT, IN = "out", "in"
_PARAM = "param:"


def param_dim(attr: str) -> str:
    """The ``dim`` that names a module's own free per-channel parameter ``attr``.

    >>> param_dim("gamma")
    'param:gamma'
    """
    return _PARAM + attr


def is_param_dim(dim: str) -> bool:
    """Whether ``dim`` names a free parameter (:func:`param_dim`)."""
    return dim.startswith(_PARAM)


def per_channel_axis(t: Tensor) -> int:
    """The channel axis of a per-channel tensor (``[C]``, ``[C, 1, 1]``, ``[1, C, 1, 1]``): its only
    axis longer than 1 (0 when none is); -1 when several are (not a per-channel tensor)."""
    axes = [i for i, s in enumerate(t.shape) if s > 1]
    return axes[0] if len(axes) == 1 else (0 if not axes else -1)


def is_depthwise(m: nn.Module) -> bool:
    """A conv with one filter per input channel (``groups == in == out``): its channels are cut
    on both sides at once."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_channel_multiplier(m: nn.Module) -> bool:
    """A depthwise conv with a channel multiplier ``k > 1`` (``groups == in``, ``out == k * in``;
    FastViT's patch embedding): input channel ``c`` makes output channels ``c*k ... c*k + k-1``
    alone, so they are cut together, a whole conv group at a time, from the output side."""
    return (isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels < m.out_channels
            and m.out_channels % m.groups == 0)


def is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise (nor a channel multiplier): each of its conv groups
    must keep as many channels."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m) and not is_channel_multiplier(m)


def is_blur_pool(m: nn.Module) -> bool:
    """timm's ``BlurPool2d`` (resnetblur, resnetaa): a per-channel buffer ``filt`` and a
    ``channels`` count."""
    return type(m).__name__ == "BlurPool2d" and isinstance(getattr(m, "filt", None), Tensor) and m.channels is not None


def _set_param(module: nn.Module, name: str, dim: int, idx: Tensor) -> None:
    old = getattr(module, name, None)
    if old is None:
        return
    new = old.detach().index_select(dim, idx.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)  # a registered buffer stays registered


def _equal_per_group(conv: nn.Conv2d, idx: Tensor, size: int) -> bool:
    return len(set(torch.bincount(idx // (size // conv.groups), minlength=conv.groups).tolist())) == 1


def _check_balanced(conv: nn.Conv2d, dim: str, idx: Tensor, size: int) -> None:
    """A grouped conv stays a grouped conv only if each of its conv groups keeps as many channels."""
    per_group = torch.bincount(idx // (size // conv.groups), minlength=conv.groups)
    if len(set(per_group.tolist())) != 1:
        raise ValueError(
            f"a grouped conv (groups={conv.groups}) must keep the same number of {dim}put channels in every "
            f"conv group; these keep {per_group.tolist()}"
        )


def _cut_grouped_inputs(conv: nn.Conv2d, idx: Tensor, size: int) -> None:
    """Keep input channels ``idx`` of a grouped conv: each conv group's filters keep the inputs of
    their own group that survive (a gather, since groups may keep different positions)."""
    g, width = conv.groups, size // conv.groups
    local = (idx % width).view(g, -1)  # idx is sorted and balanced: row j is conv group j's kept inputs
    w = conv.weight.detach()
    w = w.view(g, w.shape[0] // g, width, *w.shape[2:])
    index = local.to(w.device).view(g, 1, -1, *([1] * (w.dim() - 3))).expand(-1, w.shape[1], -1, *w.shape[3:])
    new = w.gather(2, index).reshape(-1, local.shape[1], *w.shape[3:]).clone()
    conv.weight = nn.Parameter(new, requires_grad=conv.weight.requires_grad)


def _cut_conv_groups(conv: nn.Conv2d, dim: str, keep: Sequence[int]) -> None:
    """Keep output channels ``keep`` of a channel multiplier, whole conv groups: the groups and
    their input channels go with them."""
    k = conv.out_channels // conv.groups
    groups = sorted({i // k for i in keep})
    if dim != OUT or len(keep) != k * len(groups):
        raise ValueError(f"a depthwise conv with channel multiplier {k} is cut by whole conv groups of {k} output "
                         f"channels (dim 'out'), got dim {dim!r} keeping {len(keep)} outputs of {len(groups)} groups")
    idx = torch.tensor(keep, dtype=torch.long)
    _set_param(conv, "weight", 0, idx)
    _set_param(conv, "bias", 0, idx)
    conv.out_channels, conv.in_channels, conv.groups = len(keep), len(groups), len(groups)


def _param_of(module: nn.Module, dim: str) -> Tuple[str, Tensor, int]:
    attr = dim[len(_PARAM):]
    t = getattr(module, attr, None)
    if not isinstance(t, Tensor):
        raise ValueError(f"{type(module).__name__} has no parameter {attr!r} (dim {dim!r})")
    axis = per_channel_axis(t)
    if axis < 0:
        raise ValueError(f"{type(module).__name__}.{attr} of shape {list(t.shape)} is not a per-channel parameter")
    return attr, t, axis


def channel_count(module: nn.Module, dim: str) -> int:
    """How many channels ``module`` has along ``dim``."""
    if dim.startswith(_PARAM):
        _, t, axis = _param_of(module, dim)
        return t.shape[axis]
    if isinstance(module, nn.Conv2d):
        return module.out_channels if dim == OUT or is_depthwise(module) else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if dim == OUT else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if is_blur_pool(module):
        return module.filt.shape[0]
    if is_channel_norm(module):
        return module.normalized_shape[0]
    if position_rule(module) is not None:
        return position_count(module)
    raise TypeError(f"cannot count channels of {type(module).__name__}")


def slice_channels(module: nn.Module, dim: str, keep: Sequence[int]) -> None:
    """Keep only channels ``keep`` of ``module`` along ``dim`` (``"out"``, ``"in"`` or a
    :func:`param_dim`), in place.

    Handles ``nn.Conv2d`` (and :class:`BinaryConv2d`; a depthwise conv loses the same channels on
    both sides and its ``groups``; a grouped conv keeps its ``groups`` and must keep the same number
    of channels in each conv group), ``nn.Linear`` and every batch norm (timm's ``BatchNormAct2d``
    included): weight, bias, running mean and variance; timm's ``BlurPool2d``: its per-channel
    filter buffer; a layer norm over the channels (:func:`is_channel_norm`): weight, bias and
    ``normalized_shape``; a ``param_dim(name)``: that parameter along its channel axis; a block with a
    :class:`~.block_sizes.PositionRule`: its cut position, with its layer's output channels.

    Raises:
        ValueError: on a bad ``dim``, an index out of range or a grouped conv's conv groups kept
            unequally; TypeError: on another module type.
    """
    if dim not in (OUT, IN) and not dim.startswith(_PARAM):
        raise ValueError(f"dim must be 'out', 'in' or 'param:<name>', got {dim!r}")
    size = channel_count(module, dim)
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= size:
        raise ValueError(f"kept channels {keep[:3]}...{keep[-3:]} out of range for {size} channels")
    idx = torch.tensor(keep, dtype=torch.long)
    n = len(keep)
    if dim.startswith(_PARAM):  # a free per-channel parameter (a layer scale): cut along its channel axis
        attr, _, axis = _param_of(module, dim)
        _set_param(module, attr, axis, idx)
    elif is_channel_multiplier(module) and not (dim == OUT and _equal_per_group(module, idx, size)):
        # (a grouped conv whose inputs were cut to one per conv group has the same shape: it keeps
        # its groups and an equal count of outputs in each, the grouped-conv cut below)
        _cut_conv_groups(module, dim, keep)
    elif isinstance(module, nn.Conv2d):
        depthwise = is_depthwise(module)
        if module.groups > 1 and not depthwise:
            _check_balanced(module, dim, idx, size)
        if dim == OUT or depthwise:
            _set_param(module, "weight", 0, idx)
            _set_param(module, "bias", 0, idx)
            module.out_channels = n
            if depthwise:
                module.in_channels = module.groups = n
        elif module.groups > 1:
            _cut_grouped_inputs(module, idx, size)
            module.in_channels = n
        else:
            _set_param(module, "weight", 1, idx)
            module.in_channels = n
    elif isinstance(module, nn.Linear):
        if dim == OUT:
            _set_param(module, "weight", 0, idx)
            _set_param(module, "bias", 0, idx)
            module.out_features = n
        else:
            _set_param(module, "weight", 1, idx)
            module.in_features = n
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _set_param(module, name, 0, idx)
        module.num_features = n
    elif is_blur_pool(module):  # timm's anti-aliasing: the same fixed filter for every channel
        _set_param(module, "filt", 0, idx)
        module.channels = n
    elif is_channel_norm(module):  # exact because the gates made its statistics cover the kept channels
        _set_param(module, "weight", 0, idx)
        _set_param(module, "bias", 0, idx)
        module.normalized_shape = (n,)
    elif position_rule(module) is not None:  # a block's cut position in its layer's output (DPN)
        cut_position(module, keep)
    else:  # groups.py never makes such a member prunable; a hand-written record might
        raise TypeError(f"cannot slice channels of {type(module).__name__}")
