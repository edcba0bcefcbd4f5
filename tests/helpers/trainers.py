"""The one Trainer the tests build for a few CPU steps, the checkpoints a resume test reads, and
the callbacks that trace a fit step by step (a resumed run must retrace the uninterrupted one)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from .networks import gate_logits, main_params

__all__ = ["GateLogitTrace", "WeightTrace", "small_trainer", "step_checkpoints"]


def small_trainer(root: Union[str, Path], callbacks: Sequence[Callback] = (), max_steps: int = 2,
                  **settings: Any) -> Trainer:
    """A Trainer for a few steps on one CPU under ``root``: no logger, bar or model summary;
    checkpoints only when a ``ModelCheckpoint`` is among ``callbacks``. ``settings`` go to the
    Trainer and win over these (``max_epochs=2, max_steps=-1``, ``limit_val_batches=0``, ...)."""
    callbacks = list(callbacks)
    defaults = dict(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    return Trainer(**{**defaults, **settings})


def step_checkpoints(folder: Union[str, Path], every: int) -> ModelCheckpoint:
    """A checkpoint every ``every`` training steps, all kept, named ``step={N}.ckpt``."""
    return ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1, filename="{step}")


class GateLogitTrace(Callback):
    """Every gate logit of ``pl_module.net`` after every step, by global step."""

    def __init__(self) -> None:
        self.trace: Dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trace[trainer.global_step] = torch.cat(list(gate_logits(pl_module).values()))


class WeightTrace(Callback):
    """Every parameter but the gates' (flattened into one tensor) after every step, by global step."""

    def __init__(self) -> None:
        self.trace: Dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trace[trainer.global_step] = torch.cat([p.detach().flatten() for p in main_params(pl_module).values()])
