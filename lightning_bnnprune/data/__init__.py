"""LightningDataModules for image classification, resolved by name.

Every datamodule shares :class:`ImageDataModule`: ``batch_size``, ``num_workers``, a seeded
validation split carved from the training data (``val_split``), CIFAR-style augmentation toggled
by ``augment`` and per-dataset normalisation. ``num_classes`` is known before ``setup`` so a model
can be sized from it.

Small datasets (digits, npz, CIFAR, fake) are held in memory as one tensor and augmented per
batch (one vectorised random crop + flip per batch instead of thousands of per-image transform
calls, which cost more than a small model's step on a CPU). Image folders are read per image with
torchvision transforms.

Example::

    from lightning import Trainer
    from lightning_bnnprune.data import create_datamodule

    dm = create_datamodule("digits", batch_size=64)
    Trainer(max_epochs=1).fit(model, datamodule=dm)
"""
from lightning_bnnprune.data.base import (
    ImageDataModule,
    RandomCropFlip,
    TensorImageDataset,
    create_datamodule,
    list_datamodules,
    register_datamodule,
)
from lightning_bnnprune.data.image_folder import ImageFolderDataModule
from lightning_bnnprune.data.in_memory import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FakeDataModule,
    NpzDataModule,
)
from lightning_bnnprune.stats import CIFAR10_MEAN, CIFAR10_STD

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "RandomCropFlip",
    "TensorImageDataset",
    "ImageDataModule",
    "DigitsDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "NpzDataModule",
    "ImageFolderDataModule",
    "FakeDataModule",
    "register_datamodule",
    "list_datamodules",
    "create_datamodule",
]
