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
- ``in``: input channels of a conv or linear layer (a *consumer*).

**Grouped convolutions** (``groups=g``, not depthwise) stay rectangular only if every one of their
``g`` conv groups loses the same number of channels: the weight is ``[out, in / g, kh, kw]``, so
each conv group's width shrinks and ``groups`` stays ``g``. A group of channels that feeds or
leaves a grouped conv therefore carries ``parts``: its channels split into equal *cells* (the conv
groups, refined where several grouped convs split them differently), and every selection of the
group keeps the same number of channels in each cell (:meth:`ChannelGroup.keep_top`). The gates
stay per channel (a channel is still the unit a criterion scores and a selector learns), only
the count per cell is fixed. Torch-Pruning prunes grouped convs more coarsely (the same positions
in every conv group, its ``ConvPruner.prune_in_channels``); balanced counts contain that choice and
leave each conv group its own best channels.

Groups that touch something a channel cannot be removed from exactly (a norm that normalises
*across* channels, a weight-standardised full-precision conv, a layer with per-channel parameters
we do not know, a split into sizes fixed in the model's code, a grouped conv that gets its channels
from several groups or has one channel per conv group) are not prunable; the reason names the layer.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch_pruning as tp
from torch import Tensor, nn

from ..introspect import classifier_names, example_batch
from ..layers import BinaryConv2d
from .slicing import IN, OUT, channel_count, is_depthwise, is_grouped

__all__ = [
    "Member", "ChannelGroup", "GroupAnalysis", "Coverage", "coverage", "find_channel_groups",
]

