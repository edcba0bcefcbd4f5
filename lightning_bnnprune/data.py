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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, default_collate
from torchvision import datasets
from torchvision.transforms import v2

from lightning_bnnprune.batches import ResumableBatchSampler, ResumableDataLoader, fit_position
from lightning_bnnprune.registry import Registry
from lightning_bnnprune.stats import CIFAR10_MEAN, CIFAR10_STD

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "RandomCropFlip",
    "StepSeededLoader",
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

# CIFAR10_MEAN / CIFAR10_STD: see lightning_bnnprune.stats. The datamodules compute their own
# statistics from the training split unless given.

Split = int | float


class RandomCropFlip(nn.Module):
    """``RandomCrop(size=(H, W), padding)`` + ``RandomHorizontalFlip`` on a batch ``(N, C, H, W)``,
    with an independent crop offset and flip for every image, as one gather.

    torchvision's v2 transforms draw one set of parameters per call, so on a batch they would move
    every image the same way; calling them per image costs ~0.3 ms each on a CPU.

    Args:
        padding: Zero padding on each side before cropping back to ``(H, W)``.
        hflip: Also flip each image left-right with probability 0.5.

    Raises:
        ValueError: If ``padding`` is negative.
    """

    def __init__(self, padding: int = 4, hflip: bool = True) -> None:
        super().__init__()
        if padding < 0:
            raise ValueError(f"padding={padding} must be >= 0")
        self.padding = padding
        self.hflip = hflip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.padding
        padded = nn.functional.pad(x, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (n, 1))
        left = torch.randint(0, 2 * p + 1, (n, 1))
        rows = top + torch.arange(h)  # (n, h)
        cols = left + torch.arange(w)  # (n, w)
        if self.hflip:
            flip = torch.rand(n, 1) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        return padded[
            torch.arange(n)[:, None, None, None],
            torch.arange(c)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]

    def extra_repr(self) -> str:
        return f"padding={self.padding}, hflip={self.hflip}"


class TensorImageDataset(Dataset):
    """Images ``(N, C, H, W)`` (uint8 in [0, 255] or float in [0, 1]) and labels held in memory.

    ``transform`` takes and returns a whole batch; the DataLoader fetches a batch through
    ``__getitems__`` so it runs once per batch.

    Args:
        images: Image tensor ``(N, C, H, W)``.
        targets: Integer labels ``(N,)``.
        transform: Batch transform ``(B, C, H, W) -> (B, C, H, W)``.

    Raises:
        ValueError: If ``images`` is not 4-D or its length differs from ``targets``'.
    """

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, transform: Callable | None = None
    ) -> None:
        if images.ndim != 4 or len(images) != len(targets):
            raise ValueError(
                f"images {tuple(images.shape)} must be (N, C, H, W) with N = len(targets)"
                f" = {len(targets)}"
            )
        self.images = images
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.images[idx]
        if self.transform is not None:
            seed = getattr(indices, "seed", None)  # a SeededBatch: draw from its own seed
            if seed is None:
                x = self.transform(x)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    x = self.transform(x)
        return list(zip(x.unbind(0), self.targets[idx].unbind(0), strict=True))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]


def _check_split(name: str, value: Split) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a fraction in [0, 1) or a sample count >= 0")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} as a fraction must be in [0, 1); pass an int for a count")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name}={value} as a count must be >= 0")


def _split_count(name: str, value: Split, total: int) -> int:
    count = round(value * total) if isinstance(value, float) else value
    if count >= total:
        raise ValueError(f"{name}={value} leaves no training samples out of {total}")
    return count


def _check_subset(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name}={value!r} must be a positive int or None")


def _channel_stats(
    images: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units, computed in chunks so that a uint8 set is never
    copied to float as a whole."""
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64) / scale
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class ImageDataModule(LightningDataModule):
    """What every datamodule here shares: loaders, the validation split, transforms' settings.

    Subclasses set ``num_classes`` and build ``data_train`` / ``data_val`` / ``data_test`` in
    ``setup``. The test split is the dataset's held-out set; the validation split is carved from
    the training data with a generator seeded by ``seed``. ``val_split=0`` validates on the test
    split instead, as most CIFAR papers report (no tuning should then be read off validation).

    Args:
        batch_size: Samples per batch for every loader.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_split: Fraction (float in [0, 1)) or count (int) of the training data held out for
            validation.
        seed: Seed of the split (and of subsets / fake data where a subclass has them).
        augment: Random crop + horizontal flip on the training split.
        pin_memory: Pin loader memory (useful with a GPU).

    Raises:
        ValueError: If an argument is out of range.
    """

    num_classes: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        val_split: Split = 0.1,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 0")
        _check_split("val_split", val_split)
        # Subclass arguments are collected too; they go into checkpoints, not to the logger.
        self.save_hyperparameters(logger=False)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.seed = seed
        self.augment = augment
        self.pin_memory = pin_memory
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def _val_indices(
        self, total: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded (train, val) index split of ``total`` training samples."""
        num_val = _split_count("val_split", self.val_split, total)
        perm = torch.randperm(total, generator=generator)
        return perm[num_val:], perm[:num_val]

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders")
        options = dict(
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )
        if not shuffle:
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, **options)
        # The order and augmentation of each batch follow (run seed, epoch, batch) and the loader
        # starts where the fit stands, so a run resumed from any checkpoint trains on the batches
        # the uninterrupted run would (see batches.py). Its own generator: no global draws.
        # Image folders (per-image transforms) get the exact order; their augmentation draws
        # from the global (or worker) generator.
        generator = torch.Generator()
        batches = ResumableBatchSampler(
            RandomSampler(dataset, generator=generator),
            self.batch_size,
            drop_last=False,
            seed=torch.initial_seed(),  # the run's seed (seed_everything / `seed=`)
            position=self._fit_position,
        )
        return ResumableDataLoader(dataset, batch_sampler=batches, generator=generator, **options)

    def _fit_position(self, batches: int) -> tuple[int, int] | None:
        return fit_position(self.trainer, batches)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(
            self.data_val if self.data_val is not None else self.data_test, shuffle=False
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)


