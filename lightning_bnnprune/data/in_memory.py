"""Datasets held in memory as one uint8 tensor and augmented per batch: scikit-learn's digits,
CIFAR from an ``.npz`` pair or torchvision's files, and seeded fake images."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import datasets

from lightning_bnnprune.checks import is_int
from lightning_bnnprune.data.base import (
    Split,
    TensorImageDataset,
    _channel_stats,
    _check_split,
    _split_count,
    _TensorDataModule,
    register_datamodule,
)

__all__ = ["DigitsDataModule", "NpzDataModule", "CIFAR10DataModule", "CIFAR100DataModule", "FakeDataModule"]


@register_datamodule("digits")
class DigitsDataModule(_TensorDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, no download),
    resized to 32x32 (bilinear) and repeated to 3 channels so CIFAR models take them unchanged.

    The whole set is split once, seeded: ``test_split`` of it for test, ``val_split`` for
    validation (fractions of the whole set, 70/15/15 by default), the rest for training.
    Augmentation is the random crop only (no flip: a mirrored digit is another symbol).

    Args:
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        val_split: Fraction of the whole set (or count) for validation.
        test_split: Fraction of the whole set (or count) for test.
        seed: Seed of the split.
        augment: Random crop (padding 4) on the training split.
        pin_memory: Pin loader memory.
        mean: Per-channel mean in [0, 1] units; None computes it from the training split.
        std: Per-channel std; None computes it from the training split.

    Raises:
        ValueError: If a split is out of range or the splits leave no training data.
    """

    num_classes = 10
    hflip = False

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_split: Split = 0.15,
        test_split: Split = 0.15,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_split, seed, augment, pin_memory)
        self._set_data_options(mean=mean, std=std)
        _check_split("test_split", test_split)
        self.test_split = test_split

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        from sklearn.datasets import load_digits  # a slow import, needed only here

        digits = load_digits()
        images = (
            torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
        )  # (N, 1, 8, 8) in [0, 1]
        images = nn.functional.interpolate(
            images, size=(32, 32), mode="bilinear", align_corners=False
        )
        images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
        targets = torch.as_tensor(digits.target, dtype=torch.long)
        total = len(targets)
        num_test = _split_count("test_split", self.test_split, total)
        num_val = _split_count("val_split", self.val_split, total)
        if num_test + num_val >= total:
            raise ValueError(
                f"val_split={self.val_split} + test_split={self.test_split} leave no training data"
            )
        perm = torch.randperm(total, generator=self._generator())
        test_idx, val_idx, train_idx = (
            perm[:num_test],
            perm[num_test : num_test + num_val],
            perm[num_test + num_val :],
        )
        if self.mean is None:
            self.mean, self.std = _channel_stats(images[train_idx])
        eval_tf = self._transforms(train=False)
        self.data_train = TensorImageDataset(
            images[train_idx], targets[train_idx], self._transforms(train=True)
        )
        self.data_val = (
            TensorImageDataset(images[val_idx], targets[val_idx], eval_tf) if num_val else None
        )
        self.data_test = TensorImageDataset(images[test_idx], targets[test_idx], eval_tf)


@register_datamodule("npz")
class NpzDataModule(_TensorDataModule):
    """Images from ``<data_dir>/train.npz`` and ``<data_dir>/test.npz``.

    Each file holds ``x``: uint8 ``(N, H, W, 3)`` RGB and ``y``: int64 ``(N,)`` (the layout of
    ``shared/data/cifar10``). Validation is carved from ``train.npz``; ``subset_train`` /
    ``subset_test`` first keep a seeded random subset of each file, for small compute budgets.

    Args:
        data_dir: Folder with ``train.npz`` and ``test.npz``.
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        val_split: Fraction (float) or count (int) of the (subset) training data for validation.
        seed: Seed of subsets and split.
        augment: Random crop (padding 4) + horizontal flip on the training split.
        pin_memory: Pin loader memory.
        subset_train: Keep this many random training images (None keeps all).
        subset_test: Keep this many random test images (None keeps all).
        mean: Per-channel mean in [0, 1] units; None computes it from the training split.
        std: Per-channel std; None computes it from the training split.

    Raises:
        ValueError: If an argument is out of range or the arrays have the wrong shape or labels.
        FileNotFoundError: In ``setup``, if either file is missing.
    """

    def __init__(
        self,
        data_dir: str | Path = "data/cifar10",
        num_classes: int = 10,
        batch_size: int = 128,
        num_workers: int = 0,
        val_split: Split = 0.1,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        subset_train: int | None = None,
        subset_test: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_split, seed, augment, pin_memory)
        self._set_data_options(subset_train, subset_test, mean, std)
        if not is_int(num_classes, least=2):
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 2")
        self.data_dir = Path(data_dir)
        self.num_classes = num_classes

    def _paths(self) -> tuple[Path, Path]:
        paths = (self.data_dir / "train.npz", self.data_dir / "test.npz")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"missing {missing}; set data_dir to a folder holding train.npz and test.npz"
            )
        return paths

    def prepare_data(self) -> None:
        self._paths()  # fail before any process starts training

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        arrays = []
        for path in self._paths():
            with np.load(path) as f:
                x, y = f["x"], f["y"]
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
                raise ValueError(
                    f"{path}: x {x.dtype}{x.shape} must be uint8 (N, H, W, 3)"
                    f" with N = len(y) = {len(y)}"
                )
            arrays += [
                torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(y).long(),
            ]
        return tuple(arrays)  # type: ignore[return-value]


