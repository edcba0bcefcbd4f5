"""Shared fixtures and helpers: one torch thread, a user's LightningModule around a timm network,
randomised norms, and the real Hydra configs composed with the ``compose`` API, shrunk for tests.

Test files import the helpers by name (``from conftest import UserModule``), as they import
``TINY``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torch import nn

from lightning_bnnprune.config import conf_dir, register_recipes

@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box two threads per
    op spin against other processes (10x slower); restored at the end of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class UserModule(LightningModule):
    """A user's own module: a network (a timm name, built with 10 classes, or any module) under an
    attribute of the user's choosing, cross-entropy, one optimizer over every parameter.

    Args:
        net: a timm model name or a module.
        attr: the attribute holding the network (the record's ``network_path``).
        lr: the optimizer's learning rate.
        optimizer: the optimizer class; ``optimizer_kwargs`` go to it (``weight_decay=...``).
        example_input_size: ``(C, H, W)`` for ``example_input_array`` (None: the size comes from
            the data).
    """

    def __init__(self, net: Union[str, nn.Module] = "test_resnet", attr: str = "net", lr: float = 1e-3,
                 optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
                 example_input_size: Optional[Sequence[int]] = None, **optimizer_kwargs: Any) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, timm.create_model(net, num_classes=10) if isinstance(net, str) else net)
        if example_input_size is not None:
            self.example_input_array = torch.zeros(2, *example_input_size)
        self.lr, self.optimizer_class, self.optimizer_kwargs = lr, optimizer, optimizer_kwargs

    def forward(self, x):
        return getattr(self, self.attr)(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self.optimizer_class(self.parameters(), lr=self.lr, **self.optimizer_kwargs)


def randomise_norms(net: nn.Module) -> nn.Module:
    """Random batch-norm statistics and affine terms (seeded by the caller), so that a wrong cut
    or a wrong fold shows in the logits."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return net


# A run small enough for a test: six tiny training batches (the fewest that hold the default
# pruning schedule once scaled to fit: 3 stages x (1 selector + 1 retrain step)), one of each
# evaluation split, no bar.
TINY = [
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture
def compose_train(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_train(overrides)``: ``conf/train.yaml`` composed as the app does, writing under tmp_path."""

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        register_recipes()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(
                "train",
                overrides=[f"paths.output_dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}", *overrides],
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def run_app(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """``run_app(*args)``: ``python -m lightning_bnnprune.train *args`` from tmp_path, captured."""

    def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LOCAL_RANK", "NODE_RANK")}
        return subprocess.run(
            [sys.executable, "-m", "lightning_bnnprune.train", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
        )

    return _run


@pytest.fixture
def call_main(monkeypatch, capsys, tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """``call_main(*args)``: the app's ``main()`` in this process, with ``sys.argv`` = args, from
    tmp_path (Hydra's default ``outputs/`` and ``multirun/`` land there, never in the checkout); for
    runs that end before training (errors), where a new interpreter would only add start-up time."""
    from lightning_bnnprune.train import main

    monkeypatch.chdir(tmp_path)

    def _call(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["bnnprune", *args])
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            os.environ.pop("HYDRA_FULL_ERROR", None)  # main() sets it for its own process
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["bnnprune", *args], code, out.out, out.err)

    return _call


def stderr_lines(proc: subprocess.CompletedProcess) -> List[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]
