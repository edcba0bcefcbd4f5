"""Export targets: the file formats a trained (pruned) network is written in, by name.

The app's ``export=<name>`` picks one (``bnnprune export=packed``); in Python,
``export_targets.get("onnx")(network, "model.onnx", (3, 32, 32))``. A target is a function
``(network, path, input_size, record=None)`` that writes one file at ``path`` (which ends in the
target's ``suffix``) and returns ``path``; ``input_size`` is ``(C, H, W)`` of one image, ``record``
the network's :class:`~lightning_bnnprune.pruning.record.PruningRecord` (``None``: nothing was cut).

Registered:

- ``packed`` (``.bnn``): :func:`~lightning_bnnprune.pruning.export.export_packed`, 8 binary weights
  per byte, reloaded bit-exactly by :func:`~lightning_bnnprune.pruning.export.load_packed`;
- ``onnx`` (``.onnx``): ``torch.onnx.export`` (TorchScript exporter), batch size free;
- ``lce`` (``.tflite``): :func:`~lightning_bnnprune.pruning.export_lce.export_lce`, for Larq
  Compute Engine (the ``lce`` extra).

This module imports neither torch nor the exporters until a target runs (each imports its own),
so the app can check ``export=`` and print its choices in about a second.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple

from .registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from .pruning.record import PruningRecord

__all__ = ["ExportTarget", "available", "get", "register"]

#: ``(network, path, input_size, record=None) -> path``
ExportTarget = Callable[..., str]

_REGISTRY: Registry = Registry("export target", "export targets")
#: The registered target names, sorted.
available = _REGISTRY.available


def register(alias: str, suffix: str, label: Optional[str] = None) -> Callable[[ExportTarget], ExportTarget]:
    """Function decorator: make ``fn`` the export target ``alias``, writing ``*<suffix>`` files.

    ``label`` names the file in the app's summary (default ``"<alias> model"``).
    """

    def wrap(fn: ExportTarget) -> ExportTarget:
        fn.suffix = suffix
        fn.label = label or f"{alias} model"
        return _REGISTRY.register(alias)(fn)

    return wrap


def get(alias: str) -> ExportTarget:
    """The target registered as ``alias``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    return _REGISTRY[alias]


@register("packed", suffix=".bnn", label="packed model")
def packed(network: "nn.Module", path: str, input_size: Sequence[int],
           record: Optional["PruningRecord"] = None) -> str:
    """Bit-packed binary kernels and float32 rest (:func:`~.pruning.export.export_packed`)."""
    from .pruning.export import export_packed

    export_packed(network, path, record)
    return path


@register("onnx", suffix=".onnx", label="ONNX model")
def onnx(network: "nn.Module", path: str, input_size: Sequence[int],
         record: Optional["PruningRecord"] = None) -> str:
    """ONNX through torch's TorchScript exporter (it inlines the sign's autograd function; the
    dynamo exporter needs onnxscript), input ``x`` and output ``logits`` with a free batch size."""
    import warnings

    import torch

    x = torch.zeros(1, *_chw(input_size), device=next(iter(network.parameters()), torch.zeros(())).device)
    was_training = network.training
    network.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(network, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        network.train(was_training)
    return path


@register("lce", suffix=".tflite", label="LCE model")
def lce(network: "nn.Module", path: str, input_size: Sequence[int],
        record: Optional["PruningRecord"] = None) -> str:
    """Larq Compute Engine's ``.tflite`` (:func:`~.pruning.export_lce.export_lce`)."""
    from .pruning.export_lce import export_lce

    export_lce(network, path, input_size=_chw(input_size))
    return path


def _chw(input_size: Sequence[int]) -> Tuple[int, int, int]:
    size = tuple(int(v) for v in input_size)
    if len(size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {size}")
    return size  # type: ignore[return-value]