class _TorchvisionCIFAR(_TensorDataModule):
    """torchvision's CIFAR datasets, decoded once into memory."""

    dataset_cls: type[datasets.CIFAR10]

    def __init__(
        self,
        root: str | Path = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_split: Split = 0.1,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        subset_train: int | None = None,
        subset_test: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, val_split, seed, augment, pin_memory)
        self._set_data_options(subset_train, subset_test, mean, std)
        self.root = Path(root)
        self.download = download

    def _dataset(self, train: bool, download: bool) -> datasets.CIFAR10:
        try:
            return self.dataset_cls(str(self.root), train=train, download=download)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            folder = self.root / self.dataset_cls.base_folder
            raise FileNotFoundError(
                f"{self.dataset_cls.__name__} not found or corrupted in {folder}; "
                "pass download=True or set root to the folder holding"
                f" {self.dataset_cls.base_folder}"
            ) from err

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place to download.
        for train in (True, False):
            self._dataset(train, self.download)

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        arrays = []
        for train in (True, False):
            ds = self._dataset(train, download=False)
            arrays += [
                torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.as_tensor(ds.targets),
            ]
        return tuple(arrays)  # type: ignore[return-value]


@register_datamodule("cifar10")
class CIFAR10DataModule(_TorchvisionCIFAR):
    """CIFAR-10 through ``torchvision.datasets.CIFAR10`` (``<root>/cifar-10-batches-py``).

    Validation is carved from the 50k training images (seeded; 5000 by default); test is the
    official 10k.

    Args:
        root: Folder holding (or to receive) ``cifar-10-batches-py``.
        download: Download into ``root`` in ``prepare_data`` if missing (needs internet).
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        val_split: Fraction (float) or count (int) of training images for validation.
        seed: Seed of subsets and split.
        augment: Random crop (padding 4) + horizontal flip on the training split.
        pin_memory: Pin loader memory.
        subset_train: Keep this many random training images (None keeps all).
        subset_test: Keep this many random test images (None keeps all).
        mean: Per-channel mean in [0, 1] units; None computes it from the training split.
        std: Per-channel std; None computes it from the training split.

    Raises:
        ValueError: If an argument is out of range.
        FileNotFoundError: In ``prepare_data`` / ``setup``, if the data is missing and
            ``download`` is False.
    """

    num_classes = 10
    dataset_cls = datasets.CIFAR10


@register_datamodule("cifar100")
class CIFAR100DataModule(_TorchvisionCIFAR):
    """CIFAR-100 through ``torchvision.datasets.CIFAR100`` (``<root>/cifar-100-python``).

    Arguments and errors as :class:`CIFAR10DataModule`.
    """

    num_classes = 100
    dataset_cls = datasets.CIFAR100


@register_datamodule("fake")
class FakeDataModule(_TensorDataModule):
    """Random uint8 images with random labels, seeded, in memory: for tests and smoke runs.

    Args:
        num_samples: Training images (validation is carved from them).
        num_test_samples: Test images.
        image_size: Side of the square images.
        in_chans: Image channels.
        num_classes: Number of classes.
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        val_split: Fraction (float) or count (int) of ``num_samples`` for validation.
        seed: Seed of the data and split.
        augment: Random crop (padding 4) + horizontal flip on the training split.
        pin_memory: Pin loader memory.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_samples: int = 256,
        num_test_samples: int = 64,
        image_size: int = 32,
        in_chans: int = 3,
        num_classes: int = 10,
        batch_size: int = 32,
        num_workers: int = 0,
        val_split: Split = 0.25,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, val_split, seed, augment, pin_memory)
        for name, value, low in (
            ("num_samples", num_samples, 1),
            ("num_test_samples", num_test_samples, 1),
            ("image_size", image_size, 1),
            ("in_chans", in_chans, 1),
            ("num_classes", num_classes, 2),
        ):
            if not is_int(value, least=low):
                raise ValueError(f"{name}={value!r} must be an int >= {low}")
        self.num_samples = num_samples
        self.num_test_samples = num_test_samples
        self.image_size = image_size
        self.in_chans = in_chans
        self.num_classes = num_classes

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        arrays = []
        for n in (self.num_samples, self.num_test_samples):
            shape = (n, self.in_chans, self.image_size, self.image_size)
            arrays += [
                torch.randint(0, 256, shape, dtype=torch.uint8, generator=g),
                torch.randint(0, self.num_classes, (n,), generator=g),
            ]
        return tuple(arrays)  # type: ignore[return-value]
