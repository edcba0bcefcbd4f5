"""What the tests share, imported as ``from helpers import ...`` (``tests/`` is on the path:
``[tool.pytest.ini_options] pythonpath``); ``conftest.py`` holds only fixtures.

- ``modules``: the users' LightningModules (:class:`UserModule`, :class:`Classifier`).
- ``networks``: binarised timm networks with random norms, seeded closings, inputs, snapshots.
- ``data``: seeded in-memory loaders (:func:`random_images`, :func:`pattern_images`).
- ``trainers``: the one small Trainer (:func:`small_trainer`), step checkpoints, step traces.
- ``app``: the app's run shrunk for a test (:data:`TINY`) and its error lines.
- ``benchmarks``: the benchmark scripts as modules (:func:`benchmark_script`), tiny npz data sets.
- ``latency``: an LCE-shaped latency table that times nothing (:func:`engine_like_table`).
- ``lce``: whether LCE can run here (:data:`needs_lce`, :data:`needs_interpreter` marks).
"""
from .app import TINY, stderr_lines
from .benchmarks import benchmark_script, tiny_npz
from .data import pattern_images, random_images
from .latency import engine_like_table
from .lce import LCE_INTERPRETER, needs_interpreter, needs_lce
from .modules import Classifier, UserModule
from .networks import (TIMM_KWARGS, binary_net, close_random, gate_logits, inputs, main_params, num_params,
                       randomise_norms)
from .trainers import GateLogitTrace, WeightTrace, small_trainer, step_checkpoints

__all__ = ["LCE_INTERPRETER", "TIMM_KWARGS", "TINY", "Classifier", "GateLogitTrace", "UserModule",
           "WeightTrace", "benchmark_script", "binary_net", "close_random", "engine_like_table",
           "gate_logits", "inputs", "main_params", "needs_interpreter", "needs_lce", "num_params",
           "pattern_images", "random_images", "randomise_norms", "small_trainer", "stderr_lines",
           "step_checkpoints", "tiny_npz"]
