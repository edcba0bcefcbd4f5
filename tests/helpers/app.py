"""The ``bnnprune`` app as a test runs it: a run shrunk to a few batches, and its error lines."""
from __future__ import annotations

import subprocess
from typing import List

__all__ = ["TINY", "stderr_lines"]

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


def stderr_lines(proc: subprocess.CompletedProcess) -> List[str]:
    """The process's non-blank stderr lines."""
    return [line for line in proc.stderr.splitlines() if line.strip()]
