"""Quantizers: how activations and weights become binary.

Each quantizer is a small ``nn.Module`` registered under an alias and resolved by :func:`get`, in the
manner of larq's ``quantizers.get``. ``sign(0) = +1`` everywhere, so a binary tensor never holds a 0
that the network did not put there on purpose (padding, a removed channel).

Activation quantizers map a tensor to ``{-1, +1}``. Kernel quantizers map a latent weight
``W`` of shape ``[out, in, kh, kw]`` to a pair ``(kernel, out_scale)`` with
``conv(x, W_b) == conv(x, kernel) * out_scale``. Keeping the XNOR scale outside the convolution
means the convolution of ``{-1, 0, +1}`` inputs with ``{-1, +1}`` kernels sums integers, which
is exact in any summation order: a pruned layer computes bit-identical outputs to its masked
original even though the two sum over different channel counts.

Kernel quantizers accept ``in_mask`` (shape ``[in]``, or ``[out, in]`` per filter for a grouped
conv; entries 0/1): statistics over input
channels (the XNOR scale, the centring) are then taken over the kept channels only, which is what
the physically pruned layer computes.

What the exports, the compression report and the rebuild read off a quantizer is declared on it,
through the base classes :class:`InputQuantizer` and :class:`KernelQuantizer` (larq names the bit
width ``precision`` too):

- ``precision``: bits per quantised value (1);
- ``learned_parameters()``: the constructor arguments that training learns (BDG's ``tau``,
  ``phi``): they travel with the weights, not with the config a rebuild reads;
- an input quantizer's ``is_sign``: its forward is exactly ``sign(x)`` with ``sign(0) = +1``
  (whatever its gradient), what Larq Compute Engine's ``LceQuantize`` computes;
- a kernel quantizer's ``value_set`` (for messages) and ``export(weight)``: the deployed kernel as
  a :class:`BinaryKernel`, one bit per weight, the two values the bits stand for and the
  per-filter scale (XNOR: ``{-1, +1} x mean|W_k|``; BDG: ``{phi - tau, phi + tau}``, no scale).
  By default it is read off ``forward``'s kernel, which must then take at most two values.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "ste_sign",
    "approx_sign",
    "BinaryKernel",
    "Quantizer",
    "InputQuantizer",
    "KernelQuantizer",
    "SteSign",
    "ApproxSign",
    "XnorWeight",
    "BinaryDomainWeight",
    "get",
    "register",
    "available",
    "display_name",
]

_REGISTRY: Registry = Registry("quantizer", "quantizers")
#: Class decorator: make a quantizer resolvable as ``get(alias)``.
register = _REGISTRY.register
#: The registered quantizer aliases, sorted.
available = _REGISTRY.available


def _sign(x: Tensor) -> Tensor:
    # torch.sign(0) == 0; binary networks need sign(0) == +1. Shifting {-1, 0, +1} by 1/2 and
    # taking the sign again fixes the zeros (and -0.0) in two in-place passes: on CPU this is
    # about 20x faster than torch.where(x >= 0, 1, -1), which dominated the binary step.
    return torch.sign(x).add_(0.5).sign_()


@functools.lru_cache(maxsize=None)
def _open_bound(clip_value: float, dtype: torch.dtype) -> float:
    # The smallest value of ``dtype`` above ``clip_value``: |x| < it  <=>  |x| <= clip_value,
    # so aten's hardtanh_backward (open interval, one fused pass) computes the clipped STE's
    # closed interval. Closed matters: weights clipped to exactly +-1 must keep their gradient.
    c = torch.tensor(clip_value, dtype=dtype)
    return torch.nextafter(c, torch.tensor(float("inf"), dtype=dtype)).item()


class _SteSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, clip_value: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.clip_value = clip_value
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        if torch.compiler.is_compiling():  # inductor fuses the plain formula into one pass
            return grad * (x.abs() <= ctx.clip_value).to(grad.dtype), None
        bound = _open_bound(ctx.clip_value, x.dtype)
        return torch.ops.aten.hardtanh_backward(grad, x, -bound, bound), None


class _ApproxSignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        # max(0, 2 - 2|x|) * grad with one temporary, updated in place.
        return x.abs().mul_(-2.0).add_(2.0).clamp_(min=0.0).mul_(grad)


def ste_sign(x: Tensor, clip_value: float = 1.0) -> Tensor:
    r"""Sign with the clipped straight-through estimator (Hubara et al., 2016).

    forward: :math:`q(x) = +1` if :math:`x \ge 0` else :math:`-1`;
    gradient: :math:`\partial q / \partial x = 1_{|x| \le c}` with ``c = clip_value``.
    """
    return _SteSignFn.apply(x, clip_value)


def approx_sign(x: Tensor) -> Tensor:
    r"""Sign with Bi-Real Net's ApproxSign gradient (Liu et al., ECCV 2018).

    forward: :math:`q(x) = \mathrm{sign}(x)` (``sign(0) = +1``);
    gradient: :math:`\partial q / \partial x = \max(0, 2 - 2|x|)`.
    """
    return _ApproxSignFn.apply(x)


@dataclass(frozen=True)
class BinaryKernel:
    r"""A binary layer's kernel as it is deployed: one bit per weight, and what the bits stand for.

    Filter ``k``'s weights are ``upper`` where ``bits`` is set, else ``lower``, times ``scale[k]``
    (``None``: 1) applied after the convolution: the value set is ``{lower, upper}`` times a
    per-filter scale.

    Attributes:
        bits: ``bool``, the latent weight's shape, ``True`` at the upper value.
        lower, upper: the two values, ``lower <= upper``.
        scale: ``[out]`` per-filter scale, or ``None``.
    """

    bits: Tensor
    lower: float
    upper: float
    scale: Optional[Tensor] = None

    def kernel(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The kernel's values: ``upper`` where ``bits``, else ``lower``."""
        levels = torch.tensor([self.lower, self.upper], dtype=dtype, device=self.bits.device)
        return levels[self.bits.long()]

    @property
    def symmetric(self) -> bool:
        """Whether the values are ``{-s, +s}`` with ``s > 0``: a sign times a scale, what an XNOR
        engine (Larq Compute Engine's ``LceBconv2d``) computes."""
        return self.upper > 0 and self.lower == -self.upper

    @classmethod
    def from_values(cls, kernel: Tensor, scale: Optional[Tensor], quantizer: str) -> "BinaryKernel":
        """The kernel read off its values, which must be at most two.

        Raises:
            ValueError: naming ``quantizer`` when ``kernel`` takes more than two values.
        """
        kernel = kernel.detach()
        values = torch.unique(kernel)
        if values.numel() > 2:
            shown = ", ".join(f"{v:.4g}" for v in values[:4].tolist()) + (", ..." if values.numel() > 4 else "")
            raise ValueError(f"kernel quantizer {quantizer} gives {values.numel()} distinct kernel values "
                             f"({shown}), not two")
        lower, upper = (float(values[0]), float(values[-1])) if values.numel() else (-1.0, 1.0)
        return cls(kernel == upper, lower, upper, None if scale is None else scale.detach())


