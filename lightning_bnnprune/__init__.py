"""lightning-bnnprune: structured filter pruning for binary neural networks, as Lightning callbacks.

The public names below load on first use (PEP 562), together with the CIFAR networks' timm
registration, so that ``import lightning_bnnprune.config`` (all the ``bnnprune`` app needs to print
a config or report a configuration mistake) does not import torch, timm and Lightning.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "models": None,  # a submodule: registers the CIFAR networks in timm's registry
    "quantizers": None,
    "binarize_model": ".binarize",
    "Binarize": ".callbacks",
    "FilterPruning": ".callbacks",
    "GreedyFilterPruning": ".callbacks",
    "MainSubsidiaryPruning": ".callbacks",
    "RandomStateCheckpoint": ".callbacks",
    "ZeroFilterPruning": ".callbacks",
    "CIFAR10DataModule": ".data",
    "CIFAR100DataModule": ".data",
    "DigitsDataModule": ".data",
    "FakeDataModule": ".data",
    "ImageFolderDataModule": ".data",
    "NpzDataModule": ".data",
    "create_datamodule": ".data",
    "BinaryConv2d": ".layers",
    "ImageClassifier": ".module",
    "export_lce": ".pruning.export_lce",
    "lce_predict": ".pruning.export_lce",
    "lce_latency": ".pruning.lce_runtime",
    "export_packed": ".pruning.export",
    "load_packed": ".pruning.export",
    "PruningRecord": ".pruning.record",
    "load_pruned": ".pruning.record",
    "restore_pruned": ".pruning.record",
    "save_pruned": ".pruning.record",
    "compression_report": ".pruning.report",
    "find_channel_groups": ".pruning.groups",  # what remove_filters needs
    "remove_filters": ".pruning.surgery",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _load() -> None:
    """Import every public name (and register the CIFAR networks, as an eager import did)."""
    importlib.import_module(".models", __name__)
    for name, module in _EXPORTS.items():
        if name not in globals():
            globals()[name] = (
                importlib.import_module(f".{name}", __name__) if module is None
                else getattr(importlib.import_module(module, __name__), name)
            )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS and _EXPORTS[name] is None:  # a submodule (`from . import quantizers` inside)
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
