"""Where a conv's output channels flow: Torch-Pruning's traced graph, walked with our own index maps.

Torch-Pruning (1.6) traces the model into a graph of layers and ops, and its ``get_all_groups``
follows each conv's channels through it. Two parts of that walk are replaced here:

- **Concat and split index maps.** Torch-Pruning sizes a split by its *consumers* (the i-th node
  reading the split gets the i-th part), so a part read by two layers (a block's first conv and its
  residual add, as in CS3DarkNet or Res2Net) shifts every later part, and the concat after it cannot
  be sized at all (``sum`` over ``None``: the tracer's ``TypeError``). Autograd knows the truth: a
  consumer's ``grad_fn.next_functions`` names *which* output of the split it reads (``output_nr``),
  a split saves its sizes, and each concat input's shape is in its producer's input metadata. The
  maps below are built from those (:class:`ChannelFlow`).
- **The closure.** Torch-Pruning re-walks a layer every time it is reached with a different index
  list, and checks each step against the whole group with a list scan: on ReXNet's channel-padded
  residuals (slices into concats into adds) that is minutes per group. :func:`closure` propagates
  only the ``(channel, root channel)`` pairs a node has not seen yet, so each pair crosses each edge
  once.

Slices and splits whose bounds live in a block's attributes are recorded as they are met, so the
caller can refuse them or keep the attributes in step (:mod:`.block_sizes`).

timm's ``BlurPool2d`` (anti-aliased downsampling) filters each channel with ``F.conv2d`` over a fixed
per-channel buffer; registered here as a channel-preserving layer (:class:`BlurPoolPruner`), it is a
member of its channels' group instead of an op the tracer cannot see into. ECA's layers
(:mod:`.channel_mixers`) are registered the same way (:class:`ChannelMixerPruner`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping

from .channel_mixers import CHANNEL_MIXERS
from .slicing import is_channel_multiplier
from .traceable import traceable_attention

__all__ = ["BlurPoolPruner", "ChannelMixerPruner", "ChannelFlow", "Closure", "closure", "trace", "CHANNEL_DIM"]

CHANNEL_DIM = 1
Pairs = Set[Tuple[int, int]]  # (channel of this node, root channel it carries)

try:  # timm's anti-aliasing layer; absent in very old timm versions
    from timm.layers import BlurPool2d
except ImportError:  # pragma: no cover
    BlurPool2d = None


class BlurPoolPruner(tp.pruner.BasePruningFunc):
    """A per-channel layer for Torch-Pruning's tracer: input channel ``c`` is output channel ``c``.

    Only the tracing uses it (the cut is :func:`~.slicing.slice_channels`'), so the prune methods do
    nothing; ``prune_in_channels = prune_out_channels`` is Torch-Pruning's way of saying the layer's
    input and output channels are the same ones.
    """

    def prune_out_channels(self, layer: nn.Module, idxs):
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module):
        return layer.filt.shape[0] if layer.channels is not None else None

    get_in_channels = get_out_channels


class ChannelMixerPruner(BlurPoolPruner):
    """A layer that mixes neighbouring channels but has no per-channel tensor (ECA): input channel
    ``c`` is output channel ``c``; its width is the input's (not stored in the layer)."""

    def get_out_channels(self, layer: nn.Module):
        return None

    get_in_channels = get_out_channels


@contextlib.contextmanager
def _own_concat_split_maps() -> Iterator[None]:
    """Torch-Pruning's concat / split index maps switched off while it builds its graph: they crash
    on some networks (see the module docstring) and :class:`ChannelFlow` replaces them."""
    saved = tp_index_mapping.update_concat_index_mapping, tp_index_mapping.update_split_index_mapping
    tp_index_mapping.update_concat_index_mapping = lambda graph, node: None
    tp_index_mapping.update_split_index_mapping = lambda graph, node: None
    try:
        yield
    finally:
        tp_index_mapping.update_concat_index_mapping, tp_index_mapping.update_split_index_mapping = saved


def trace(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` (in its current mode), with ``BlurPool2d``
    traced as a per-channel layer, radix attention in its split/add form (:mod:`.traceable`), and
    without Torch-Pruning's concat / split index maps."""
    customized = {BlurPool2d: BlurPoolPruner()} if BlurPool2d is not None else {}
    customized.update({mixer: ChannelMixerPruner() for mixer in CHANNEL_MIXERS})
    with _own_concat_split_maps(), traceable_attention(model):
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                     customized_pruners=customized, verbose=False)


def _dim(saved: int, ndim: int) -> int:
    return saved % ndim if ndim else saved


def _cat_sizes(node) -> Optional[Tuple[int, List[int]]]:
    """``(dim, channels of each input position)`` of a concat node, or None when unknown."""
    fn = node.grad_fn
    try:
        ndim = len(fn._input_metadata[0].shape)
        sizes = [nxt._input_metadata[nr].shape[_dim(fn._saved_dim, ndim)] if nxt is not None else None
                 for nxt, nr in fn.next_functions]
        return _dim(fn._saved_dim, ndim), sizes
    except (AttributeError, IndexError, TypeError):
        return None


def _split_sizes(node) -> Optional[Tuple[int, List[int]]]:
    """``(dim, size of each part)`` of a split node (``torch.split`` / ``chunk``), or None."""
    fn = node.grad_fn
    try:
        shape = list(fn._saved_self_sym_sizes)
        dim = _dim(fn._saved_dim, len(shape))
        if hasattr(fn, "_saved_split_sizes"):
            return dim, [int(s) for s in fn._saved_split_sizes]
        size, total = int(fn._saved_split_size), int(shape[dim])
        parts = max(1, math.ceil(total / size))
        return dim, [size] * (parts - 1) + [total - size * (parts - 1)]
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


def _offsets(sizes: List[int]) -> List[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


@dataclass
class ChannelFlow:
    """Index maps along the graph's edges, concat and split ones from autograd (module docstring).

    ``unmapped``: edges through a concat or split whose sizes autograd does not give (an input
    without a gradient, a reused layer), as ``"<op>"`` names; a group crossing one is refused.
    """

    graph: Any
    unmapped: Set[Any] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._cat: Dict[Any, Optional[Tuple[int, List[int]]]] = {}
        self._split: Dict[Any, Optional[Tuple[int, List[int]]]] = {}

    def split_layout(self, node) -> Optional[Tuple[int, List[int]]]:
        if node not in self._split:
            self._split[node] = _split_sizes(node)
        return self._split[node]

    def cat_layout(self, node) -> Optional[Tuple[int, List[int]]]:
        if node not in self._cat:
            self._cat[node] = _cat_sizes(node)
        return self._cat[node]

    @staticmethod
    def _links(consumer, producer) -> List[Tuple[int, int]]:
        """``(input position of consumer, output number of producer)`` for each tensor passed."""
        fns = getattr(consumer.grad_fn, "next_functions", ()) or ()
        return [(p, nr) for p, (fn, nr) in enumerate(fns) if fn is not None and fn is producer.grad_fn]

    def map(self, dep, pairs: Pairs) -> Pairs:
        """The pairs ``dep``'s target carries when ``dep``'s source carries ``pairs``."""
        src, dst = dep.source, dep.target
        backward = any(fn is dst.grad_fn for fn, _ in getattr(src.grad_fn, "next_functions", ()) or ())
        consumer, producer = (src, dst) if backward else (dst, src)
        if consumer.type == tp.ops.OPTYPE.ELEMENTWISE and self._broadcast_over_channels(consumer, producer):
            return set()
        split = self._channel_layout(producer, self.split_layout) if producer.type == tp.ops.OPTYPE.SPLIT else None
        cat = self._channel_layout(consumer, self.cat_layout) if consumer.type == tp.ops.OPTYPE.CONCAT else None
        if not split and not cat:
            return self._tp_maps(dep, pairs)
        # Torch-Pruning's own map on the same edge (a slice reading a split part, a flatten feeding a
        # concat) acts on the side of the node it belongs to: the consumer's unless that is ours
        tp_first = backward == (not cat)
        if tp_first:
            pairs = self._tp_maps(dep, pairs)
        out = self._cat_split(consumer, producer, split, cat, pairs, backward)
        return out if tp_first else self._tp_maps(dep, out)

    @classmethod
    def _broadcast_over_channels(cls, consumer, producer) -> bool:
        """Whether ``producer`` enters the element-wise ``consumer`` as one channel broadcast to all
        (a spatial attention map ``[B, 1, H, W]`` times ``[B, C, H, W]``): the same value for every
        channel, so no channel of one is a channel of the other (Torch-Pruning maps channel ``c`` to
        ``c``)."""
        try:
            out = list(consumer.grad_fn._input_metadata[0].shape)
            shapes = [list(producer.grad_fn._input_metadata[nr].shape) for _, nr in cls._links(consumer, producer)]
        except (AttributeError, IndexError, TypeError):
            return False
        if len(out) < 2 or out[CHANNEL_DIM] == 1 or not shapes:
            return False
        for shape in shapes:  # same rank only: an op that adds a dimension (stack) is no broadcast
            others = [a for k, a in enumerate(shape) if k != CHANNEL_DIM]
            if len(shape) != len(out) or shape[CHANNEL_DIM] != 1 or others != [
                    b for k, b in enumerate(out) if k != CHANNEL_DIM]:
                return False
        return True

    def _cat_split(self, consumer, producer, split, cat, pairs: Pairs, backward: bool) -> Pairs:
        links = self._links(consumer, producer)
        if not links or (cat and any(cat[1][p] is None for p, _ in links)):
            self.unmapped.add(producer if split else consumer)
            return set()
        part_off = _offsets(split[1]) if split else None
        cat_off = _offsets(cat[1]) if cat else None
        out: Pairs = set()
        for position, nr in links:
            # the producer's space is a split's input, the consumer's a concat's output
            lo, hi = (part_off[nr], part_off[nr + 1]) if split else (0, None)
            shift, width = (cat_off[position], cat[1][position]) if cat else (0, None)
            for idx, root in pairs:
                if backward:  # consumer space -> producer space
                    if cat and not shift <= idx < shift + width:
                        continue
                    out.add((idx - shift + lo, root))
                elif not split or lo <= idx < hi:
                    out.add((idx - lo + shift, root))
        return out

    def _channel_layout(self, node, layout):
        """The node's layout when it cuts or joins along channels; None when it acts on another
        dimension (channels pass unchanged) or autograd does not say."""
        found = layout(node)
        if found is None:
            self.unmapped.add(node)
            return None
        return found if found[0] == CHANNEL_DIM else None

    @staticmethod
    def _tp_maps(dep, pairs: Pairs) -> Pairs:
        """Torch-Pruning's own maps (slices, flattens) on the edge, if any."""
        if all(m is None for m in dep.index_mapping):
            return pairs
        idxs = [tp._helpers._HybridIndex(idx=i, root_idx=r) for i, r in pairs]
        for mapping in dep.index_mapping:
            if mapping is not None:
                idxs = mapping(idxs)
        return {(int(h.idx), int(h.root_idx)) for h in idxs if h.root_idx is not None}


@dataclass
class Closure:
    """What one root conv's output channels reach: per ``(node, pruning handler)``, the pairs
    ``(channel, root channel)`` it carries. ``fanned_out``: the node where the walk stopped because
    it carried more than :data:`FAN_OUT` channels per root channel (else None)."""

    root: Any
    reached: Dict[Tuple[Any, Any], Pairs]
    fanned_out: Any = None


# A channel flattened into a linear layer legitimately becomes H*W features (8x8 at most here);
# far more means Torch-Pruning read a reshape of spatial positions (global-context attention's
# ``x.view(B, C, H*W)``) as a flatten of channels, and every later step multiplies that blow-up.
FAN_OUT = 64


def closure(graph: tp.DependencyGraph, flow: ChannelFlow, root_module: nn.Module,
            channels: Optional[Sequence[int]] = None) -> Closure:
    """Follow output ``channels`` (default: every one) of ``root_module`` through ``graph`` (each
    pair crosses each edge at most once; the walk stops at a node that fans out past :data:`FAN_OUT`)."""
    root = graph.module2node[root_module]
    handler = graph.get_pruner_of_module(root_module).prune_out_channels
    if channels is None:
        channels = range(graph.get_pruner_of_module(root_module).get_out_channels(root_module))
    start = {(i, i) for i in channels}
    cap = FAN_OUT * len(start)
    reached: Dict[Tuple[Any, Any], Pairs] = {(root, handler): set(start)}
    stack = [(root, handler, start)]
    while stack:
        node, fn, pairs = stack.pop()
        steps = [(dep.target, dep.handler, flow.map(dep, pairs), {dep.source, dep.target})
                 for dep in node.dependencies if dep.is_triggered_by(fn)]
        if is_channel_multiplier(node.module):
            steps.append((node, *_multiplier_side(graph, node.module, fn, pairs), set()))
        for target, handler, mapped, ends in steps:
            if not mapped and not ends & flow.unmapped:
                continue  # e.g. a concat's other inputs: none of these channels goes there
            seen = reached.setdefault((target, handler), set())
            fresh = mapped - seen
            if fresh:
                seen |= fresh
                if len(seen) > cap:
                    return Closure(root=root, reached=reached, fanned_out=target)
                stack.append((target, handler, fresh))
    return Closure(root=root, reached=reached)


def _multiplier_side(graph: tp.DependencyGraph, conv: nn.Conv2d, fn, pairs: Pairs) -> Tuple[Any, Pairs]:
    """The other side of a channel multiplier (:func:`~.slicing.is_channel_multiplier`): its input
    channel ``c`` and its outputs ``c*k ... c*k + k-1`` carry the same root channels (Torch-Pruning
    couples the two sides of a depthwise conv only when ``out == in``)."""
    pruner, k = graph.get_pruner_of_module(conv), conv.out_channels // conv.groups
    if graph.is_out_channel_pruning_fn(fn):
        return pruner.prune_in_channels, {(i // k, r) for i, r in pairs}
    return pruner.prune_out_channels, {(i * k + j, r) for i, r in pairs for j in range(k)}
