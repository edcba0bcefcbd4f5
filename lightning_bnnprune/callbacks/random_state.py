"""``RandomStateCheckpoint``: the global random states travel with every checkpoint.

Lightning restores weights, optimizers, schedulers, loops and callback states from a checkpoint,
but not the random generators, so a resumed run would shuffle, crop and drop out differently from
the run it continues. This callback stores the states of torch, numpy and Python's ``random`` in
each checkpoint and sets them back when the resumed fit starts training.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["RandomStateCheckpoint"]


class RandomStateCheckpoint(Callback):
    """Save the global random states in checkpoints; restore them on resume (``ckpt_path=``).

    Example::

        trainer = Trainer(callbacks=[ModelCheckpoint(every_n_train_steps=10, save_last=True),
                                     RandomStateCheckpoint()])
    """

    def __init__(self) -> None:
        self._loaded: Optional[Dict[str, Any]] = None

    @override
    def state_dict(self) -> Dict[str, Any]:
        # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            state["torch.cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # after the checkpoint is restored and before the training dataloader's iterator is made
        # (a resumed fit reuses that first iterator; an uninterrupted one makes it at the epoch start)
        if self._loaded is not None:
            state, self._loaded = self._loaded, None
            torch.set_rng_state(state["torch"])
            name, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            version, internal, gauss_next = state["python"]
            random.setstate((version, tuple(internal), gauss_next))
            if "torch.cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["torch.cuda"])
