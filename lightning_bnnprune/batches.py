"""Training batches that resume exactly: the order and the augmentation of every batch are a
function of ``(seed, epoch, batch index)``, not of the global random state when it is drawn.

Lightning restores weights, optimizers and loop counters from a checkpoint, but a ``DataLoader``
with ``shuffle=True`` draws its order from the global generator when its iterator is made, and a
resumed fit makes that iterator before it calls ``set_epoch`` (Lightning's ``FitLoop.setup_data``
prefetches a batch first); mid-epoch, Lightning restarts the epoch's order from its first batch.
So a resumed run trains on other batches than the run it continues. :class:`ResumableBatchSampler`
reads where the fit stands from the trainer's loop counters when its iterator starts, seeds that
epoch's order itself and skips the batches already trained on; each batch carries its own
augmentation seed (:class:`SeededBatch`), which :class:`~lightning_bnnprune.data.TensorImageDataset`
applies. Under DDP Lightning swaps the sampler for a ``DistributedSampler`` (it keeps this batch
sampler) and the epoch is set here, before the first index is drawn.

:class:`StepSeededLoader` is the same idea without a ``DataLoader``, keyed on the global step
(``benchmarks/warm_start.py`` trains with it).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, default_collate

from lightning_bnnprune.checks import is_int

__all__ = ["ResumableBatchSampler", "ResumableDataLoader", "SeededBatch", "StepSeededLoader", "fit_position", "mix_seed"]


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (order matters)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return value


class SeededBatch(list):
    """A batch of dataset indices with the seed its augmentation draws from (``.seed``)."""

    def __init__(self, indices: list[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed

    def __reduce__(self):  # keeps .seed when sent to a worker process
        return (SeededBatch, (list(self), self.seed))


class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` whose epoch ``e`` is the order seeded by ``(seed, e)``, starting at the
    batch the fit is at.

    Args:
        sampler: Usually a ``RandomSampler`` with its own ``generator`` (reseeded here each epoch);
            a sampler with ``set_epoch`` (``DistributedSampler``) is given the epoch instead.
        batch_size: Indices per batch.
        drop_last: Drop the last, smaller batch of an epoch.
        seed: Seed of the order and the augmentation.
        position: Given the epoch length in batches (this sampler's ``len``), returns ``(epoch,
            first batch)`` where the fit stands when an iterator starts (e.g. :func:`fit_position`);
            ``None`` counts the iterators made instead, each a whole epoch.

    Raises:
        ValueError: If ``batch_size`` is not a positive int.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
        position: Callable[[int], tuple[int, int] | None] | None = None,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.seed = seed
        self.position = position
        self._epochs_started = 0

    def __iter__(self) -> Iterator[SeededBatch]:
        # A generator: the position is read at the first next(), after Lightning restored the
        # checkpoint's loop counters, not when the DataLoader's iterator object is built.
        where = self.position(len(self)) if self.position is not None else None
        epoch, first = where if where is not None else (self._epochs_started, 0)
        self._epochs_started = epoch + 1
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)
        generator = getattr(self.sampler, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(mix_seed(self.seed, epoch))
        for index, batch in enumerate(super().__iter__()):
            if index >= first:
                yield SeededBatch(batch, mix_seed(self.seed, epoch, index))


def fit_position(trainer, batches: int) -> tuple[int, int] | None:
    """``(epoch, batch)`` of the next training batch of ``trainer``'s fit, or ``None`` outside one.

    The total of processed batches is what a checkpoint holds whether it was saved at a batch end
    or at an epoch end, and Lightning reads it back before the training iterator starts. An epoch
    is ``batches`` long, cut by ``trainer.limit_train_batches`` as Lightning cuts it.
    """
    if trainer is None or trainer.state.fn != "fit":
        return None
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
    return divmod(int(done), max(1, batches))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose ``batch_sampler`` is a :class:`ResumableBatchSampler`.

    Its state is the seed of the order; where the fit stands is in the trainer's loop counters,
    which the checkpoint holds already. Having a state tells Lightning it resumes mid-epoch (else
    Lightning warns that it cannot), and a resumed fit continues with the checkpoint's seed even
    if ``seed=`` changed.
    """

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.batch_sampler.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.seed = int(state.get("seed", self.batch_sampler.seed))


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
        if not is_int(batch_size, least=1):
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
        return mix_seed(self.seed, *parts)

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
