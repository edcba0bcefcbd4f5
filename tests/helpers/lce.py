"""When the tests can run Larq Compute Engine: its extra installed, and its interpreter reachable
(numpy<2 in this Python, or a second Python named by ``BNNPRUNE_LCE_PYTHON``)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from lightning_bnnprune.pruning.export_lce import lce_available

__all__ = ["LCE_INTERPRETER", "needs_interpreter", "needs_lce"]

LCE_INTERPRETER = int(np.__version__.split(".")[0]) < 2 or bool(os.environ.get("BNNPRUNE_LCE_PYTHON"))
needs_lce = pytest.mark.skipif(not lce_available(), reason="the lce extra (larq-compute-engine) is not installed")
needs_interpreter = pytest.mark.skipif(
    not (lce_available() and LCE_INTERPRETER),
    reason="LCE's interpreter needs numpy<2 here or BNNPRUNE_LCE_PYTHON (a Python with numpy<2 and larq-compute-engine)",
)