class Quantizer(nn.Module):
    """What every quantizer declares, for the exports, the report and the rebuild.

    Attributes:
        precision: bits per quantised value (larq's name); 1 for a binary quantizer.
    """

    precision: int = 1

    def learned_parameters(self) -> Tuple[str, ...]:
        """The constructor arguments that training learns (BDG's ``tau``, ``phi``). They travel
        with the weights, so the config that rebuilds the quantizer leaves them out. Default: the
        quantizer's own parameters."""
        return tuple(name for name, _ in self.named_parameters(recurse=False))


class InputQuantizer(Quantizer):
    """Base of activation quantizers: ``forward(x)`` maps a tensor to ``{-1, +1}``.

    Attributes:
        is_sign: ``True`` when ``forward`` is exactly ``sign(x)`` with ``sign(0) = +1`` (whatever
            its gradient): what Larq Compute Engine's ``LceQuantize`` computes, so the LCE export
            can lower it. ``False`` (the default) is refused there by name.
    """

    is_sign: bool = False


class KernelQuantizer(Quantizer):
    """Base of kernel quantizers: ``forward(weight, in_mask=None) -> (kernel, out_scale)``.

    Attributes:
        value_set: the kernel's values in words, for messages (``"{-1, +1} x mean|W_k|"``).
    """

    value_set: str = "two values"

    def export(self, weight: Tensor) -> BinaryKernel:
        """The deployed kernel of the latent ``weight``, every input channel kept (a pruned layer's
        are). Default: ``forward``'s kernel and scale, read by :meth:`BinaryKernel.from_values`.

        Raises:
            ValueError: naming the quantizer, when its kernel takes more than two values.
        """
        with torch.no_grad():
            out = self(weight, in_mask=None)
        kernel, scale = out if isinstance(out, tuple) else (out, None)
        return BinaryKernel.from_values(kernel, scale, display_name(self))


