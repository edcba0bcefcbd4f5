"""lightning-bnnprune: structured filter pruning for binary neural networks, as Lightning callbacks.

The public names below load on first use (PEP 562), so that ``import lightning_bnnprune.config``
(all the ``bnnprune`` app needs to print a config or report a configuration mistake) does not
import torch, timm and Lightning.

The CIFAR networks (``resnet20_cifar``, ...) are in timm's registry as soon as both this package
and timm are imported, in either order, as a timm plugin's are: at once if timm is already
loaded, else right after timm loads (a one-shot import hook, :class:`_RegisterWithTimm`), so
importing this package alone still loads neither torch nor timm.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Optional, Sequence

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


# ------------------------------------------------------------------ timm registration on import
def _register_cifar_models() -> None:
    importlib.import_module(".models", __name__)


class _RegisterWithTimm(importlib.abc.MetaPathFinder):
    """Registers the CIFAR networks right after ``timm`` itself has loaded.

    Finds nothing itself: when ``timm`` is looked up, it takes the spec the other finders give
    and wraps its loader, so that ``timm`` executes as usual and :mod:`lightning_bnnprune.models`
    is imported straight after (still inside the user's ``import timm``). One-shot: it leaves
    ``sys.meta_path`` when ``timm`` executes (a mere ``importlib.util.find_spec("timm")``, as
    availability checks do, leaves it in place).
    """

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "timm":
            return None
        others = (f for f in sys.meta_path if f is not self and hasattr(f, "find_spec"))
        spec = next((s for s in (f.find_spec(fullname, path, target) for f in others) if s is not None), None)
        if spec is None:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterExec(spec.loader, self)
        return spec


class _RegisterAfterExec(importlib.abc.Loader):
    """``timm``'s own loader, then :func:`_register_cifar_models`; the module keeps its loader."""

    def __init__(self, loader: importlib.abc.Loader, hook: _RegisterWithTimm) -> None:
        self.loader, self.hook = loader, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if self.hook in sys.meta_path:
            sys.meta_path.remove(self.hook)
        module.__loader__ = self.loader  # what timm's module would have had without the hook
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _register_cifar_models()

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self.loader, name)


# --------------------------------------------------------------------- known third-party noise
#: Warnings that Lightning (2.6) raises on every fit because newer torch (2.14 here) deprecates
#: what it calls, which the user cannot act on: (message, category, module that warns).
#: CombinedLoader builds torch's `LeafSpec()` (lightning/pytorch/utilities/_pytree.py:21), and
#: `strategy.all_gather` (MainSubsidiaryPruning's check that every DDP rank has the same gates)
#: calls `torch.distributed.nn.functional.all_gather`. Only these, for the app and the callbacks
#: alike: every other warning shows as before.
_KNOWN_THIRD_PARTY_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     r"lightning\.pytorch\.utilities\._pytree$"),
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", FutureWarning,
     r"lightning\.fabric\.utilities\.distributed$"),
)
for _message, _category, _module in _KNOWN_THIRD_PARTY_WARNINGS:
    warnings.filterwarnings("ignore", message=_message, category=_category, module=_module)
del _message, _category, _module

if "timm" in sys.modules:
    _register_cifar_models()
elif not any(type(f).__name__ == _RegisterWithTimm.__name__ for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTimm())
