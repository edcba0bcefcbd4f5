"""Trace-time forms of timm's radix attention, written with the ops whose channel maps we know.

Split attention (ResNeSt's ``SplitAttn``, Zhang et al. 2022, eq. 1-3) and selective kernels
(SKNet's ``SelectiveKernel``, Li et al. 2019, eq. 1-6) compute, for ``r`` paths of ``C`` channels,

    out[j] = sum_p  x_p[j] * softmax_p(a)[p, j]

but write it as ``reshape(B, r, C, H, W)`` / ``stack`` followed by ``sum(dim=1)``: the channel
dimension is cut into two, which Torch-Pruning's tracer reads as a flatten, so every channel of
those blocks used to be refused. While the graph is traced (and only then), :func:`traceable_attention`
swaps in a forward that computes the same values with ``torch.split``, adds and a concat, whose
channel maps :mod:`.tracing` takes from autograd: channel ``j`` of every path, of the attention
logits and of the output come out as one group channel (the summed paths tie them), and the
removal cuts them together. The real forward is back before anything runs for real; the blocks
read their widths from the tensors (``SelectiveKernel``'s input split is a :mod:`.block_sizes`
rule), so the pruned block runs its own code.

Global context attention (GCNet's ``GlobalContext``, Cao et al. 2019, eq. 1-2: ``context_c =
sum_j softmax_j(w^T x_j) x_cj``) reshapes ``x`` to ``[B, C, H*W]`` for a matmul, which the tracer
also reads as a flatten; its trace-time form weighs ``x`` by the ``[B, 1, H, W]`` attention map and
sums over space (one weight per position, broadcast over the channels: :mod:`.tracing` maps no
channel through such a broadcast), so ``x``'s channel ``c`` is the context's channel ``c``.

ECA's layers (:mod:`.channel_mixers`) are traced as a per-channel weight the tracer does not follow
(their 1-D conv runs across the channels, read as a flatten): the layer is then one node whose
channel ``c`` in is channel ``c`` out, as its gated form makes it.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from torch import Tensor, nn

__all__ = ["TRACEABLE_FORMS", "traceable_attention"]


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    """Element-wise sum by adds (no ``stack``: each add ties its inputs' channels in the trace)."""
    return functools.reduce(operator.add, tensors)


def _softmax_over(logits: Sequence[Tensor]) -> List[Tensor]:
    """Softmax across a list of equally shaped tensors, element by element (the paths' axis)."""
    top = functools.reduce(torch.maximum, logits)
    exps = [torch.exp(a - top) for a in logits]
    total = _sum(exps)
    return [e / total for e in exps]


def _weighted_sum(parts: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    return _sum([x * w for x, w in zip(parts, weights)])


def _split_attn_forward(block: nn.Module) -> Callable[[Tensor], Tensor]:
    """``SplitAttn.forward`` for ``radix > 1``: conv channel ``p * C + c * Cg + j`` (path ``p``,
    cardinal group ``c``) meets fc2 channel ``c * r * Cg + p * Cg + j`` (``RadixSoftmax``'s
    ``view(B, card, r, -1).transpose(1, 2)``) in output channel ``c * Cg + j``."""
    r, card = block.radix, block.rsoftmax.cardinality

    def forward(x: Tensor) -> Tensor:
        x = block.act0(block.drop(block.bn0(block.conv(x))))
        width = x.shape[1] // r  # C
        gap = _sum(torch.split(x, width, dim=1))
        attn = block.fc2(block.act1(block.bn1(block.fc1(gap.mean((2, 3), keepdim=True)))))
        cell = width // card  # Cg
        x_cells = torch.split(x, cell, dim=1)  # index p * card + c
        a_cells = torch.split(attn, cell, dim=1)  # index c * r + p
        outs = []
        for c in range(card):
            weights = _softmax_over([a_cells[c * r + p] for p in range(r)])
            outs.append(_weighted_sum([x_cells[p * card + c] for p in range(r)], weights))
        return torch.cat(outs, dim=1) if card > 1 else outs[0]

    return forward


def _selective_kernel_forward(block: nn.Module) -> Callable[[Tensor], Tensor]:
    """``SelectiveKernel.forward``: path ``p``'s channel ``j`` meets fc_select channel ``p * C + j``
    (``SelectiveKernelAttn``'s ``view(B, paths, C, 1, 1)``) in output channel ``j``."""
    attn = block.attn

    def forward(x: Tensor) -> Tensor:
        if block.split_input:
            inputs = torch.split(x, block.in_channels // block.num_paths, 1)
        else:
            inputs = [x] * block.num_paths
        paths = [op(x_p) for op, x_p in zip(block.paths, inputs)]
        gap = _sum(paths)
        logits = attn.fc_select(attn.act(attn.bn(attn.fc_reduce(gap.mean((2, 3), keepdim=True)))))
        return _weighted_sum(paths, _softmax_over(list(torch.split(logits, paths[0].shape[1], dim=1))))

    return forward


def _global_context_forward(block: nn.Module) -> Callable[[Tensor], Tensor]:
    """``GlobalContext.forward`` with the context as a weighted sum over space (no reshape of ``x``)."""

    def forward(x: Tensor) -> Tensor:
        if block.conv_attn is not None:
            logits = block.conv_attn(x)  # [B, 1, H, W]
            weights = torch.exp(logits - logits.amax((2, 3), keepdim=True))
            context = (x * (weights / weights.sum((2, 3), keepdim=True))).sum((2, 3), keepdim=True)
        else:
            context = x.mean((2, 3), keepdim=True)
        if block.mlp_scale is not None:
            x = x * block.gate(block.mlp_scale(context))
        if block.mlp_add is not None:
            x = x + block.mlp_add(context)
        return x

    return forward


def _channel_mixer_forward(block: nn.Module) -> Callable[[Tensor], Tensor]:
    """A channel mixer as a per-channel weight off the traced graph (same shapes, channel c -> c)."""

    def forward(x: Tensor) -> Tensor:
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True)).detach()

    return forward


def _forms() -> Dict[type, Callable[[nn.Module], Callable[[Tensor], Tensor]]]:
    from .channel_mixers import CHANNEL_MIXERS

    mixers = {mixer: _channel_mixer_forward for mixer in CHANNEL_MIXERS}
    try:
        from timm.layers.global_context import GlobalContext
        from timm.layers.selective_kernel import SelectiveKernel
        from timm.layers.split_attn import SplitAttn
    except ImportError:  # pragma: no cover  (timm without these layers: nothing to rewrite)
        return mixers
    return {SplitAttn: _split_attn_forward, SelectiveKernel: _selective_kernel_forward,
            GlobalContext: _global_context_forward, **mixers}


#: block type -> factory of its trace-time forward (given the block)
TRACEABLE_FORMS = _forms()


def _applies(block: nn.Module) -> bool:
    form = TRACEABLE_FORMS.get(type(block))
    if form is None:
        return False
    if form is _split_attn_forward:
        return block.radix > 1  # radix 1 is a sigmoid gate, already traceable
    return True


@contextlib.contextmanager
def traceable_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, every radix-attention block of ``model`` runs its trace-time form."""
    swapped = [m for m in model.modules() if _applies(m)]
    for block in swapped:
        block.forward = TRACEABLE_FORMS[type(block)](block)
    try:
        yield
    finally:
        for block in swapped:
            del block.forward  # the class's forward again