@register("ste_sign")
class SteSign(InputQuantizer):
    """Activation quantizer :func:`ste_sign` as a module."""

    is_sign = True

    def __init__(self, clip_value: float = 1.0) -> None:
        super().__init__()
        if clip_value <= 0:
            raise ValueError(f"clip_value must be > 0, got {clip_value}")
        self.clip_value = float(clip_value)

    def forward(self, x: Tensor) -> Tensor:
        return ste_sign(x, self.clip_value)

    def extra_repr(self) -> str:
        return f"clip_value={self.clip_value}"


@register("approx_sign")
class ApproxSign(InputQuantizer):
    """Activation quantizer :func:`approx_sign` as a module."""

    is_sign = True

    def forward(self, x: Tensor) -> Tensor:
        return approx_sign(x)


def _masked_mean(x: Tensor, in_mask: Optional[Tensor], dims: Tuple[int, ...]) -> Tensor:
    """Mean of ``x`` over ``dims``, counting only input channels (dim 1) where ``in_mask`` is 1
    (``[in]``, or ``[out, in]`` when each filter reads its own channels: a grouped conv).

    Accumulated in float64 and rounded back: a float32 sum's rounding depends on how many terms
    the reduction sees, so a masked layer and its sliced twin would get scales an ulp apart, and
    one ulp flips ``sign`` of a value that is exactly 0 in exact arithmetic (an SE input whose
    integer sums cancel). Float64 sums of float32 weights are exact in practice, whatever the
    number of zeros in them.
    """
    x64 = x.double()
    if in_mask is None:
        return x64.mean(dim=dims, keepdim=True).to(x.dtype)
    lead = tuple(in_mask.shape) if in_mask.dim() == 2 else (1, -1)
    m = in_mask.detach().double().view(*lead, *([1] * (x.dim() - 2))).expand_as(x)
    return ((x64 * m).sum(dim=dims, keepdim=True) / m.sum(dim=dims, keepdim=True).clamp(min=1.0)).to(x.dtype)


