"""lightning-bnnprune: structured filter pruning for binary neural networks, as Lightning callbacks."""
from . import models  # registers the CIFAR networks in timm's registry
from . import quantizers
from .binarize import binarize_model
from .callbacks import Binarize, FilterPruning, GreedyFilterPruning, MainSubsidiaryPruning, ZeroFilterPruning
from .data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FakeDataModule,
    ImageFolderDataModule,
    NpzDataModule,
    create_datamodule,
)
from .layers import BinaryConv2d
from .module import ImageClassifier
from .pruning.export import export_packed, load_packed
from .pruning.export_lce import export_lce, lce_predict
from .pruning.record import PruningRecord, load_pruned, restore_pruned, save_pruned
from .pruning.report import compression_report
from .pruning.surgery import remove_filters

__version__ = "0.1.0"

__all__ = [
    "Binarize",
    "BinaryConv2d",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FakeDataModule",
    "FilterPruning",
    "GreedyFilterPruning",
    "ImageClassifier",
    "ImageFolderDataModule",
    "MainSubsidiaryPruning",
    "NpzDataModule",
    "PruningRecord",
    "ZeroFilterPruning",
    "binarize_model",
    "compression_report",
    "create_datamodule",
    "export_lce",
    "export_packed",
    "lce_predict",
    "load_packed",
    "load_pruned",
    "quantizers",
    "remove_filters",
    "restore_pruned",
    "save_pruned",
    "__version__",
]
