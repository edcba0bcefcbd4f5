"""MainSubsidiaryPruning under DDP: 2 CPU processes (gloo), gates identical on every rank."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnnprune import Binarize
from lightning_bnnprune.callbacks.msf import MainSubsidiaryPruning
from lightning_bnnprune.pruning.gates import gates_of

from helpers import Classifier

LAYERS = ["conv1.6", "layer2.0.conv1"]


class RankRecord(Callback):
    """Each rank writes its gates at every phase boundary and counts its backward passes."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.boundaries = {}
        self.backwards = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        msf = next(cb for cb in trainer.callbacks if isinstance(cb, MainSubsidiaryPruning))
        phase = msf.phase
        if phase.start == trainer.global_step:  # the callback has just entered this phase
            self.boundaries[trainer.global_step] = {
                "phase": (phase.stage, phase.name),
                "masks": {n: g.mask().clone() for n, g in gates_of(pl_module.net).items()},
                "logits": {n: g.logits.detach().clone() for n, g in gates_of(pl_module.net).items()},
            }

    def on_after_backward(self, trainer, pl_module):
        self.backwards += 1

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"boundaries": self.boundaries, "backwards": self.backwards, "steps": trainer.global_step,
             "prune": dict(next(cb for cb in trainer.callbacks if isinstance(cb, MainSubsidiaryPruning)).prune_counts),
             "final": {n: g.logits.detach().clone() for n, g in gates_of(pl_module.net).items()}},
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )


# the defaults (one stage: warm-up 0, selector 1-2, retrain 3, final retrain 4-7) and the
# layer-by-layer schedule (warm-up 0, selector 1-2, retrain 3, selector 4-5, retrain 6, done 7)
@pytest.mark.parametrize("find_unused_parameters, schedule, boundaries", [
    (False, {}, [0, 1, 3, 4]),
    (True, {"layers_per_stage": 1, "final_retrain": 0}, [0, 1, 3, 4, 6, 7]),
], ids=["defaults", "layer_by_layer"])
def test_ddp_two_processes_gates_identical_on_every_rank(tmp_path, find_unused_parameters, schedule, boundaries):
    L.seed_everything(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    data = DataLoader(TensorDataset(x, y), batch_size=4)  # DistributedSampler: a different half per rank
    msf = MainSubsidiaryPruning(target_pfr=0.4, selector=2, retrain=1, warmup=1, layers=LAYERS, remove_at_end=False,
                                **schedule)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn",
                             find_unused_parameters=find_unused_parameters),
        max_steps=8,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Binarize(), msf, RankRecord(str(tmp_path))],
    )
    trainer.fit(Classifier(), data)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert sorted(r0["boundaries"]) == sorted(r1["boundaries"]) == boundaries
    for step, b0 in r0["boundaries"].items():
        b1 = r1["boundaries"][step]
        assert b0["phase"] == b1["phase"]
        for name in b0["masks"]:
            assert torch.equal(b0["masks"][name], b1["masks"][name]), f"{name} differs at step {step}"
            assert torch.equal(b0["logits"][name], b1["logits"][name]), f"{name} logits differ at step {step}"
    for name in r0["final"]:
        assert torch.equal(r0["final"][name], r1["final"][name])
    # the gates learned something and the target share was enforced on both ranks
    for name in LAYERS:
        kept = int((r0["final"][name] >= 0).sum())
        assert kept == r0["final"][name].numel() - r0["prune"][name] > 0
    assert r0["backwards"] == r1["backwards"] == r0["steps"] == 8  # one backward per step
