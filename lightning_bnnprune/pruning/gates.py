"""Per-filter gates: the subsidiary component of Xu et al., "Main/Subsidiary Network" (CVPR 2019).

One real parameter ``m_k`` per channel of a :class:`~.groups.ChannelGroup`, used through the
gate ``g_k = (sign(m_k) + 1) / 2`` in ``{0, 1}`` with a clipped straight-through gradient. The
gate module is a child of the group's owner conv, so it is saved, loaded and
moved with the model's weights.

Where the gate acts: on every *consumer* of the group's channels (the next convs' and linear
layers' input channels, after their binarisation), not on the producer's output. A closed gate then
contributes exactly what a removed channel contributes: nothing. (Zeroing the producer's output
would not: a batch norm turns 0 into a constant, and ``sign(0) = +1``.) This is what makes the
gated network and the physically pruned one compute the same logits. A layer norm over the
group's channels (ConvNeXt) gets the gate too: its mean and variance cover the open channels only
(:mod:`.gated_norm`), as they will once the closed ones are removed; a layer that mixes
neighbouring channels (ECA) runs on the open channels only (:mod:`.channel_mixers`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..layers import BinaryConv2d
from ..quantizers import ste_sign
from .channel_mixers import attach_kept_channels, is_channel_mixer
from .gated_norm import attach_channel_mask
from .groups import MIXER, NORM, ChannelGroup, GroupAnalysis
from .slicing import IN, is_channel_norm

__all__ = ["FilterGate", "attach_gates", "detach_gates", "gates_of", "is_gate_key", "GATE_ATTR"]

GATE_ATTR = "filter_gate"  # the owner conv's attribute: state-dict keys "<owner>.filter_gate.logits"
_HOOK_ATTR = "_bnnprune_gate_hook"


class FilterGate(nn.Module):
    r"""Learnable 0/1 gate over ``size`` channels.

    forward: :math:`g = (\mathrm{sign}(m) + 1) / 2` (``sign(0) = +1``, so ``m = 0`` is open);
    gradient: :math:`\partial g / \partial m = \tfrac12 1_{|m| \le 1}` (clipped STE).

    Args:
        size: number of channels.
        init: initial value of every ``m_k``; the paper initialises near zero (open).
    """

    def __init__(self, size: int, init: float = 0.0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((size,), float(init)))

    def forward(self) -> Tensor:
        return (ste_sign(self.logits) + 1.0) / 2.0

    @torch.no_grad()
    def mask(self) -> Tensor:
        """The current 0/1 gate, detached."""
        return (self.logits >= 0).to(self.logits.dtype)

    @torch.no_grad()
    def set_mask(self, keep: Tensor, margin: float = 0.5) -> None:
        """Set the gate to a given 0/1 ``keep`` vector (``+margin`` open, ``-margin`` closed)."""
        keep = torch.as_tensor(keep, device=self.logits.device).bool().flatten()
        if keep.numel() != self.logits.numel():
            raise ValueError(f"keep has {keep.numel()} entries, the gate {self.logits.numel()}")
        self.logits.copy_(torch.where(keep, margin, -margin).to(self.logits.dtype))

    @property
    def num_open(self) -> int:
        return int((self.logits >= 0).sum())

    def extra_repr(self) -> str:
        return f"size={self.logits.numel()}"


def gates_of(model: nn.Module) -> Dict[str, FilterGate]:
    """``{owner conv name: gate}`` for every gate attached to ``model``, in module order."""
    return {
        name: getattr(m, GATE_ATTR)
        for name, m in model.named_modules()
        if isinstance(getattr(m, GATE_ATTR, None), FilterGate)
    }


def is_gate_key(key: str) -> bool:
    """Whether a state-dict key belongs to a gate (gates are not part of the network's weights).

    >>> is_gate_key("layer1.0.conv1.filter_gate.logits"), is_gate_key("layer1.0.conv1.weight")
    (True, False)
    """
    return f".{GATE_ATTR}." in f".{key}"


Entry = Tuple[FilterGate, Tensor, Tensor]  # gate, consumer channel idxs, group channel per idx


def _mask_fn(size: int, entries: List[Entry]) -> Callable[[], Tensor]:
    def mask() -> Tensor:
        out: Optional[Tensor] = None
        for gate, idxs, root_idxs in entries:
            g = gate()
            if out is None:
                out = torch.ones(size, dtype=g.dtype, device=g.device)
            out = out.index_put((idxs.to(g.device),), g[root_idxs.to(g.device)])
        return out

    return mask


def _pre_hook(mask: Callable[[], Tensor]):
    def hook(module: nn.Module, args):
        x = args[0]
        m = mask().to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2) if isinstance(module, nn.Conv2d) else (-1,)
        return (x * m.view(shape),) + tuple(args[1:])

    return hook


def attach_gates(model: nn.Module, analysis: GroupAnalysis, init: float = 0.0) -> Dict[str, FilterGate]:
    """Give each prunable group a :class:`FilterGate` and route it to the group's consumers.

    Idempotent per group: an owner that already carries a gate of the right size keeps it (so a
    model rebuilt for resume gets its gates' values back from the checkpoint).
    """
    gates: Dict[str, FilterGate] = {}
    for group in analysis.groups:
        owner = model.get_submodule(group.name)
        gate = getattr(owner, GATE_ATTR, None)
        if not isinstance(gate, FilterGate) or gate.logits.numel() != group.size:
            gate = FilterGate(group.size, init).to(owner.weight.device)
            setattr(owner, GATE_ATTR, gate)
        gates[group.name] = gate
    consumers: Dict[str, List[Entry]] = {}
    for group in analysis.groups:
        for member in group.members:
            if member.role in (IN, MIXER) or (member.role == NORM and is_channel_norm(model.get_submodule(member.module))):
                consumers.setdefault(member.module, []).append(
                    (gates[group.name], torch.tensor(member.idxs), torch.tensor(member.root_idxs))
                )
    for name, entries in consumers.items():
        module = model.get_submodule(name)
        _remove_hook(module)
        if is_channel_norm(module):  # statistics over the open channels, as after the removal
            mask = _mask_fn(module.normalized_shape[0], entries)
            setattr(module, _HOOK_ATTR, attach_channel_mask(module, mask))
            continue
        if is_channel_mixer(module):  # runs on the open channels, as after the removal (its width: the input's)
            setattr(module, _HOOK_ATTR, attach_kept_channels(module, lambda width, e=entries: _mask_fn(width, e)()))
            continue
        size = module.weight.shape[1] * (module.groups if isinstance(module, nn.Conv2d) else 1)
        mask = _mask_fn(size, entries)
        if isinstance(module, BinaryConv2d):
            module.set_input_mask(mask)  # after the input's binarisation, see BinaryConv2d
        else:
            setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_pre_hook(mask)))
    return gates


def _remove_hook(module: nn.Module) -> None:
    if isinstance(module, BinaryConv2d):
        module.set_input_mask(None)
    handle = module.__dict__.pop(_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()


def detach_gates(model: nn.Module) -> Dict[str, Tensor]:
    """Remove every gate and consumer mask from ``model``; return the final 0/1 masks by owner."""
    masks = {name: gate.mask().clone() for name, gate in gates_of(model).items()}
    for name, module in model.named_modules():
        _remove_hook(module)
        if isinstance(getattr(module, GATE_ATTR, None), FilterGate):
            delattr(module, GATE_ATTR)
    return masks