class _TensorDataModule(ImageDataModule):
    """In-memory images: subclasses return the train pool and test arrays from ``_load``; this
    class subsets, splits, computes the normalisation and wraps them in ``TensorImageDataset``."""

    hflip: bool = True  # digits turn it off: a mirrored digit is a different symbol
    subset_train: int | None = None
    subset_test: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    # No __init__ here: save_hyperparameters() collects every __init__ in the chain, and
    # a subclass without subsets (digits, fake) must not record subset arguments it cannot take.
    def _set_data_options(
        self,
        subset_train: int | None = None,
        subset_test: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        _check_subset("subset_train", subset_train)
        _check_subset("subset_test", subset_test)
        if (mean is None) != (std is None):
            raise ValueError(f"mean={mean} and std={std} must be given together or both left None")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std={std} must be positive")
        self.subset_train = subset_train
        self.subset_test = subset_test
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(x_train, y_train, x_test, y_test)``, images ``(N, C, H, W)``."""
        raise NotImplementedError

    def _transforms(self, train: bool) -> Callable:
        steps: list[Callable] = (
            [RandomCropFlip(padding=4, hflip=self.hflip)] if train and self.augment else []
        )
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def _check_labels(self, *targets: torch.Tensor) -> None:
        for y in targets:
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"labels span [{int(y.min())}, {int(y.max())}]"
                    f" but num_classes={self.num_classes}"
                )

    def setup(self, stage: str | None = None) -> None:
        # Every stage gets all three splits: they are in memory already, and the test transform
        # needs the training statistics anyway.
        if self.data_train is not None:
            return
        x_train, y_train, x_test, y_test = self._load()
        self._check_labels(y_train, y_test)
        generator = self._generator()
        if self.subset_train is not None and self.subset_train < len(y_train):
            keep = torch.randperm(len(y_train), generator=generator)[: self.subset_train]
            x_train, y_train = x_train[keep], y_train[keep]
        if self.subset_test is not None and self.subset_test < len(y_test):
            keep = torch.randperm(len(y_test), generator=generator)[: self.subset_test]
            x_test, y_test = x_test[keep], y_test[keep]
        train_idx, val_idx = self._val_indices(len(y_train), generator)
        if self.mean is None:
            self.mean, self.std = _channel_stats(x_train[train_idx])
            rank_zero_info(
                f"{type(self).__name__}: mean={self.mean}, std={self.std} from the train split"
            )
        eval_tf = self._transforms(train=False)
        self.data_train = TensorImageDataset(
            x_train[train_idx], y_train[train_idx], self._transforms(train=True)
        )
        self.data_val = (
            TensorImageDataset(x_train[val_idx], y_train[val_idx], eval_tf)
            if len(val_idx)
            else None
        )
        self.data_test = TensorImageDataset(x_test, y_test, eval_tf)


_DATAMODULES: Registry = Registry("datamodule", "datamodules", unknown="Unknown datamodule {name}; choose one of {choice_list}")
#: Class decorator: make a datamodule resolvable as ``create_datamodule(name)`` (a name taken by
#: another class is a ``ValueError``).
register_datamodule = _DATAMODULES.register


def list_datamodules() -> list[str]:
    """Registered datamodule names, sorted."""
    return list(_DATAMODULES.available())


def create_datamodule(name: str, **kwargs: Any) -> ImageDataModule:
    """Build the datamodule registered as ``name`` with ``kwargs`` (the Python-side twin of the
    app's ``data=<name>``).

    Raises:
        ValueError: If ``name`` is not registered.
    """
    return _DATAMODULES.create(name, **kwargs)


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
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
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


@register_datamodule("imagefolder")
class ImageFolderDataModule(ImageDataModule):
    """ImageNet-style folders: ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``.

    ``<root>/val`` is the test split (ImageNet's labelled held-out set). With ``val_split=0``
    (default) validation runs on it too; a positive ``val_split`` carves validation from train.
    Training images get ``RandomResizedCrop(image_size)`` + flip, evaluation images
    ``Resize(image_size / crop_pct)`` + ``CenterCrop(image_size)`` (timm's convention).

    Args:
        root: Folder holding ``train/`` and ``val/``.
        image_size: Side of the square network input.
        crop_pct: Centre-crop fraction for evaluation.
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        val_split: Fraction (float) or count (int) of training images for validation.
        seed: Seed of the split.
        augment: Random resized crop + horizontal flip on the training split (else eval resize).
        pin_memory: Pin loader memory.
        mean: Per-channel mean (ImageNet's by default).
        std: Per-channel std (ImageNet's by default).

    Raises:
        ValueError: If an argument is out of range.
        FileNotFoundError: If ``train/`` or ``val/`` is missing (when ``num_classes`` is read or in
            ``prepare_data`` / ``setup``).
    """

    def __init__(
        self,
        root: str | Path = "data/imagenet",
        image_size: int = 224,
        crop_pct: float = 0.875,
        batch_size: int = 64,
        num_workers: int = 0,
        val_split: Split = 0,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__(batch_size, num_workers, val_split, seed, augment, pin_memory)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size={image_size!r} must be a positive int")
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
        self.root = Path(root)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._classes: list[str] | None = None

    def _dirs(self) -> tuple[Path, Path]:
        dirs = (self.root / "train", self.root / "val")
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise FileNotFoundError(
                f"missing {missing}; set root to a folder holding train/<class>/ and val/<class>/"
            )
        return dirs

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        if self._classes is None:
            self._classes, _ = datasets.folder.find_classes(self._dirs()[0])
        return len(self._classes)

    def prepare_data(self) -> None:
        self._dirs()

    def _transforms(self, train: bool) -> Callable:
        if train and self.augment:
            geometry = [
                v2.RandomResizedCrop(self.image_size, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            resize = int(round(self.image_size / self.crop_pct))
            geometry = [v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size)]
        return v2.Compose(
            [
                v2.ToImage(),
                *geometry,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
                v2.ToPureTensor(),
            ]
        )

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        train_dir, val_dir = self._dirs()
        train = datasets.ImageFolder(str(train_dir), transform=self._transforms(train=True))
        test = datasets.ImageFolder(str(val_dir), transform=self._transforms(train=False))
        if test.classes != train.classes:
            raise ValueError(
                f"{val_dir} classes {test.classes} differ from {train_dir} classes {train.classes}"
            )
        self._classes = train.classes
        train_idx, val_idx = self._val_indices(len(train), self._generator())
        self.data_train = Subset(train, train_idx.tolist())
        if len(val_idx):
            # The same files as a second dataset, so validation images get the eval transform.
            evaluated = datasets.ImageFolder(
                str(train_dir), transform=self._transforms(train=False)
            )
            self.data_val = Subset(evaluated, val_idx.tolist())
        self.data_test = test


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
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
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


class StepSeededLoader:
    """Training batches that are a function of ``(seed, global step)`` only, so a run resumed from
    any checkpoint (mid-epoch included) sees exactly the batches an uninterrupted run would.

    Step ``s`` takes batch ``s mod N`` of epoch ``s // N`` (``N = len(self)``): epoch ``e`` is the
    permutation seeded by ``(seed, e)``, and each batch's augmentation draws from the global RNG
    re-seeded by ``(seed, e, batch)`` inside :func:`torch.random.fork_rng` (the caller's RNG is
    left untouched). Each ``iter()`` starts at the step ``step()`` returns when the first batch is
    drawn and runs to the end of that epoch, which is how Lightning's loop consumes a loader after
    a restart. Lightning's own ``DataLoader`` resume replays the epoch from its start (its
    samplers' state is not in the checkpoint), and its prefetch makes a counting loader off by one.

    Args:
        dataset: A sized dataset; ``__getitems__`` is used when present (one transform per batch).
        batch_size: Samples per batch (the last batch of an epoch may be smaller).
        seed: Seed of the order and the augmentation.
        step: Returns the optimizer steps done so far, e.g. ``lambda: trainer.global_step``.
            One batch per step: no gradient accumulation.

    Raises:
        ValueError: If ``batch_size`` is not a positive int or the dataset is empty.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, step: Callable[[], int]
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.step = step

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)  # type: ignore[arg-type]

    def _seed(self, *parts: int) -> int:
        value = self.seed
        for part in parts:
            value = (value * 1_000_003 + part) % (2**63 - 1)
        return value

    def __iter__(self):
        # A generator: the start step is read at the first next(), after Lightning restored the
        # checkpoint's loops, not when the loader is built.
        epoch, first = divmod(int(self.step()), len(self))
        n = len(self.dataset)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self._seed(epoch)))
        fetch = getattr(self.dataset, "__getitems__", None)
        for b in range(first, len(self)):
            indices = order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._seed(epoch, b))
                items = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
            yield default_collate(items)

    # The state is the trainer's global step, which the checkpoint holds already; defining these
    # tells Lightning the loader resumes mid-epoch (else it warns that it cannot).
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the checkpoint's data order used seed={state['seed']}, this loader"
                f" seed={self.seed}"
            )
