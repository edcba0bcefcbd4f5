"""Channel groups: which channels must be kept or removed together.

A residual add ties the output channels of every conv that feeds it; a depthwise conv ties its
filters to its producer's; a concat maps a producer's channels to an offset inside each consumer.
Torch-Pruning's dependency graph finds these couplings by tracing the model once; this module turns
its groups into plain, picklable records keyed by module *names*, which both the learned gates
(:mod:`.gates`) and the physical removal (:mod:`.surgery`) use, so that a gate always means exactly
what the removal will do.

Every member of a group is one of:

- ``out``: output channels of a conv / linear layer (a *producer*), or of a depthwise conv;
- ``norm``: per-channel parameters and statistics of a batch norm, or of a layer norm over the
  channels (ConvNeXt), which computes its statistics over the open channels while gated
  (:mod:`.gated_norm`);
- ``mixer``: a layer that mixes across channels with nothing per channel to cut (ECA's 1-D conv),
  run on the open channels while gated (:mod:`.channel_mixers`);
- ``param:<name>``: a free per-channel parameter such as a layer scale's ``gamma``;
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

**Splits and summed paths.** The walk over the traced graph is :mod:`.tracing`'s (its own concat
and split index maps, from autograd). Root channels that meet in one channel (split attention's
radix paths summed, Res2Net's parts added to the previous part's output) become one *group
channel*, kept or removed together. A split at a position written in a block's code (Res2Net's
``self.width``, CSPNet's ``self.expand_chs // 2``) is exact when :mod:`.block_sizes` has a rule that
moves the position with the cut; a split into equal parts also needs equal counts per part, a cell
structure like a grouped conv's.

Groups that touch something a channel cannot be removed from exactly (a group norm, a layer norm
over channels and space or of an unknown form, a weight-standardised full-precision conv, a layer
with per-channel parameters we do not know, a split or slice at positions fixed in code without a
rule, a grouped conv that gets its channels from several groups or has one channel per conv
group) are not prunable; the reason names the layer.

The graph walk itself is in :mod:`.tracing` and the block rules in :mod:`.block_sizes`; a third of
this module is the per-module classification that names each refusal.
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
from .block_sizes import owner_of, position_owner
from .channel_mixers import is_channel_mixer
from .slicing import (IN, OUT, channel_count, is_channel_multiplier, is_channel_norm, is_depthwise, is_grouped,
                      is_param_dim, param_dim, per_channel_axis)
from .tracing import CHANNEL_DIM, FAN_OUT, BlurPool2d, ChannelFlow, closure, trace

__all__ = [
    "MIXER", "NORM", "Member", "ChannelGroup", "GroupAnalysis", "Coverage", "coverage", "find_channel_groups",
]

NORM = "norm"  # a member role beside slicing.OUT / slicing.IN: a norm, cut along its only dimension
MIXER = "mixer"  # a layer mixing neighbouring channels with nothing per channel (ECA): gated, not cut


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
        """Bool mask (CPU) keeping the ``keep`` highest-scored channels, ``keep / num_parts`` per
        cell (ties: the lower index).

        The one top-k of a group's channels: the greedy rules close the rest of a criterion's
        ranking (``~keep_top(-scores, n)``), the selector fixes its learned gates with it at the
        end of a phase (the logits rank, the budget counts), and
        :func:`~.selector.keep_top_across` takes each group's floor with it.

        Raises:
            ValueError: if ``keep`` is out of range or not a multiple of :attr:`num_parts`.
        """
        scores = torch.as_tensor(scores).detach().flatten().cpu()
        if scores.dtype != torch.float64:  # float64 logits (precision="64-true") rank at their own precision
            scores = scores.float()
        p = self.num_parts
        if p == 1 and not 0 <= keep <= self.size:
            raise ValueError(f"group {self.name!r}: keep must be in [0, {self.size}], got {keep}")
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


def _free_parameter(param: nn.Parameter, param_names: Dict[int, str]) -> Tuple[str, Optional[str], str]:
    """``(owner module, role, "")`` for a parameter Torch-Pruning found outside the layers it knows
    (a layer scale's ``gamma``): a per-channel vector is cut along its channel axis; else
    ``(label, None, reason)``."""
    full = param_names.get(id(param), "<parameter>")
    owner, _, attr = full.rpartition(".")
    if id(param) not in param_names or per_channel_axis(param) < 0:
        return full, None, f"a free parameter of shape {list(param.shape)} (not one value per channel)"
    return owner, param_dim(attr), ""


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
    if BlurPool2d is not None and isinstance(module, BlurPool2d):
        return NORM, ""  # one fixed filter per channel (anti-aliasing): cut with its channel
    if is_channel_norm(module):
        return NORM, ""  # its statistics follow the gates (gated_norm), its weight and bias the cut
    if is_channel_mixer(module):
        return MIXER, ""  # sees the open channels only while gated (channel_mixers); nothing to cut
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return None, f"{type(module).__name__} is a layer norm whose forward this library does not know"
    if isinstance(module, nn.LayerNorm):
        return None, f"{type(module).__name__} normalises over channels and other dimensions together"
    if isinstance(module, nn.GroupNorm):
        return None, f"{type(module).__name__} normalises across channels"
    return None, f"{type(module).__name__} has per-channel parameters this library cannot slice"


Buckets = Dict[int, List[int]]  # group channel -> the buckets (conv groups, split parts) its channels fall in


def _partition(size: int, units: Sequence[Tuple[str, int, Buckets]]) -> Tuple[Tuple[int, ...], str]:
    """``(parts, "")``: the cells of a group's channels that equal-count removal needs (``()`` when
    nothing needs it), else ``((), reason)``.

    Each *unit* ``(where, n, buckets)`` is something that stays valid only if its ``n`` buckets lose
    equally many channels: a grouped conv (buckets: its conv groups) or a split into equal parts
    (buckets: the parts). A channel's label lists its buckets in every unit; channels with the same
    label form a cell. Removing the same number of channels from every cell removes the same number
    from every bucket when the cells are equally large and every bucket holds as many cell members
    (a group channel may reach several buckets: paths summed after a split).
    """
    if not units:
        return (), ""
    labels = {c: tuple(tuple(sorted(b.get(c, ()))) for _, _, b in units) for c in range(size)}
    members: Dict[Tuple, List[int]] = {}
    for c in range(size):
        members.setdefault(labels[c], []).append(c)
    smallest = min(len(v) for v in members.values())
    if any(len(v) % smallest for v in members.values()):
        smallest = 0
    for label, chans in list(members.items()):
        # a cell that is a multiple of the smallest one is cut into chunks of that size (by position):
        # Res2NeXt's last split part meets no grouped conv, the other parts meet eight conv groups
        # each; the chunks add constraints, never remove one, so removal stays exact
        if smallest and len(chans) > smallest:
            for j, c in enumerate(chans):
                labels[c] = label + ((j // smallest,),)
    cells: Dict[Tuple, int] = {}
    parts = tuple(cells.setdefault(labels[c], len(cells)) for c in range(size))
    counts = [parts.count(c) for c in range(len(cells))]
    for k, (where, n, _) in enumerate(units):
        per_bucket = [0] * n
        for label in cells:
            for b in label[k]:
                per_bucket[b] += 1
        if len(set(counts)) != 1 or len(set(per_bucket)) != 1:
            return (), f"{where}: its channels fall unevenly into the group's cells"
    if counts[0] == 1:
        return (), f"{units[0][0]}: leaves one channel per cell"
    return parts, ""


def _grouped_unit(model: nn.Module, member: Member) -> Tuple[Optional[Tuple[str, int, Buckets]], str]:
    """A grouped conv member as a :func:`_partition` unit, or ``(None, reason)``."""
    conv = model.get_submodule(member.module)
    channels = conv.out_channels if member.role == OUT else conv.in_channels
    side = "output" if member.role == OUT else "input"
    where = f"{member.module}: grouped conv (groups={conv.groups})"
    if len(set(member.idxs)) != channels:
        return None, f"{where} takes its {side} channels from several groups"
    width = channels // conv.groups
    if width == 1:
        return None, f"{where} has one {side} channel per conv group"
    buckets: Buckets = {}
    for i, c in zip(member.idxs, member.root_idxs):
        buckets.setdefault(c, []).append(i // width)
    return (where, conv.groups, buckets), ""


def _first_named(node, names: Dict[int, str], downstream: bool = False) -> str:
    """The name of the nearest module upstream of a traced op (the layer whose output it cuts), or
    downstream (a layer that reads it)."""
    queue, seen = [node], set()
    while queue:
        n = queue.pop(0)
        if id(n) in seen:
            continue
        seen.add(id(n))
        if id(n.module) in names:
            return names[id(n.module)]
        queue.extend(n.outputs if downstream else n.inputs)
    return ""


def _identity_slice(node) -> bool:
    """A slice keeping every channel (``x[:, :n]`` with ``n`` past the end) stays one after a cut."""
    fn = node.grad_fn
    try:
        size = int(fn._saved_self_sym_sizes[1])
        return (fn._saved_start or 0) == 0 and fn._saved_step == 1 and fn._saved_end >= size
    except (AttributeError, IndexError, TypeError):
        return False


def _cuts(model: nn.Module, flow: ChannelFlow, node, pairs, names: Dict[int, str], classes: Dict[int, int]):
    """For a split or slice the group's channels pass: ``(unit or None, reason)``.

    A cut along channels at a position fixed in a block's code is exact only if the block's numbers
    follow the new widths (:mod:`.block_sizes`); a split into equal parts by one number also needs
    equal counts per part (a :func:`_partition` unit).
    """
    source = _first_named(node, names) or repr(node.module)
    if node.type == tp.ops.OPTYPE.UNBIND:
        return None, f"{source}: its output is split into fixed sizes (torch.split / chunk)"
    if node.type == tp.ops.OPTYPE.SLICE:
        fn, shape = node.grad_fn, getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        dim = fn._saved_dim % len(shape) if shape else getattr(fn, "_saved_dim", CHANNEL_DIM)
        if dim != CHANNEL_DIM or _identity_slice(node) or owner_of(model, source) is not None:
            return None, ""
        return None, f"{source}: its output is sliced at channel positions fixed in the model's code"
    layout = flow.split_layout(node)
    if layout is None or layout[0] != CHANNEL_DIM:
        return None, ""
    # the block that splits is around the layer before (CSP, Res2Net) or around the parts' layers (MixNet)
    owner = owner_of(model, source) or owner_of(model, _first_named(node, names, downstream=True))
    if owner is None:
        return None, f"{source}: its output is split into fixed sizes (torch.split / chunk)"
    sizes = layout[1]
    if len(set(sizes)) != 1:
        return None, f"{owner}: splits its channels into unequal parts {sizes}"
    buckets: Buckets = {}
    for idx, root in pairs:
        buckets.setdefault(classes[root], [])
        part = idx // sizes[0]
        if part not in buckets[classes[root]]:
            buckets[classes[root]].append(part)
    return (f"{owner}: split into {len(sizes)} parts", len(sizes), buckets), ""


def _splits_channels(node) -> bool:
    """A reshape that splits the channel dimension into several (a block like split attention's
    ``x.reshape(B, radix, C // radix, H, W)`` without a trace-time form in :mod:`.traceable`):
    Torch-Pruning maps it as a flatten, which it is not."""
    fn = node.grad_fn
    try:
        before = [int(v) for v in fn._saved_self_sym_sizes]
        after = [int(v) for v in fn._input_metadata[0].shape]
    except (AttributeError, IndexError, TypeError):
        return False
    if len(after) <= len(before) or len(before) < 2:
        return False
    return any(math.prod(after[1:k]) == before[1] for k in range(3, len(after) + 1))


def _tie(pairs_by_member: Sequence[Dict[int, set]], roots: Sequence[int]) -> Dict[int, int]:
    """Root channel -> group channel: roots that meet in one channel anywhere (paths summed,
    e.g. split attention's radix paths) must be kept or removed together, as one group channel."""
    parent = {r: r for r in roots}

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for by_idx in pairs_by_member:
        for channel_roots in by_idx.values():
            first, *rest = sorted(channel_roots)
            for r in rest:
                a, b = find(first), find(r)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    reps = sorted({find(r) for r in roots})
    rank = {rep: i for i, rep in enumerate(reps)}
    return {r: rank[find(r)] for r in roots}


def find_channel_groups(
    model: nn.Module,
    example_inputs: Optional[torch.Tensor] = None,
    exclude: Iterable[str] = (),
) -> GroupAnalysis:
    """Trace ``model`` and return its channel groups.

    A group is prunable when one of its producers is a :class:`BinaryConv2d` and every member is
    a module whose channels can be cut exactly. The group is named after its first binary
    producer, which owns the group's gate. The classifier's outputs are never pruned. Root
    channels that meet in one channel (summed paths) are one group channel (:func:`_tie`).

    Args:
        model: the (binarised) network, in any mode; it is traced once in eval mode.
        example_inputs: one input batch; default :func:`~lightning_bnnprune.introspect.example_batch`
            (one sample at the model's published input size).
        exclude: names of binary convs whose groups must stay whole.
    """
    example_inputs = example_batch(model) if example_inputs is None else example_inputs
    names = {id(m): n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters()}
    classifier = [model.get_submodule(n) for n in classifier_names(model)]
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unwrapped-parameter notices: such groups are refused below
            graph = trace(model, example_inputs)
    except Exception as err:  # noqa: BLE001  Torch-Pruning's tracer: the network stays whole, saying why
        why = f"Torch-Pruning cannot trace the network ({type(err).__name__}: {err})".replace("\n", " ")
        return GroupAnalysis(groups=[], refused={"(network)": f"(network): {why[:300]}"})
    finally:
        model.train(was_training)

    flow = ChannelFlow(graph)
    order = {n: i for i, n in enumerate(names.values())}
    excluded = set(exclude)
    analysis = GroupAnalysis(groups=[])
    # output channels already in a walk: a conv whose output two groups share (DPN's c1x1_c makes a
    # residual and a dense part) starts a walk of its own from the channels no walk reached
    covered: Dict[nn.Module, set] = {}
    for root_module in list(graph.module2node):
        if not isinstance(root_module, (nn.Conv2d, nn.Linear)):
            continue
        pruner = graph.get_pruner_of_module(root_module)
        if pruner is None or pruner.get_out_channels(root_module) is None:
            continue
        start = sorted(set(range(pruner.get_out_channels(root_module))) - covered.get(root_module, set()))
        if not start:
            continue
        walk = closure(graph, flow, root_module, start)
        if walk.fanned_out is not None:
            if isinstance(root_module, BinaryConv2d) and not is_depthwise(root_module):
                analysis.refused.setdefault(names[id(root_module)], (
                    f"{_first_named(walk.fanned_out, names)}: channel mapping fans out past {FAN_OUT} "
                    "entries per channel (a reshape Torch-Pruning reads as a flatten)"))
            continue
        reached = walk.reached
        outs = {node.module for (node, fn), pairs in reached.items()
                if pairs and graph.is_out_channel_pruning_fn(fn)}
        for (node, fn), pairs in reached.items():
            if pairs and graph.is_out_channel_pruning_fn(fn):
                covered.setdefault(node.module, set()).update(i for i, _ in pairs)
        if any(m in outs for m in classifier):
            continue  # the classifier's outputs (Torch-Pruning's ignored layers) are never cut
        by_key: Dict[Tuple[str, str], Dict[int, set]] = {}
        cuts: List[Tuple[object, set]] = []
        ties: List[Dict[int, set]] = []
        reason = reshaped = ""
        for (node, fn), pairs in reached.items():
            module = node.module
            if node.type == tp.ops.OPTYPE.RESHAPE and _splits_channels(node):
                # named after a layer's own reason if the walk meets one (ECA's Conv1d across channels)
                reshaped = reshaped or (f"{_first_named(node, names)}: its channels are reshaped into several "
                                        "dimensions (a radix view), which Torch-Pruning maps as a flatten")
                continue
            if node.type in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.SLICE):
                cuts.append((node, pairs))
                continue
            if node in flow.unmapped:
                reason = reason or (f"{_first_named(node, names)}: channel mapping not traceable "
                                    "(a concat or split autograd does not size)")
                continue
            if id(module) not in names and not isinstance(module, nn.Parameter):
                continue  # Torch-Pruning's stand-ins for element-wise ops, reshapes, concats
            if is_channel_multiplier(module) and not graph.is_out_channel_pruning_fn(fn):
                ties.append(_by_idx(pairs))  # its input channel c is cut with its outputs' conv group c
                continue
            if isinstance(module, nn.Parameter):
                label, role, why = _free_parameter(module, param_names)
            else:
                label, (role, why) = names[id(module)], _classify(module, fn.__name__)
            if role is None:
                reason = reason or f"{label}: {why}"
                continue
            if not pairs:
                continue
            dim = role if role == IN or is_param_dim(role) else OUT
            if role != MIXER and max(i for i, _ in pairs) >= channel_count(model.get_submodule(label), dim):
                reason = reason or (f"{label}: channel indices past its channels "
                                    "(a reshape or op Torch-Pruning maps wrongly)")
                continue
            # the same module reached twice (a depthwise conv's in and out): one member
            by_idx = by_key.setdefault((label, role), {})
            for i, r in pairs:
                by_idx.setdefault(i, set()).add(r)
        binary_producers = sorted(
            (label for (label, role) in by_key
             if role == OUT and isinstance(model.get_submodule(label), BinaryConv2d)
             and not is_depthwise(model.get_submodule(label))),
            key=order.get,
        )
        if not binary_producers:
            continue  # nothing binary to prune here (e.g. full-precision stems and heads)
        # a conv whose output two groups share (DPN's projection: residual and dense part) owns the
        # first one's gate; the second is named after its next binary producer, else joins the first
        taken = {g.name: k for k, g in enumerate(analysis.groups)}
        name = next((p for p in binary_producers if p not in taken), binary_producers[0])
        key = name if name not in taken else f"{name} (output channels {start[0]}-{start[-1]})"
        reason = reason or reshaped
        split_units: List[Tuple[str, int, Buckets]] = []
        classes: Dict[int, int] = {}
        if not reason:
            classes = _tie(list(by_key.values()) + [_by_idx(p) for _, p in cuts] + ties, start)
            for node, pairs in cuts:
                unit, why = _cuts(model, flow, node, pairs, names, classes)
                reason = reason or why
                if unit is not None:
                    split_units.append(unit)
        if reason:
            analysis.refused.setdefault(key, reason)  # the first walk that met the layer says why
            continue
        if excluded & set(binary_producers):
            analysis.refused[key] = "excluded by the user"
            continue
        members = [Member(label, role, tuple(sorted(by_idx)), tuple(classes[min(by_idx[i])] for i in sorted(by_idx)))
                   for (label, role), by_idx in by_key.items()]  # every root of a channel is in one class
        # a block that cuts a producer's output at a position of its own (DPN) is cut with the producer
        members += [Member(block, NORM, m.idxs, m.root_idxs) for m in members
                    if m.role == OUT and (block := position_owner(model, m.module)) is not None]
        ordered = sorted(members, key=lambda m: (order.get(m.module, 0), m.role))
        units: List[Tuple[str, int, Buckets]] = []
        for member in ordered:
            if member.role in (OUT, IN) and is_grouped(model.get_submodule(member.module)):
                unit, why = _grouped_unit(model, member)
                reason = reason or why
                if unit is not None:
                    units.append(unit)
        size = 1 + max(classes.values())
        parts, why = _partition(size, units + split_units) if not reason else ((), reason)
        if why:
            analysis.refused.setdefault(key, why)
            continue
        group = ChannelGroup(name=name, size=size, members=tuple(ordered), parts=parts)
        if name not in taken:
            analysis.groups.append(group)
            continue
        joined = _join(analysis.groups[taken[name]], group, lambda m: (order.get(m.module, 0), m.role))
        if joined is None:
            analysis.refused.setdefault(key, f"{name}: its output channels fall in two groups with equal-count "
                                             "cells, and one conv owns one gate")
            continue
        analysis.groups[taken[name]] = joined
    analysis.groups.sort(key=lambda g: order[g.name])
    return analysis


def _join(first: ChannelGroup, second: ChannelGroup, sort_key) -> Optional[ChannelGroup]:
    """One group holding both groups' channels (``second``'s after ``first``'s), or None when either
    has equal-count cells (their cells would have to match) or a member holds a channel of both."""
    if first.parts or second.parts:
        return None
    pairs: Dict[Tuple[str, str], Dict[int, int]] = {}
    for group, shift in ((first, 0), (second, first.size)):
        for m in group.members:
            by_idx = pairs.setdefault((m.module, m.role), {})
            if set(m.idxs) & set(by_idx):
                return None
            by_idx.update({i: r + shift for i, r in zip(m.idxs, m.root_idxs)})
    members = [Member(module, role, tuple(sorted(by_idx)), tuple(by_idx[i] for i in sorted(by_idx)))
               for (module, role), by_idx in pairs.items()]
    return ChannelGroup(name=first.name, size=first.size + second.size, members=tuple(sorted(members, key=sort_key)))


def _by_idx(pairs) -> Dict[int, set]:
    out: Dict[int, set] = {}
    for i, r in pairs:
        out.setdefault(i, set()).add(r)
    return out


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
