"""Binary layers: ``nn.Conv2d`` subclasses that change only ``forward``.

Being a subclass keeps timm's, Torch-Pruning's and the user's ``isinstance(m, nn.Conv2d)`` checks
true, keeps ``weight``/``bias`` where every tool expects them (the latent real-valued weights), and
lets one layer stand in for any conv that timm builds (plain, depthwise, grouped, dilated, strided,
static or dynamic "same" padding, weight-standardised).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn

from . import quantizers

__all__ = ["BinaryConv2d"]

InputMask = Callable[[], Optional[Tensor]]


class BinaryConv2d(nn.Conv2d):
    r"""A convolution on binarised inputs and weights.

    forward: :math:`y = (q_{in}(x) \odot m_{in}) \circledast k(W) \cdot s(W) + b`, where
    ``q_in`` is the input quantizer (``ste_sign`` by default, ``None`` keeps the input real),
    ``(k, s) = kernel_quantizer(W)`` (XNOR by default: ``k = sign(W)``, ``s = mean|W|`` per
    output filter) and ``m_in`` an optional 0/1 mask over input channels. The input is quantised
    *before* padding, so padded positions are 0, as in every binary-network reference.

    The input mask is the seam for filter pruning: a per-filter gate upstream sets it through
    :meth:`set_input_mask`, so that a gated-off channel contributes exactly what a removed channel
    contributes, nothing (``sign(0) = +1`` would otherwise turn a zeroed channel into ones).

    Args:
        input_quantizer: alias, module or callable for the activations (see
            :func:`lightning_bnnprune.quantizers.get`).
        kernel_quantizer: alias, module or callable for the weights.
        same_padding: pad dynamically like TensorFlow's ``SAME`` (timm's ``Conv2dSame``).
        All other arguments are those of ``nn.Conv2d``.
    """

    def __init__(
        self,
        *args,
        input_quantizer: quantizers.Identifier = "ste_sign",
        kernel_quantizer: quantizers.Identifier = "xnor",
        same_padding: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.input_quantizer = quantizers.get(input_quantizer)
        self.kernel_quantizer = quantizers.get(kernel_quantizer)
        if self.kernel_quantizer is None:
            raise ValueError("BinaryConv2d needs a kernel_quantizer; registered: "
                             + ", ".join(quantizers.available()))
        self.same_padding = bool(same_padding)
        self._input_mask: Optional[InputMask] = None
        # Step 1 of two-step binarisation (ReActNet, Liu et al., ECCV 2020): binary inputs with
        # the latent real weights. Set by the Binarize callback from the training step, never saved.
        self.real_weights = False

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        input_quantizer: quantizers.Identifier = "ste_sign",
        kernel_quantizer: quantizers.Identifier = "xnor",
    ) -> "BinaryConv2d":
        """A binary copy of ``conv`` whose latent weights are ``conv``'s trained weights.

        timm's dynamic-"same" convs keep their padding behaviour. Weight-standardised convs
        (``StdConv2d``, ``ScaledStdConv2d``) lose the standardisation and its gain: the binary
        kernel has its own per-filter scale.
        """
        same = isinstance(conv, Conv2dSame) or type(conv).__name__.endswith("Same")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=0 if same else conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            input_quantizer=input_quantizer,
            kernel_quantizer=kernel_quantizer,
            same_padding=same,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        layer.weight.data.copy_(conv.weight.data)
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.data)
        layer.train(conv.training)
        return layer

    def set_input_mask(self, mask_fn: Optional[InputMask]) -> None:
        """Install (or, with ``None``, remove) a callable returning a ``[in_channels]`` 0/1 mask.

        A callable, not a tensor, so the mask follows a gate that is still learning. It is not a
        submodule: the gate's parameters belong to (and are saved with) the layer that owns them.
        """
        self._input_mask = mask_fn

    def input_mask(self) -> Optional[Tensor]:
        """The current ``[in_channels]`` 0/1 input mask, or ``None`` when no gate feeds this layer."""
        return self._input_mask() if self._input_mask is not None else None

    def kernel_mask(self, mask: Optional[Tensor] = None) -> Optional[Tensor]:
        """The input mask as the kernel quantizer sees it: ``[in]`` for ``groups=1``; for a grouped
        conv ``[out, in / groups]``, each filter's own conv group of the mask (its statistics run
        over the input channels it reads)."""
        mask = self.input_mask() if mask is None else mask
        if mask is None or self.groups == 1:
            return mask
        return mask.view(self.groups, -1).repeat_interleave(self.out_channels // self.groups, dim=0)

    def binarized_kernel(self) -> Tensor:
        """The effective binary weight ``k(W) * s(W)`` under the current input mask (for inspection
        and tests)."""
        kernel, scale = self.quantized_kernel(self.kernel_mask())
        return kernel if scale is None else kernel * scale.view(-1, 1, 1, 1)

    def quantized_kernel(self, in_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``(kernel, out_scale)`` from the kernel quantizer, the scale ``None`` when it has none;
        ``in_mask`` as :meth:`kernel_mask` gives it (``None``: every input channel)."""
        out = self.kernel_quantizer(self.weight, in_mask=in_mask)
        return out if isinstance(out, tuple) else (out, None)

    @torch.no_grad()
    def export_kernel(self) -> quantizers.BinaryKernel:
        """The kernel as deployed (bits, their two values, the per-filter scale), every input
        channel kept: the quantizer's :meth:`~lightning_bnnprune.quantizers.KernelQuantizer.export`,
        or, for a quantizer that is not a ``KernelQuantizer``, its kernel's values.

        Raises:
            ValueError: naming the quantizer, when the kernel takes more than two values.
        """
        if isinstance(self.kernel_quantizer, quantizers.KernelQuantizer):
            return self.kernel_quantizer.export(self.weight)
        kernel, scale = self.quantized_kernel()
        return quantizers.BinaryKernel.from_values(kernel, scale, quantizers.display_name(self.kernel_quantizer))

    def _cache_key(self, in_mask: Optional[Tensor]) -> tuple:
        # Everything the kernel depends on: the latent weight and the quantizer's own parameters
        # (BDG's tau/phi), by identity (surgery and .to() make new ones) and in-place version
        # (optimizer steps, clipping and load_state_dict's copy_ bump it), and the mask's values.
        params = (self.weight, *self.kernel_quantizer.parameters())
        return params, tuple(p._version for p in params), None if in_mask is None else in_mask.detach().clone()

    def _eval_kernel(self, in_mask: Optional[Tensor]):
        """``(kernel, scale)`` computed once in eval mode without autograd and reused until the
        weights, the quantizer's parameters or the input mask change."""
        params, versions, mask = key = self._cache_key(in_mask)
        cached = self.__dict__.get("_kernel_cache")
        if cached is not None:
            (old_params, old_versions, old_mask), value = cached
            same_mask = (old_mask is None and mask is None) or (
                old_mask is not None and mask is not None and torch.equal(old_mask, mask)
            )
            if same_mask and old_versions == versions and all(a is b for a, b in zip(old_params, params)):
                return value
        value = self.quantized_kernel(in_mask)
        # Held in __dict__, not as a buffer: never saved, moved or seen by state_dict.
        self.__dict__["_kernel_cache"] = (key, value)
        return value

    def clear_kernel_cache(self) -> None:
        """Drop the cached eval kernel (done automatically on ``train()`` and state-dict loads)."""
        self.__dict__.pop("_kernel_cache", None)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_kernel_cache", None)  # copies and pickles recompute it
        return state

    def train(self, mode: bool = True) -> "BinaryConv2d":
        self.clear_kernel_cache()
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.clear_kernel_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.clear_kernel_cache()  # .to(device / dtype) makes new weights
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        mask = self.input_mask()
        if mask is not None:
            x = x * mask.view(1, -1, 1, 1).to(x.dtype)
        if self.same_padding:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        if self.real_weights:
            return self._conv_forward(x, self.weight, self.bias)
        cache = not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        kernel_mask = self.kernel_mask(mask)
        kernel, scale = self._eval_kernel(kernel_mask) if cache else self.quantized_kernel(kernel_mask)
        if scale is None:
            return self._conv_forward(x, kernel, self.bias)
        if self.training:
            # The scale on the kernel (weight-sized) instead of the output (activation-sized):
            # the same function and gradients, three output-sized passes fewer per step.
            return self._conv_forward(x, kernel * scale.view(-1, 1, 1, 1), self.bias)
        # Eval keeps the scale after the convolution, so the conv of {-1, 0, +1} inputs with a
        # {-1, +1} kernel sums integers and a pruned layer matches its masked original bit for bit.
        y = self._conv_forward(x, kernel, None)
        if cache:  # no autograd: update the fresh output in place
            y = y.mul_(scale.view(1, -1, 1, 1))
            return y if self.bias is None else y.add_(self.bias.view(1, -1, 1, 1))
        y = y * scale.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (super().extra_repr() + (", same_padding=True" if self.same_padding else "")
                + (", real_weights=True" if self.real_weights else ""))
