"""Turn a network's convolutions into binary ones, keeping the trained weights as latent weights.

This is the plain-function form of the :class:`~lightning_bnnprune.Binarize` callback, for use
outside Lightning. The first convolution and the classifier stay full precision (standard practice
in every paper this library follows); they are found from the model (timm's ``pretrained_cfg`` and
``get_classifier()``), falling back to the first conv and the last linear layer, never by
hard-coded names.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Iterable, List, Optional, Set

from torch import nn

from . import quantizers
from .introspect import classifier_names, first_conv_name
from .layers import BinaryConv2d

__all__ = ["binarize_model", "binary_layers", "full_precision_names", "replace_relus", "RELU_REPLACEMENTS"]


def full_precision_names(model: nn.Module, keep_fp: Iterable[str] = ()) -> Set[str]:
    """Names of the modules that stay full precision: first conv, classifier, ``keep_fp`` matches.

    ``keep_fp`` holds ``fnmatch`` patterns over module names (``"*.se.*"``, ``"head.*"``).
    """
    keep = {n for n in [first_conv_name(model)] if n is not None} | classifier_names(model)
    patterns = list(keep_fp)
    names = [n for n, _ in model.named_modules()]
    for n in names:
        if any(n == k or n.startswith(k + ".") for k in keep if k):
            keep.add(n)
        if any(fnmatch.fnmatchcase(n, p) for p in patterns):
            keep.add(n)
    return keep


def _make_quantizer(identifier: quantizers.Identifier, kwargs: dict):
    if isinstance(identifier, nn.Module):
        return copy.deepcopy(identifier)  # learnable quantizers (BDG) are per layer
    return quantizers.get(identifier, **kwargs)


# What replaces a ReLU in front of a binary conv. sign(relu(x)) is +1 everywhere (sign(0) = +1),
# so a ReLU before the input quantizer erases every activation bit; binary networks drop it
# (Bi-Real Net: the sign is the only non-linearity) or clip instead (XNOR-Net's hardtanh).
RELU_REPLACEMENTS = {"identity": nn.Identity, "hardtanh": nn.Hardtanh}
REPLACED_RELU_ATTR = "bnnprune_replaced_relu"


def replace_relus(
    model: nn.Module, replacement: str, keep: Iterable[str] = (), names: Optional[Iterable[str]] = None
) -> List[str]:
    """Replace every ``nn.ReLU`` / ``nn.ReLU6`` of ``model`` outside the ``keep`` modules (or
    exactly the modules ``names``), in place.

    The new modules carry the attribute ``bnnprune_replaced_relu`` so that a saved record can
    replay the same replacement. Returns the replaced names.
    """
    if replacement not in RELU_REPLACEMENTS:
        raise ValueError(f"Unknown relu replacement {replacement!r}; choose one of: {', '.join(RELU_REPLACEMENTS)} or None")
    if names is None:
        keep = set(keep)
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6)) and n not in keep]
    names = list(names)
    for name in names:
        new = RELU_REPLACEMENTS[replacement]()
        setattr(new, REPLACED_RELU_ATTR, replacement)
        model.set_submodule(name, new)
    return names


def binarize_model(
    model: nn.Module,
    input_quantizer: quantizers.Identifier = "ste_sign",
    kernel_quantizer: quantizers.Identifier = "xnor",
    keep_fp: Iterable[str] = (),
    input_quantizer_kwargs: Optional[dict] = None,
    kernel_quantizer_kwargs: Optional[dict] = None,
    relu: Optional[str] = "identity",
) -> List[str]:
    """Swap every eligible ``nn.Conv2d`` of ``model`` for a :class:`BinaryConv2d`, in place.

    Eligible: every conv except the first, those inside the classifier and those matching
    ``keep_fp``. Convs already binary are left as they are, so calling it twice is harmless.
    With binary inputs, the ReLUs outside the full-precision modules are replaced by ``relu``
    (``"identity"`` or ``"hardtanh"``; ``None`` keeps them), see :data:`RELU_REPLACEMENTS`.

    Returns:
        the names of the swapped layers, in module order.

    Raises:
        ValueError: on an unknown quantizer or relu replacement (the message lists the choices).
    """
    if relu is not None and relu not in RELU_REPLACEMENTS:
        raise ValueError(f"Unknown relu replacement {relu!r}; choose one of: {', '.join(RELU_REPLACEMENTS)} or None")
    # Resolve once up front so a bad name fails before anything is swapped.
    _make_quantizer(input_quantizer, input_quantizer_kwargs or {})
    if _make_quantizer(kernel_quantizer, kernel_quantizer_kwargs or {}) is None:
        raise ValueError(f"kernel_quantizer is required; registered: {', '.join(quantizers.available())}")
    keep = full_precision_names(model, keep_fp)
    targets = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not isinstance(m, BinaryConv2d) and n not in keep
    ]
    for name in targets:
        conv = model.get_submodule(name)
        binary = BinaryConv2d.from_conv(
            conv,
            input_quantizer=_make_quantizer(input_quantizer, input_quantizer_kwargs or {}),
            kernel_quantizer=_make_quantizer(kernel_quantizer, kernel_quantizer_kwargs or {}),
        )
        model.set_submodule(name, binary)
    if relu is not None and input_quantizer is not None and binary_layers(model):
        replace_relus(model, relu, keep)
    return targets


def binary_layers(model: nn.Module) -> List[str]:
    """Names of the :class:`BinaryConv2d` layers of ``model``, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, BinaryConv2d)]
