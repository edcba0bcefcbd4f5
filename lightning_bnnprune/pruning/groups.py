"""Channel groups: which channels must be kept or removed together.

A residual add ties the output channels of every conv that feeds it; a depthwise conv ties its
filters to its producer's; a concat maps a producer's channels to an offset inside each consumer.
Torch-Pruning's dependency graph finds these couplings by tracing the model once; this module turns
its groups into plain, picklable records keyed by module *names*, which both the learned gates
(:mod:`.gates`) and the physical removal (:mod:`.surgery`) use, so that a gate always means exactly
what the removal will do.

Every member of a group is one of:

- ``out``: output channels of a conv / linear layer (a *producer*), or of a depthwise conv;
- ``norm``: per-channel parameters and statistics of a batch norm;
- ``in``: input channels of a conv (``groups=1``) or linear layer (a *consumer*).

Groups that touch something a channel cannot be removed from exactly (a norm that normalises
*across* channels, a grouped conv, a weight-standardised full-precision conv, a layer with
per-channel parameters we do not know) are not prunable; the reason names the layer.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import nn

from ..binarize import classifier_names
from ..layers import BinaryConv2d

__all__ = ["Member", "ChannelGroup", "GroupAnalysis", "find_channel_groups", "example_input_for"]

OUT, NORM, IN = "out", "norm", "in"


@dataclass(frozen=True)
class Member:
    """One module's share of a group: its channel ``idxs`` along ``role``'s dimension, and for
    each of them the group channel (``root_idxs``) it belongs to."""

    module: str
    role: str
    idxs: Tuple[int, ...]
    root_idxs: Tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels decided together: ``size`` group channels, owned by the binary conv ``name``."""

    name: str
    size: int
    members: Tuple[Member, ...]

    def modules(self, role: str) -> List[str]:
        return [m.module for m in self.members if m.role == role]

    @property
    def producers(self) -> List[str]:
        return self.modules(OUT)

    @property
    def consumers(self) -> List[str]:
        return self.modules(IN)


@dataclass
class GroupAnalysis:
    """The prunable groups of a model, in forward order, and why the others are not prunable."""

    groups: List[ChannelGroup]
    refused: Dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> ChannelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no prunable group {name!r}; prunable: {', '.join(self.names) or '(none)'}")

    @property
    def names(self) -> List[str]:
        return [g.name for g in self.groups]

    @property
    def num_filters(self) -> int:
        return sum(g.size for g in self.groups)


def example_input_for(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A one-sample input: ``input_size`` if given, else the model's timm ``pretrained_cfg``."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    device = next(model.parameters()).device
    return torch.randn(1, *input_size, device=device)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _classify(module: nn.Module, handler_name: str) -> Tuple[Optional[str], str]:
    """``(role, "")`` for a member we can remove channels from exactly, else ``(None, reason)``."""
    is_out = handler_name.endswith("out_channels")
    if isinstance(module, nn.Conv2d):
        if _is_depthwise(module):
            return OUT, ""
        if module.groups > 1:
            return None, f"grouped conv (groups={module.groups})"
        if is_out:
            return OUT, ""
        if not isinstance(module, BinaryConv2d) and "Std" in type(module).__name__:
            return None, f"weight-standardised conv {type(module).__name__} standardises over input channels"
        return IN, ""
    if isinstance(module, nn.Linear):
        return (OUT if is_out else IN), ""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NORM, ""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return None, f"{type(module).__name__} normalises across channels"
    if isinstance(module, nn.Parameter):
        return None, "a free per-channel parameter"
    return None, f"{type(module).__name__} has per-channel parameters this library cannot slice"


def find_channel_groups(
    model: nn.Module,
    example_inputs: Optional[torch.Tensor] = None,
    exclude: Iterable[str] = (),
) -> GroupAnalysis:
    """Trace ``model`` and return its channel groups.

    A group is prunable when one of its producers is a :class:`BinaryConv2d` and every member is
    a module whose channels can be cut exactly. The group is named after its first binary
    producer, which owns the group's gate. The classifier's outputs are never pruned.

    Args:
        model: the (binarised) network, in any mode; it is traced once in eval mode.
        example_inputs: one input batch; default from :func:`example_input_for`.
        exclude: names of binary convs whose groups must stay whole.
    """
    example_inputs = example_input_for(model) if example_inputs is None else example_inputs
    names = {id(m): n for n, m in model.named_modules()}
    classifier = [model.get_submodule(n) for n in classifier_names(model)]
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unwrapped-parameter notices: such groups are refused below
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        tp_groups = list(graph.get_all_groups(ignored_layers=classifier, root_module_types=[nn.Conv2d, nn.Linear]))
    model.train(was_training)

    order = {n: i for i, n in enumerate(names.values())}
    excluded = set(exclude)
    analysis = GroupAnalysis(groups=[])
    for tp_group in tp_groups:
        members: Dict[Tuple[str, str], Member] = {}
        reason = ""
        for item in tp_group:
            module = item.dep.target.module
            if id(module) not in names and not isinstance(module, nn.Parameter):
                continue  # Torch-Pruning's stand-ins for element-wise ops, reshapes, concats
            role, why = _classify(module, item.dep.handler.__name__)
            label = names.get(id(module), "<parameter>")
            if role is None:
                reason = reason or f"{label}: {why}"
                continue
            root_idxs = tuple(int(r) for r in item.root_idxs)
            idxs = tuple(int(i) for i in item.idxs)
            key = (label, role)
            if key in members:  # the same module reached twice (e.g. a depthwise conv's in and out)
                continue
            members[key] = Member(label, role, idxs, root_idxs)
        binary_producers = sorted(
            (m.module for m in members.values()
             if m.role == OUT and isinstance(model.get_submodule(m.module), BinaryConv2d)
             and not _is_depthwise(model.get_submodule(m.module))),
            key=order.get,
        )
        if not binary_producers:
            continue  # nothing binary to prune here (e.g. full-precision stems and heads)
        name = binary_producers[0]
        if reason:
            analysis.refused[name] = reason
            continue
        if excluded & set(binary_producers):
            analysis.refused[name] = "excluded by the user"
            continue
        size = 1 + max(r for m in members.values() for r in m.root_idxs)
        ordered = sorted(members.values(), key=lambda m: (order.get(m.module, 0), m.role))
        analysis.groups.append(ChannelGroup(name=name, size=size, members=tuple(ordered)))
    analysis.groups.sort(key=lambda g: order[g.name])
    return analysis
