r"""Importance criteria for rule-based (greedy) filter pruning.

A criterion scores every channel of a :class:`~.groups.ChannelGroup`: ``criterion(network, group)``
returns a float tensor of shape ``[group.size]``, **higher = more important**; greedy pruning
closes the lowest-scored channels. Each group channel is produced by one or more convs (the
group's producers, e.g. the two branches of a residual add); a channel's score is the sum of its
scores in every *binary* producer (full-precision producers such as a stem conv are not what
binarisation acts on and are left out).

Only kept input channels count: a conv's latent weights on input channels already gated off
upstream (layer-wise pruning) are not part of any filter that will exist after removal, so the
scores use the same input mask as the layer's forward.

Registered criteria (resolve with :func:`get`, in the manner of :func:`..quantizers.get`):

- ``l1``: latent-weight magnitude, :math:`s_k = \mathrm{mean}|W_k|` (Li et al., "Pruning filters
  for efficient ConvNets", ICLR 2017, applied to the latent weights of the binary conv).
- ``binarization_error``: STQ-Nets' signal (Munagala, Prabhu, Namboodiri, BMVC 2020), read as the
  binarisation error *relative to the filter's energy* (see :class:`BinarizationError` for the
  reading and why).
- ``random``: seeded uniform scores, reproducible per ``(seed, group name)``.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator, Tuple, Union

import torch
from torch import Tensor, nn

from ..layers import BinaryConv2d
from ..registry import Registry
from .groups import ChannelGroup
from .slicing import OUT

__all__ = [
    "Criterion",
    "L1Magnitude",
    "BinarizationError",
    "RandomScore",
    "get",
    "register",
    "available",
    "binary_producers",
    "scores_for",
]

Criterion = Callable[[nn.Module, ChannelGroup], Tensor]
_REGISTRY: Registry = Registry("criterion", "criteria")
#: Class decorator: make a criterion resolvable as ``get(alias)``.
register = _REGISTRY.register
#: The registered criterion names, sorted.
available = _REGISTRY.available


def get(identifier: Union[str, Criterion], **kwargs) -> Criterion:
    """Resolve a criterion from a registered name (instantiated with ``kwargs``) or a callable.

    A callable is returned as it is; it must map ``(network, group)`` to ``[group.size]`` scores,
    higher = keep.

    Raises:
        ValueError: for an unknown name or a non-callable, naming the registered criteria.
        TypeError: for a keyword the named criterion does not take.
    """
    if isinstance(identifier, str):
        return _REGISTRY.create(identifier, **kwargs)
    if callable(identifier):
        return identifier
    raise ValueError(
        f"Cannot interpret {identifier!r} (type {type(identifier).__name__}) as a criterion; "
        f"pass one of {', '.join(available())} or a callable (network, group) -> scores"
    )


def binary_producers(network: nn.Module, group: ChannelGroup) -> Iterator[Tuple[BinaryConv2d, Tensor, Tensor]]:
    """``(conv, out idxs, group idxs)`` for each binary conv producing ``group``'s channels."""
    for member in group.members:
        if member.role != OUT:
            continue
        module = network.get_submodule(member.module)
        if isinstance(module, BinaryConv2d):
            yield module, torch.tensor(member.idxs), torch.tensor(member.root_idxs)


