"""The shared fixtures: one torch thread, the real Hydra configs composed with the ``compose`` API,
the app run in a new process or in this one.

Shared helpers that are not fixtures (modules, networks, data, the small Trainer, ``TINY``) live
in the ``tests/helpers`` package: ``from helpers import UserModule``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lightning_bnnprune.config import conf_dir, register_recipes


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box two threads per
    op spin against other processes (10x slower); restored at the end of the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