@register("xnor")
class XnorWeight(KernelQuantizer):
    r"""XNOR-Net weight binariser (Rastegari et al., ECCV 2016).

    forward: :math:`W_b = \alpha_k \, \mathrm{sign}(W_k)` with
    :math:`\alpha_k = \mathrm{mean}|W_k|` per output filter ``k``; returned as
    ``(sign(W), alpha)`` so the scale is applied after the convolution.
    With ``center=True`` the latent weight is first centred over its input channels,
    :math:`W \leftarrow W - \mathrm{mean}_{in}(W)`, as the Main/Subsidiary code does.
    gradient: straight-through to ``W`` inside ``[-clip_value, clip_value]``, plus the
    gradient through :math:`\alpha`.
    """

    value_set = "{-1, +1} x mean|W_k|"

    def __init__(self, center: bool = False, clip_value: float = 1.0) -> None:
        super().__init__()
        self.center = bool(center)
        self.clip_value = float(clip_value)

    def forward(self, weight: Tensor, in_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self.center:
            weight = weight - _masked_mean(weight, in_mask, dims=(1,))
        alpha = _masked_mean(weight.abs(), in_mask, dims=tuple(range(1, weight.dim())))
        return ste_sign(weight, self.clip_value), alpha.flatten()

    def export(self, weight: Tensor) -> BinaryKernel:
        with torch.no_grad():
            kernel, alpha = self(weight)
        return BinaryKernel(kernel > 0, -1.0, 1.0, alpha)

    def extra_repr(self) -> str:
        return f"center={self.center}, clip_value={self.clip_value}"


@register("bdg")
class BinaryDomainWeight(KernelQuantizer):
    r"""Generalised binary domain (Schiavone, Galati, Zuluaga, ECML-PKDD 2023).

    forward: :math:`W_b = \tau \, \mathrm{sign}(W) + \phi`, i.e. the two values
    :math:`\{\phi - \tau, \phi + \tau\}`, with learnable per-layer :math:`\tau` (init 1) and
    :math:`\phi` (init 0). With ``zero_lower=True``, :math:`\phi` is tied to :math:`\tau`, giving
    the sparse domain :math:`\{0, 2\tau\}`: a weight at the lower value is an exact zero, and a
    filter whose weights all sit there can be removed.
    gradient: straight-through to ``W`` inside ``[-clip_value, clip_value]``; ``tau`` and ``phi``
    get their exact gradients.
    """

    def __init__(self, tau: float = 1.0, phi: float = 0.0, zero_lower: bool = False, clip_value: float = 1.0) -> None:
        super().__init__()
        self.tau = nn.Parameter(torch.tensor(float(tau)))
        self.zero_lower = bool(zero_lower)
        # A tied phi is not a parameter: it must not drift away from tau.
        self.phi = None if self.zero_lower else nn.Parameter(torch.tensor(float(phi)))
        self.clip_value = float(clip_value)

    def forward(self, weight: Tensor, in_mask: Optional[Tensor] = None) -> Tuple[Tensor, None]:
        phi = self.tau if self.phi is None else self.phi
        return self.tau * ste_sign(weight, self.clip_value) + phi, None

    @property
    def value_set(self) -> str:
        return "{0, 2 tau}" if self.zero_lower else "{phi - tau, phi + tau}"

    @torch.no_grad()
    def export(self, weight: Tensor) -> BinaryKernel:
        phi = self.tau if self.phi is None else self.phi
        # The two values in the parameters' dtype, rounded as forward's tau * (+-1) + phi is.
        return BinaryKernel(ste_sign(weight, self.clip_value) > 0, float(phi - self.tau), float(self.tau + phi))

    def upper_share(self, weight: Tensor) -> Tensor:
        r"""Share of weights at the upper value, :math:`\#(W \ge 0) / \#W`, differentiable
        through the straight-through sign (the quantity BDG's sparsity constraint bounds)."""
        return ((ste_sign(weight, self.clip_value) + 1.0) / 2.0).mean()

    def extra_repr(self) -> str:
        return f"zero_lower={self.zero_lower}, clip_value={self.clip_value}"


Identifier = Union[str, nn.Module, Callable[[Tensor], Tensor], None]


def get(identifier: Identifier, **kwargs) -> Optional[nn.Module]:
    """Resolve a quantizer from an alias, an instance or a callable.

    ``None`` stays ``None`` (no quantization). A string is looked up in the registry and
    instantiated with ``kwargs`` (a bad keyword is a ``TypeError``); an ``nn.Module`` is
    returned as it is and a plain callable wrapped in a module (``kwargs`` are for aliases). Anything else raises ``ValueError`` naming the registered aliases.
    """
    if identifier is None or isinstance(identifier, nn.Module):
        return identifier
    if isinstance(identifier, str):
        return _REGISTRY.create(identifier, **kwargs)
    if callable(identifier):
        return _Lambda(identifier)
    raise ValueError(
        f"Cannot interpret {identifier!r} (type {type(identifier).__name__}) as a quantizer; "
        f"pass one of {', '.join(available())}, an nn.Module or a callable"
    )


class _Lambda(InputQuantizer, KernelQuantizer):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, in_mask: Optional[Tensor] = None):
        # A plain callable sees only the tensor; mask-aware statistics are for registered ones.
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def display_name(quantizer: Optional[nn.Module]) -> str:
    """How messages name a quantizer: ``'alias' (Class)`` when registered, else its class (or the
    wrapped callable's name)."""
    if quantizer is None:
        return "None"
    if isinstance(quantizer, _Lambda):
        return f"callable {quantizer.extra_repr()}"
    alias = vars(type(quantizer)).get("alias")  # not a registered parent's
    return f"{alias!r} ({type(quantizer).__name__})" if alias else type(quantizer).__name__