@torch.no_grad()
def _filters(conv: BinaryConv2d, center: bool = False) -> Tuple[Tensor, Tensor]:
    """Latent weights as ``[out, in * kh * kw]`` plus a same-shaped 0/1 mask of kept input channels.

    With ``center`` the weights are first centred over the kept input channels, as an XNOR
    quantizer with ``center=True`` does before binarising.
    """
    w = conv.weight.detach().float()
    keep = torch.ones(1, w.shape[1], device=w.device)
    # The consumer-side gate mask (see pruning.gates): the channels this conv will still have
    # (per filter for a grouped conv: each filter reads its own conv group's channels).
    mask = conv.kernel_mask()
    if mask is not None:
        keep = mask.detach().float().to(w.device).view(-1, w.shape[1])
    m = keep.view(*keep.shape, *([1] * (w.dim() - 2))).expand_as(w)
    if center:
        w = w - (w * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    return (w * m).flatten(1), m.flatten(1)


def _group_sum(group: ChannelGroup, network: nn.Module, per_filter: Callable[[BinaryConv2d], Tensor]) -> Tensor:
    scores = torch.zeros(group.size)
    for conv, idxs, root_idxs in binary_producers(network, group):
        scores.index_add_(0, root_idxs, per_filter(conv).cpu()[idxs])
    return scores


@register("l1")
class L1Magnitude:
    r"""Latent-weight magnitude: :math:`s_k = \sum_{p} \mathrm{mean}|W^{(p)}_k|` over the group's
    binary producers ``p`` (mean over kept input channels and the kernel window).

    A mean, not a sum, so producers with different fan-in (a 3x3 conv and a 1x1 downsample) weigh
    alike. Smallest magnitude is pruned first.
    """

    @torch.no_grad()
    def __call__(self, network: nn.Module, group: ChannelGroup) -> Tensor:
        def per_filter(conv: BinaryConv2d) -> Tensor:
            w, m = _filters(conv)
            return w.abs().sum(1) / m.sum(1).clamp(min=1.0)

        return _group_sum(group, network, per_filter)


@register("binarization_error")
class BinarizationError:
    r"""STQ-Nets' binarisation-error signal, relative to the filter's energy.

    For filter ``k`` with ``n`` latent weights :math:`w` (kept input channels only; centred first
    when the layer's XNOR quantizer centres) and the least-squares XNOR scale
    :math:`\alpha_k = \mathrm{mean}|w|`:

    .. math::
        E_k = \lVert W_k - \alpha_k\,\mathrm{sign}(W_k) \rVert^2 = \textstyle\sum w^2 - n\alpha_k^2,
        \qquad
        r_k = E_k / \lVert W_k \rVert^2 = 1 - \frac{(\mathrm{mean}|w|)^2}{\mathrm{mean}(w^2)}
        = 1 - \cos^2(W_k, \mathrm{sign}\,W_k).

    **Direction: the filter with the largest relative error** :math:`r_k` **is pruned first.** The
    score returned is :math:`s_k = \sum_p (1 - r^{(p)}_k) = \sum_p \cos^2(W^{(p)}_k, \mathrm{sign}\,W^{(p)}_k)`
    over the group's binary producers, so lowest score = largest error, as for every criterion.

    Why relative, not the absolute :math:`E_k`: STQ-Nets' argument is that weights close to zero
    have the largest binarisation error and are the first candidates for pruning. With a
    per-filter scale :math:`\alpha_k = \mathrm{mean}|W_k|`, the absolute error is
    :math:`n\,\mathrm{Var}(|W_k|)`: it scales with the square of the filter's magnitude, so
    "largest absolute error" prunes the *largest* filters (against the paper) and "smallest" is
    just a noisier ``l1``. A filter of tiny but equal-magnitude weights has zero error: its binary
    form is exact. What is large for "weights close to zero" is the error relative to the weights
    themselves (:math:`|\alpha - |w||/|w| \to \infty` as :math:`w \to 0`); summed over a filter
    that is :math:`r_k`, which is scale-free. Scale-free is also what matters in a binary conv
    followed by a batch norm: the norm absorbs :math:`\alpha_k`, so only the sign pattern reaches
    the next layer, and :math:`r_k` measures how poorly that sign pattern represents the latent
    filter (many weights near zero relative to the filter's own scale: signs that training noise
    flips). It is therefore a signal distinct from ``l1``, not a rescaling of it.
    """

    @torch.no_grad()
    def __call__(self, network: nn.Module, group: ChannelGroup) -> Tensor:
        def per_filter(conv: BinaryConv2d) -> Tensor:
            w, m = _filters(conv, center=bool(getattr(conv.kernel_quantizer, "center", False)))
            n = m.sum(1).clamp(min=1.0)
            mean_abs = w.abs().sum(1) / n
            mean_sq = (w * w).sum(1) / n
            # An all-zero filter has no sign information at all: cos^2 := 0, pruned first.
            return torch.where(mean_sq > 0, mean_abs.pow(2) / mean_sq.clamp(min=1e-30), torch.zeros_like(mean_sq))

        return _group_sum(group, network, per_filter)


@register("random")
class RandomScore:
    """Uniform random scores, the baseline every criterion must beat.

    Reproducible: the scores of a group depend only on ``seed`` and the group's name (CRC-32,
    not Python's salted ``hash``), not on the order or the moment groups are scored, so a
    layer-wise run resumed from a checkpoint draws what an uninterrupted one draws.

    Args:
        seed: base seed.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def __call__(self, network: nn.Module, group: ChannelGroup) -> Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(group.name.encode())) % 2**63)
        return torch.rand(group.size, generator=generator)

    def __repr__(self) -> str:
        return f"RandomScore(seed={self.seed})"


def scores_for(criterion: Criterion, network: nn.Module, group: ChannelGroup) -> Tensor:
    """Call ``criterion`` and check it returned ``[group.size]`` finite scores (CPU, float)."""
    scores = torch.as_tensor(criterion(network, group)).detach().float().cpu().flatten()
    if scores.numel() != group.size:
        raise ValueError(
            f"criterion {criterion!r} returned {scores.numel()} scores for group {group.name!r} of size {group.size}"
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"criterion {criterion!r} returned non-finite scores for group {group.name!r}")
    return scores

