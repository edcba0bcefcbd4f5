import numpy as np
import pytest
import torch
from PIL import Image

from lightning_bnnprune.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FakeDataModule,
    ImageFolderDataModule,
    NpzDataModule,
    RandomCropFlip,
    create_datamodule,
    list_datamodules,
)


def _all(loader):
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _write_npz(folder, n_train=100, n_test=20, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, num_classes, size=n).astype(np.int64)
        np.savez_compressed(folder / f"{name}.npz", x=x, y=y)
    return folder


def _write_image_folder(root, counts, size=(48, 40)):
    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


# --- RandomCropFlip ------------------------------------------------------------------------------


def test_random_crop_flip_is_a_per_image_crop_of_the_padded_batch():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = RandomCropFlip(padding=2, hflip=True)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    placements = set()
    for img, pad in zip(out, padded, strict=True):
        found = [
            (top, left, flip)
            for top in range(5)
            for left in range(5)
            for flip in (False, True)
            if torch.equal(img, (pad.flip(-1) if flip else pad)[:, top : top + 8, left : left + 8])
        ]
        assert found
        placements.add(found[0])
    assert len(placements) > 1  # images are moved independently


def test_random_crop_flip_without_padding_or_flip_is_identity():
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(RandomCropFlip(padding=0, hflip=False)(x), x)
    with pytest.raises(ValueError, match="padding=-1"):
        RandomCropFlip(padding=-1)


# --- digits --------------------------------------------------------------------------------------


def test_digits_shapes_classes_and_split():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    assert dm.num_classes == 10
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (1257, 270, 270)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(_all(dm.val_dataloader())[1].tolist()) == set(range(10))


def test_digits_is_normalised_from_its_train_split():
    dm = DigitsDataModule(batch_size=512, augment=False)
    dm.setup("fit")
    x, _ = _all(dm.train_dataloader())
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_digits_split_is_deterministic_by_seed():
    def val_set(seed):
        dm = DigitsDataModule(seed=seed, batch_size=512)
        dm.setup("validate")
        return _all(dm.val_dataloader())

    x0, y0 = val_set(0)
    x0_again, y0_again = val_set(0)
    _, y1 = val_set(1)
    assert torch.equal(x0, x0_again) and torch.equal(y0, y0_again)
    assert not torch.equal(y0, y1)


def test_digits_hparams_hold_only_its_own_arguments():
    # load_from_checkpoint passes them back to __init__.
    assert "subset_train" not in DigitsDataModule().hparams
    assert DigitsDataModule(val_split=0.2).hparams.val_split == 0.2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(val_split=1.5), "val_split=1.5"),
        (dict(val_split=-3), "val_split=-3"),
        (dict(val_split="a"), "val_split='a'"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(num_workers=-1), "num_workers=-1"),
        (dict(mean=(0.5,) * 3), "given together"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_digits_splits_that_leave_no_training_data():
    dm = DigitsDataModule(val_split=0.6, test_split=0.4)
    with pytest.raises(ValueError, match="leave no training data"):
        dm.setup("fit")


# --- npz -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, sizes",
    [
        (dict(val_split=0.2), (80, 20, 20)),
        (dict(val_split=10), (90, 10, 20)),
        (dict(val_split=0.2, subset_train=50, subset_test=5), (40, 10, 5)),
    ],
)
def test_npz_split_sizes(tmp_path, kwargs, sizes):
    dm = NpzDataModule(_write_npz(tmp_path / "npz"), batch_size=16, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == sizes
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.shape == (16,)


def test_npz_normalisation_from_train_split(tmp_path):
    dm = NpzDataModule(_write_npz(tmp_path / "npz"), batch_size=64, augment=False)
    dm.setup("fit")
    x, _ = _all(dm.train_dataloader())
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3, rtol=0)


def test_npz_given_mean_std_are_used(tmp_path):
    dm = NpzDataModule(_write_npz(tmp_path / "npz"), mean=(0.0,) * 3, std=(1.0,) * 3, augment=False)
    dm.setup("test")
    x, _ = dm.data_test[0]
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_npz_val_split_zero_validates_on_test(tmp_path):
    dm = NpzDataModule(_write_npz(tmp_path / "npz"), val_split=0)
    dm.setup("fit")
    assert dm.data_val is None and dm.val_dataloader().dataset is dm.data_test


def test_npz_seeded_subset(tmp_path):
    folder = _write_npz(tmp_path / "npz")

    def train_labels(seed):
        dm = NpzDataModule(folder, subset_train=30, val_split=0, seed=seed)
        dm.setup("fit")
        return dm.data_train.targets

    assert torch.equal(train_labels(0), train_labels(0))
    assert not torch.equal(train_labels(0), train_labels(1))


def test_npz_missing_files(tmp_path):
    dm = NpzDataModule(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="train.npz"):
        dm.prepare_data()


def test_npz_labels_beyond_num_classes(tmp_path):
    dm = NpzDataModule(_write_npz(tmp_path / "npz", num_classes=10), num_classes=3)
    with pytest.raises(ValueError, match="num_classes=3"):
        dm.setup("fit")


# --- CIFAR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, folder",
    [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")],
)
def test_cifar_missing_without_download(tmp_path, cls, folder):
    dm = cls(root=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match=f"{folder}; pass download=True"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")


def test_cifar_num_classes_known_before_setup(tmp_path):
    assert CIFAR10DataModule(root=tmp_path).num_classes == 10
    assert CIFAR100DataModule(root=tmp_path).num_classes == 100


# --- image folder --------------------------------------------------------------------------------


def test_image_folder_loads_a_batch(tmp_path):
    root = _write_image_folder(tmp_path / "imgs", {"train": 3, "val": 2})
    dm = ImageFolderDataModule(root, image_size=32, batch_size=4)
    assert dm.num_classes == 2
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    assert dm.val_dataloader().dataset is dm.data_test and len(dm.data_test) == 4


def test_image_folder_val_split_carves_train(tmp_path):
    root = _write_image_folder(tmp_path / "imgs", {"train": 3, "val": 1})
    dm = ImageFolderDataModule(root, image_size=16, val_split=2)
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (4, 2, 2)
    assert set(dm.data_train.indices).isdisjoint(dm.data_val.indices)


def test_image_folder_missing(tmp_path):
    (tmp_path / "train").mkdir()
    dm = ImageFolderDataModule(tmp_path)
    with pytest.raises(FileNotFoundError, match="val"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="val"):
        _ = dm.num_classes


# --- fake and registry ---------------------------------------------------------------------------


def test_fake_data():
    dm = FakeDataModule(
        num_samples=40, num_test_samples=8, image_size=16, num_classes=4, val_split=10, batch_size=8
    )
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (30, 10, 8)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and int(y.max()) < 4


def test_workers_are_persistent():
    dm = FakeDataModule(num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers


def test_registry():
    assert list_datamodules() == ["cifar10", "cifar100", "digits", "fake", "imagefolder", "npz"]
    dm = create_datamodule("fake", num_samples=12)
    assert isinstance(dm, FakeDataModule) and dm.num_samples == 12
    with pytest.raises(ValueError, match=r"Unknown datamodule 'mnist'; choose one of \['cifar10'"):
        create_datamodule("mnist")
