"""Resumable training batches (``lightning_bnnprune.batches``): a fit resumed from a checkpoint
taken anywhere, mid-epoch included, sees the batches an uninterrupted fit sees and ends with the
same weights, bit for bit."""
from __future__ import annotations

import pickle
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_bnnprune.batches import ResumableBatchSampler, SeededBatch
from lightning_bnnprune.data import FakeDataModule

from helpers import small_trainer, step_checkpoints


class TinyNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SeenBatches(Callback):
    """The (step, first pixels, labels) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[float, ...], tuple[int, ...]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        self.seen.append((trainer.global_step, tuple(x[:, 0, 0, 0].tolist()), tuple(y.tolist())))


def _fit(folder, ckpt_path=None, seed: int = 3) -> tuple[TinyNet, SeenBatches]:
    pl.seed_everything(seed, verbose=False)
    model, seen = TinyNet(), SeenBatches()
    trainer = small_trainer(
        folder, [step_checkpoints(folder, 3), seen], max_steps=-1, max_epochs=3,
        limit_train_batches=5,  # epochs of 5 of the 6 batches: the position must follow the limit
        limit_val_batches=0,
    )
    data = FakeDataModule(num_samples=96, num_test_samples=8, image_size=8, batch_size=12, val_split=0)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model, seen


@pytest.mark.parametrize("step", [6, 9], ids=["mid-epoch", "epoch-end"])
def test_resumed_fit_sees_the_same_batches_and_ends_bit_equal(tmp_path, step):
    full, seen_full = _fit(tmp_path / "full")
    assert len(seen_full.seen) == 15
    epochs = [seen_full.seen[i : i + 5] for i in (0, 5, 10)]
    assert epochs[0] != epochs[1]  # a new order and new crops each epoch
    resumed, seen_resumed = _fit(tmp_path / "resumed", ckpt_path=tmp_path / "full" / f"step={step}.ckpt", seed=11)
    assert seen_resumed.seen == seen_full.seen[step:]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_order_follows_seed_and_epoch_without_a_trainer():
    sampler = torch.utils.data.RandomSampler(range(20), generator=torch.Generator())
    batches = ResumableBatchSampler(sampler, batch_size=6, seed=5)
    first, second = list(batches), list(batches)
    assert [len(b) for b in first] == [6, 6, 6, 2]
    assert sorted(i for b in first for i in b) == list(range(20))
    assert first != second  # epoch 0, then epoch 1
    again = ResumableBatchSampler(sampler, batch_size=6, seed=5)
    assert list(again) == first
    assert all(isinstance(b, SeededBatch) for b in first) and len({b.seed for b in first}) == 4
    there = ResumableBatchSampler(sampler, batch_size=6, seed=5, position=lambda n: (1, 2))
    assert list(there) == second[2:]  # epoch 1 from its third batch


def test_seeded_batch_keeps_its_seed_across_processes():
    """A DataLoader worker gets its batch of indices pickled: the seed must come out in another
    Python, not only from a round trip in this one."""
    pickled = pickle.dumps(SeededBatch([3, 1, 2], seed=7))
    batch = pickle.loads(pickled)
    assert batch == [3, 1, 2] and batch.seed == 7
    read = "import pickle, sys; b = pickle.loads(sys.stdin.buffer.read()); print(type(b).__name__, list(b), b.seed)"
    done = subprocess.run([sys.executable, "-c", read], input=pickled, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().split("\n")[0] == "SeededBatch [3, 1, 2] 7"
