"""lightning-bnnprune: structured filter pruning for binary neural networks, as Lightning callbacks."""
from . import models  # registers the CIFAR networks in timm's registry
from . import quantizers
from .binarize import binarize_model
from .callbacks import Binarize, FilterPruning, GreedyFilterPruning, ZeroFilterPruning
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
    "NpzDataModule",
    "ZeroFilterPruning",
    "binarize_model",
    "create_datamodule",
    "quantizers",
    "__version__",
]
