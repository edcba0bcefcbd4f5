"""The benchmark scripts as modules, and the small npz data sets they read."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

import numpy as np

__all__ = ["benchmark_script", "tiny_npz"]

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def benchmark_script(name: str, module_name: Optional[str] = None) -> ModuleType:
    """``benchmarks/<name>.py`` imported as the module ``module_name`` (default ``name``; another
    where ``name`` is an installed package's, e.g. ``coverage``), registered in ``sys.modules``
    (dataclasses look their module up while the file executes; a fixture may pop it afterwards)."""
    spec = importlib.util.spec_from_file_location(module_name or name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_npz(directory: Union[str, Path], n_train: int = 48, n_test: int = 24) -> Path:
    """``train.npz`` / ``test.npz`` of random uint8 32x32 RGB images in ``directory`` (made), labels
    ``i % 10``, from one generator seeded 0 (train drawn first); the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        np.savez(directory / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(n, dtype=np.int64) % 10)
    return directory
