"""Rebuilding a pruned network from its record: what a record says about the network (its shape
manifest, its binarisation, its timm name), binarising a fresh network as recorded, and replaying
the cuts.

The replay (:func:`replay`) slices tensors by name (:func:`~.slicing.slice_channels`), without
tracing the model again; the model's shapes are checked against the record's manifests before
and after, so a wrong architecture is a one-line ``ValueError``, never a size-mismatch traceback
from ``load_state_dict``.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor, nn

from .. import quantizers
from ..binarize import REPLACED_RELU_ATTR, binary_layers, replace_relus
from ..introspect import first_conv_name
from ..layers import BinaryConv2d
from .block_sizes import sync_block_sizes
from .gates import is_gate_key
from .slicing import slice_channels

if TYPE_CHECKING:  # the record only travels through here (no import cycle with record.py)
    from .record import PruningRecord

__all__ = ["binarize_spec", "describe_quantizer", "rebuild", "replay", "shape_manifest", "timm_spec"]


def shape_manifest(model: nn.Module) -> Dict[str, List[int]]:
    """``{state_dict key: shape}`` of ``model``, without filter gates (they are not the network)."""
    return {k: list(v.shape) for k, v in model.state_dict().items() if not is_gate_key(k)}


def _diff(model: nn.Module, expected: Mapping[str, Sequence[int]]) -> List[str]:
    have = shape_manifest(model)
    lines = [f"{k}: model {have.get(k)}, record {list(v)}" for k, v in expected.items() if have.get(k) != list(v)]
    lines += [f"{k}: in the model, not in the record" for k in have if k not in expected]
    return lines


def _mismatch(model: nn.Module, expected: Mapping[str, Sequence[int]], what: str) -> None:
    lines = _diff(model, expected)
    if lines:
        more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
        raise ValueError(
            f"the model does not match the pruning record {what}: " + "; ".join(lines[:5]) + more
        )


def replay(model: nn.Module, record: PruningRecord) -> nn.Module:
    """Cut ``model`` (an unpruned network of the recorded architecture) as ``record`` says.

    The model's shapes are checked against the record's manifest before anything is cut, so a
    model of the wrong architecture, width or binarisation is a ``ValueError`` that names the
    first mismatching tensors, never a size-mismatch traceback from ``load_state_dict``. A model
    that already has the pruned shapes is returned as it is (replaying twice is harmless).
    """
    if not _diff(model, record.shapes):
        return model
    _mismatch(model, record.shapes_before, "before the removal")
    for name, dim, kept in record.removed:
        slice_channels(model.get_submodule(name), dim, kept)
    sync_block_sizes(model)  # split / slice positions kept in block attributes follow the new widths
    _mismatch(model, record.shapes, "after replaying it")
    return model


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach())
    return value if isinstance(value, (bool, int, float, str, type(None))) else None


def describe_quantizer(q: Optional[nn.Module]) -> Tuple[bool, Optional[str], Dict[str, Any]]:
    """``(ok, alias, kwargs)`` that rebuild quantizer ``q`` through :func:`quantizers.get`; the
    parameters it declares learned (``learned_parameters()``) are left out: they come with the
    weights."""
    if q is None:
        return True, None, {}
    alias = getattr(type(q), "alias", None)
    if alias is None or alias not in quantizers.available():
        return False, None, {}
    learned = set(q.learned_parameters()) if isinstance(q, quantizers.Quantizer) else set()
    kwargs = {}
    for p in inspect.signature(type(q).__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(q, p.name):
            continue
        if p.name in learned:
            continue
        value = _plain(getattr(q, p.name))
        if value is not None:
            kwargs[p.name] = value
    return True, alias, kwargs


def binarize_spec(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The :class:`BinaryConv2d` layers of ``model`` and their quantizers, or ``None`` when they
    differ between layers or are not registered (then the network cannot be rebuilt by name)."""
    spec: Optional[Dict[str, Any]] = None
    for name in binary_layers(model):
        layer = model.get_submodule(name)
        ok_in, in_alias, in_kwargs = describe_quantizer(layer.input_quantizer)
        ok_k, k_alias, k_kwargs = describe_quantizer(layer.kernel_quantizer)
        if not (ok_in and ok_k):
            return None
        this = dict(input_quantizer=in_alias, input_quantizer_kwargs=in_kwargs,
                    kernel_quantizer=k_alias, kernel_quantizer_kwargs=k_kwargs)
        if spec is None:
            spec = dict(this, layers=[])
        elif any(spec[k] != v for k, v in this.items()):
            return None
        spec["layers"].append(name)
    if spec is not None:  # ReLUs that binarize_model replaced (see binarize.RELU_REPLACEMENTS)
        spec["relus"] = {n: getattr(m, REPLACED_RELU_ATTR) for n, m in model.named_modules()
                         if hasattr(m, REPLACED_RELU_ATTR)}
    return spec


def timm_spec(model: nn.Module) -> Tuple[Optional[str], Dict[str, Any]]:
    """timm's architecture name and the shape-relevant keywords this library can read back
    (``num_classes``, ``in_chans``). Other constructor keywords cannot be read from a built
    model: pass them to :func:`~lightning_bnnprune.pruning.surgery.remove_filters` as
    ``timm_kwargs`` (a wrong guess is caught by the manifest check at load time)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        return None, {}
    kwargs: Dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    first = first_conv_name(model)
    if first is not None:
        kwargs["in_chans"] = model.get_submodule(first).in_channels
    return name, kwargs


def _binarize_as_recorded(model: nn.Module, spec: Dict[str, Any]) -> None:
    for name in spec["layers"]:
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no layer {name!r} that the record binarised") from None
        if isinstance(conv, BinaryConv2d):
            continue
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"the record binarised {name!r}, but the model's {name!r} is a {type(conv).__name__}")
        model.set_submodule(name, BinaryConv2d.from_conv(
            conv,
            input_quantizer=quantizers.get(spec["input_quantizer"], **spec["input_quantizer_kwargs"]),
            kernel_quantizer=quantizers.get(spec["kernel_quantizer"], **spec["kernel_quantizer_kwargs"]),
        ))
    for name, replacement in spec.get("relus", {}).items():
        replace_relus(model, replacement, names=[name])


def rebuild(record: PruningRecord, model: Optional[nn.Module] = None) -> nn.Module:
    """The pruned network's module tree (weights not loaded): ``model`` if given, else
    ``timm.create_model(record.timm_name, **record.timm_kwargs)``; binarised as recorded if it has
    no binary layer yet; then cut by :func:`replay`.

    Raises:
        ValueError: when there is nothing to rebuild from, or the model does not match the record.
    """
    if model is None:
        if record.timm_name is None or record.binarize_kwargs is None:
            raise ValueError(
                "the pruning record cannot rebuild the network by itself "
                f"(timm_name={record.timm_name!r}, binarize_kwargs={'set' if record.binarize_kwargs else None}): "
                "pass model=<a freshly built network of the same architecture>"
            )
        import timm

        from .. import models  # noqa: F401  registers the CIFAR networks the record may name

        model = timm.create_model(record.timm_name, pretrained=False, **record.timm_kwargs)
    if not binary_layers(model):
        if record.binarize_kwargs is None:
            raise ValueError("the record does not say how the network was binarised: pass a binarised model=")
        _binarize_as_recorded(model, record.binarize_kwargs)
    elif record.binarize_kwargs is not None:
        have, want = set(binary_layers(model)), set(record.binarize_kwargs["layers"])
        if have != want:
            diff = sorted(have ^ want)[:5]
            raise ValueError(f"the model's binary layers differ from the record's, e.g. {diff}")
    return replay(model, record)
