"""What every datamodule shares: the in-memory image dataset and its batch augmentation, the
:class:`ImageDataModule` base (loaders, the seeded validation split) and the registry that resolves
datamodules by name."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2

from lightning_bnnprune.batches import ResumableBatchSampler, ResumableDataLoader, fit_position
from lightning_bnnprune.checks import is_int
from lightning_bnnprune.registry import Registry

__all__ = [
    "RandomCropFlip",
    "TensorImageDataset",
    "ImageDataModule",
    "register_datamodule",
    "list_datamodules",
    "create_datamodule",
]

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
    if value is not None and not is_int(value, least=1):
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
        if not is_int(batch_size, least=1):
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        if not is_int(num_workers, least=0):
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
