"""A run prints no warning that the user cannot act on: not Lightning's deprecation noise under a
newer torch (the app, the callbacks in a user's own Trainer) and, under DDP with the default
channels_last, not "Grad strides do not match bucket view strides" (real ``bnnprune`` processes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import TINY

LIGHTNING_NOISE = ("`isinstance(treespec, LeafSpec)` is deprecated",
                   "torch.distributed.nn.functional.all_gather is deprecated")
DDP_STRIDES = "Grad strides do not match bucket view strides"

USER_TRAINER = """
import sys

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnnprune import Binarize, GreedyFilterPruning

sys.path.insert(0, {tests!r})
from helpers import UserModule

g = torch.Generator().manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)),
                  batch_size=8)
Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Binarize(), GreedyFilterPruning("l1", target_pfr=0.4)],
        ).fit(UserModule("test_resnet"), data)
print("FIT DONE")
"""


def test_the_callbacks_in_a_users_trainer_print_no_lightning_deprecation(tmp_path):
    code = USER_TRAINER.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FIT DONE" in proc.stdout
    for noise in LIGHTNING_NOISE:
        assert noise not in proc.stderr, proc.stderr[-3000:]


def test_a_ddp_run_prints_no_stride_or_lightning_deprecation_warning(run_app, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(*TINY, "logger=none", "trainer=ddp", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert "Starting with 2 processes" in said and "bnnprune summary" in proc.stdout  # a real two-process fit
    assert DDP_STRIDES not in said, said[-3000:]
    for noise in LIGHTNING_NOISE:
        assert noise not in said, said[-3000:]