NORM = "norm"  # a member role beside slicing.OUT / slicing.IN: a norm, cut along its only dimension


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
    """Channels decided together: ``size`` group channels, owned by the binary conv ``name``.

    ``parts`` (empty unless the group feeds or leaves a grouped conv): the cell of each group
    channel; every cell must keep the same number of channels (see the module docstring).
    """

    name: str
    size: int
    members: Tuple[Member, ...]
    parts: Tuple[int, ...] = ()

    @property
    def num_parts(self) -> int:
        """Cells that keep equal counts (1: any count per group is fine)."""
        return 1 + max(self.parts) if self.parts else 1

    def min_keep(self, min_filters: int = 1) -> int:
        """The fewest channels the group can keep: ``min_filters``, rounded up to whole cells, at
        least one channel per cell (a conv group of width 0 does not exist)."""
        p = self.num_parts
        return min(self.size, p * max(1, math.ceil(min_filters / p)))

    def capacity(self, min_filters: int = 1) -> int:
        """The most channels the group can lose."""
        return max(0, self.size - self.min_keep(min_filters))

    def valid_count(self, num_pruned: int) -> bool:
        """Whether pruning ``num_pruned`` channels keeps the cells equal."""
        return num_pruned % self.num_parts == 0

    def keep_top(self, scores: Tensor, keep: int) -> Tensor:
        """Bool mask keeping the ``keep`` highest-scored channels, ``keep / num_parts`` per cell
        (ties: the lower index).

        Raises:
            ValueError: if ``keep`` is out of range or not a multiple of :attr:`num_parts`.
        """
        scores = torch.as_tensor(scores).detach().flatten().float().cpu()
        p = self.num_parts
        if not 0 <= keep <= self.size or keep % p:
            raise ValueError(f"group {self.name!r} can keep a multiple of {p} channels in [0, {self.size}], "
                             f"got {keep} (it feeds a grouped conv: every conv group keeps as many)")
        mask = torch.zeros(self.size, dtype=torch.bool)
        cells = torch.tensor(self.parts) if self.parts else torch.zeros(self.size, dtype=torch.long)
        for cell in range(p):
            idx = torch.nonzero(cells == cell).flatten()
            order = torch.sort(scores[idx], descending=True, stable=True).indices
            mask[idx[order[: keep // p]]] = True
        return mask

    def balance(self, keep: Tensor, scores: Tensor, min_filters: int = 1) -> Tensor:
        """``keep`` with closed channels reopened until every cell keeps as many as the fullest
        one and the group at least :meth:`min_keep` (highest ``scores`` reopen first)."""
        keep = torch.as_tensor(keep).detach().flatten().bool().cpu().clone()
        scores = torch.as_tensor(scores).detach().flatten().float().cpu()
        p = self.num_parts
        cells = torch.tensor(self.parts) if self.parts else torch.zeros(self.size, dtype=torch.long)
        per_cell = max(max(int(keep[cells == c].sum()) for c in range(p)), self.min_keep(min_filters) // p)
        for cell in range(p):
            idx = torch.nonzero((cells == cell) & ~keep).flatten()
            need = per_cell - int(keep[cells == cell].sum())
            if need > 0:
                keep[idx[torch.sort(scores[idx], descending=True, stable=True).indices[:need]]] = True
        return keep

    def is_balanced(self, keep: Tensor) -> bool:
        if not self.parts:
            return True
        cells = torch.tensor(self.parts)
        keep = torch.as_tensor(keep).flatten().bool().cpu()
        return len({int(keep[cells == c].sum()) for c in range(self.num_parts)}) == 1

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


def _classify(module: nn.Module, handler_name: str) -> Tuple[Optional[str], str]:
    """``(role, "")`` for a member we can remove channels from exactly, else ``(None, reason)``."""
    is_out = handler_name.endswith("out_channels")
    if isinstance(module, nn.Conv2d):
        if is_depthwise(module):
            return OUT, ""
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


def _partition(model: nn.Module, members: Sequence[Member], size: int) -> Tuple[Tuple[int, ...], str]:
    """``(parts, "")``: the cells of a group's channels that grouped convs require (``()`` when
    none does), else ``((), reason)``.

    A channel's label lists the conv group it falls in at every grouped member; channels with the
    same label form a cell. Equal removal per cell is equal removal per conv group when the cells
    are equally large, every conv group holds as many cells, and each grouped member takes all its
    channels from this group, one per group channel.
    """
    labels: Dict[int, Tuple[int, ...]] = {r: () for r in range(size)}
    grouped = [m for m in members if m.role in (OUT, IN) and is_grouped(model.get_submodule(m.module))]
    for k, member in enumerate(grouped):
        conv = model.get_submodule(member.module)
        channels = conv.out_channels if member.role == OUT else conv.in_channels
        where = f"{member.module}: grouped conv (groups={conv.groups})"
        if len(set(member.idxs)) != channels or len(set(member.root_idxs)) != len(member.idxs):
            return (), f"{where} takes its {'output' if member.role == OUT else 'input'} channels from several groups"
        width = channels // conv.groups
        if width == 1:
            return (), f"{where} has one {'output' if member.role == OUT else 'input'} channel per conv group"
        for i, r in zip(member.idxs, member.root_idxs):
            labels[r] = labels[r] + (k, i // width)
    if not grouped:
        return (), ""
    cells: Dict[Tuple[int, ...], int] = {}
    parts = tuple(cells.setdefault(labels[r], len(cells)) for r in range(size))
    counts = [parts.count(c) for c in range(len(cells))]
    per_conv_group = {(k, g): set() for k, member in enumerate(grouped)
                      for g in range(model.get_submodule(member.module).groups)}
    for label, cell in cells.items():
        for k, g in zip(label[0::2], label[1::2]):
            per_conv_group[(k, g)].add(cell)
    if len(set(counts)) != 1 or len({len(v) for v in per_conv_group.values()}) != 1:
        names = ", ".join(sorted({m.module for m in grouped}))
        return (), f"{names}: grouped convs split the channels into unequal conv groups"
    if counts[0] == 1:
        return (), f"{grouped[0].module}: grouped conv leaves one channel per conv group"
    return parts, ""


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
        example_inputs: one input batch; default :func:`~lightning_bnnprune.introspect.example_batch`
            (one sample at the model's published input size).
        exclude: names of binary convs whose groups must stay whole.
    """
    example_inputs = example_batch(model) if example_inputs is None else example_inputs
    names = {id(m): n for n, m in model.named_modules()}
    classifier = [model.get_submodule(n) for n in classifier_names(model)]
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unwrapped-parameter notices: such groups are refused below
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
            tp_groups = list(graph.get_all_groups(ignored_layers=classifier, root_module_types=[nn.Conv2d, nn.Linear]))
    except Exception as err:  # noqa: BLE001  Torch-Pruning's tracer: the network stays whole, saying why
        why = f"Torch-Pruning cannot trace the network ({type(err).__name__}: {err})".replace("\n", " ")
        return GroupAnalysis(groups=[], refused={"(network)": f"(network): {why[:300]}"})
    finally:
        model.train(was_training)

    order = {n: i for i, n in enumerate(names.values())}
    excluded = set(exclude)
    analysis = GroupAnalysis(groups=[])
    for tp_group in tp_groups:
        members: Dict[Tuple[str, str], Member] = {}
        reason = ""
        for item in tp_group:
            module = item.dep.target.module
            if isinstance(module, (tp.ops._SplitOp, tp.ops._UnbindOp)):
                # the sizes of a split live in the model's code (torch.split(x, self.splits)): a cut
                # channel would shift every later part
                source = names.get(id(item.dep.source.module), repr(module))
                reason = reason or f"{source}: its output is split into fixed sizes (torch.split / chunk)"
                continue
            if id(module) not in names and not isinstance(module, nn.Parameter):
                continue  # Torch-Pruning's stand-ins for element-wise ops, reshapes, concats
            role, why = _classify(module, item.dep.handler.__name__)
            label = names.get(id(module), "<parameter>")
            if role is None:
                reason = reason or f"{label}: {why}"
                continue
            if any(r is None for r in item.root_idxs):  # Torch-Pruning lost the channel mapping here
                reason = reason or f"{label}: channel mapping not traceable (a reshape or custom op)"
                continue
            root_idxs = tuple(int(r) for r in item.root_idxs)
            idxs = tuple(int(i) for i in item.idxs)
            key = (label, role)
            pairs = dict(zip(idxs, root_idxs))
            if key in members:  # the same module reached twice (a depthwise conv's in and out, a split)
                seen = dict(zip(members[key].idxs, members[key].root_idxs))
                if any(seen.get(i, r) != r for i, r in pairs.items()):
                    reason = reason or f"{label}: a channel reached through two paths as different group channels"
                    continue
                pairs = {**seen, **pairs}
            if max(pairs, default=-1) >= channel_count(module, IN if role == IN else OUT):
                reason = reason or f"{label}: channel indices past its channels (a split Torch-Pruning maps wrongly)"
                continue
            ordered_pairs = sorted(pairs.items())
            members[key] = Member(label, role, tuple(i for i, _ in ordered_pairs), tuple(r for _, r in ordered_pairs))
        binary_producers = sorted(
            (m.module for m in members.values()
             if m.role == OUT and isinstance(model.get_submodule(m.module), BinaryConv2d)
             and not is_depthwise(model.get_submodule(m.module))),
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
        partial = next((m.module for m in members.values() if len(set(m.root_idxs)) != size), None)
        if partial is not None:  # e.g. split attention: paths stacked, then summed channel by channel
            analysis.refused[name] = f"{partial}: reads only part of the group's channels (stacked or summed paths)"
            continue
        ordered = sorted(members.values(), key=lambda m: (order.get(m.module, 0), m.role))
        parts, why = _partition(model, ordered, size)
        if why:
            analysis.refused[name] = why
            continue
        analysis.groups.append(ChannelGroup(name=name, size=size, members=tuple(ordered), parts=parts))
    analysis.groups.sort(key=lambda g: order[g.name])
    return analysis


@dataclass(frozen=True)
class Coverage:
    """How much of a network's binary filters the prunable groups hold, and why the rest is refused.

    ``binary_filters``: output filters of every :class:`BinaryConv2d`; ``prunable_filters``: those
    in prunable groups (a group channel removes one filter of each of its binary producers);
    ``refused``: ``{reason: number of groups}``.
    """

    binary_filters: int
    prunable_filters: int
    refused: Dict[str, int]

    @property
    def share(self) -> float:
        return self.prunable_filters / max(self.binary_filters, 1)

    def reachable(self, target_pfr: float) -> float:
        """PFR over all binary filters when every prunable group loses ``target_pfr`` of its channels."""
        return target_pfr * self.share

    def note(self, target_pfr: float, tolerance: float = 0.01) -> Optional[str]:
        """One line when ``target_pfr`` falls short over all binary filters by more than ``tolerance``."""
        reached = self.reachable(target_pfr)
        if target_pfr - reached <= tolerance:
            return None
        why = "; ".join(f"{n} x {reason}" for reason, n in sorted(self.refused.items(), key=lambda kv: -kv[1]))
        return (f"target PFR {target_pfr:.1%} reaches only {reached:.1%} of all binary filters: the prunable groups "
                f"hold {self.share:.1%} of them ({self.prunable_filters}/{self.binary_filters}); refused groups: "
                f"{why or 'none (excluded layers)'}")


def coverage(model: nn.Module, analysis: GroupAnalysis) -> Coverage:
    """The :class:`Coverage` of ``analysis`` over ``model``'s binary filters."""
    binary = {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    prunable = {(m.module, i) for g in analysis.groups for m in g.members if m.role == OUT and m.module in binary
                for i in m.idxs}
    refused: Dict[str, int] = {}
    for reason in analysis.refused.values():
        why = reason.split(": ", 1)[-1]
        refused[why] = refused.get(why, 0) + 1
    return Coverage(sum(m.out_channels for m in binary.values()), len(prunable), refused)
