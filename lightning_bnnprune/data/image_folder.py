"""ImageNet-style class folders, read per image with torchvision transforms."""

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import v2

from lightning_bnnprune.checks import is_int
from lightning_bnnprune.data.base import ImageDataModule, Split, register_datamodule

__all__ = ["ImageFolderDataModule"]


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
        if not is_int(image_size, least=1):
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
