"""FilterPruning, the base of every strategy, in a real Trainer: the removal at fit end (in place,
pruned.pt, the report, checkpoints that restore), remove_at_end=False, and DDP spawn."""
import os
import re

import pytest
import timm
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_bnnprune import Binarize, FilterPruning
from lightning_bnnprune.pruning.gates import gates_of
from lightning_bnnprune.pruning.record import CHECKPOINT_KEY, load_pruned, restore_pruned

from helpers import UserModule, inputs, num_params, random_images, small_trainer


class RandomClosing(FilterPruning):
    """The smallest strategy: close a fixed seeded random share of every group once the gates exist
    (in ``setup``, before DDP wraps the module: the gates never train, so DDP must not wait for
    their gradients)."""

    @override
    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        g = torch.Generator().manual_seed(0)
        for gate in self.gates.values():
            gate.logits.requires_grad_(False)
            n = gate.logits.numel()
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=g)[: int(self.target_pfr * n)]] = False
            gate.set_mask(keep)


def _fit(tmp_path, module):
    pruning = RandomClosing(target_pfr=0.4, input_size=(3, 32, 32))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = small_trainer(tmp_path, [Binarize(), pruning, checkpoint], 2)
    trainer.fit(module, random_images(n=16, batch_size=8))
    return trainer, pruning, checkpoint


def test_fit_end_removes_in_place_writes_pruned_checkpoint_report_and_restores(tmp_path):
    seed_everything(0)
    module = UserModule()
    params_fp = num_params(module)
    trainer, pruning, checkpoint = _fit(tmp_path, module)

    record = pruning.record
    assert record is not None and record.network_path == "net"
    assert num_params(module) == record.params_after < params_fp  # the user's module IS the smaller net
    assert not gates_of(module.net)
    assert 0.35 <= pruning.pfr() <= 0.45 and pruning.kept_filters() == {n: len(k) for n, k in record.groups.items()}
    assert set(pruning.summary) >= {"pfr", "mac_ratio", "compression"}
    assert pruning.summary["mac_ratio"] > 2.0 and pruning.summary["compression"] > 32.0
    assert pruning.pruned_path == os.path.join(tmp_path / "ckpt", "pruned.pt")
    for suffix in ("csv", "md", "png"):
        assert os.path.getsize(pruning.report_paths[suffix]) > 0
    assert os.path.dirname(pruning.report_paths["md"]) == str(tmp_path / "ckpt")

    x = inputs()
    module.eval()
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(load_pruned(pruning.pruned_path)(x), expected)

    # A Lightning checkpoint saved after the removal carries the record: one call restores it.
    final = tmp_path / "ckpt" / "final.ckpt"
    trainer.save_checkpoint(final)
    ckpt = torch.load(final, weights_only=True)
    assert ckpt[CHECKPOINT_KEY]["groups"] == record.groups
    assert "optimizer_states" not in ckpt  # the fit's optimizer state belongs to the uncut tensors
    fresh = restore_pruned(UserModule(), final).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    bare = restore_pruned(timm.create_model("test_resnet", num_classes=10), final).eval()
    with torch.no_grad():
        assert torch.equal(bare(x), expected)

    # A checkpoint cut short (a copy or a kill mid-write) is one line naming it, not a zip traceback.
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(final.read_bytes()[: os.path.getsize(final) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(cut))} is truncated or not a Lightning checkpoint"):
        restore_pruned(UserModule(), cut)

    # The checkpoints ModelCheckpoint wrote during fit are the gated network: not restorable as pruned.
    during = checkpoint.best_model_path or checkpoint.last_model_path
    with pytest.raises(ValueError, match="holds no pruning record: it was saved before the filters were removed"):
        restore_pruned(UserModule(), during)

    # A second run into the same folder never overwrites: it gets -v1 names.
    _, second, _ = _fit(tmp_path, UserModule())
    assert second.pruned_path == os.path.join(tmp_path / "ckpt", "pruned-v1.pt")
    assert second.report_paths["csv"].endswith("pruning_report-v1.csv")
    with torch.no_grad():
        assert torch.equal(load_pruned(pruning.pruned_path)(x), expected)


def test_remove_at_end_false_leaves_the_gated_network(tmp_path):
    seed_everything(0)
    module = UserModule()
    pruning = RandomClosing(target_pfr=0.4, input_size=(3, 32, 32), remove_at_end=False)
    trainer = small_trainer(tmp_path, [Binarize(), pruning], 1)
    trainer.fit(module, random_images(n=16, batch_size=8))
    assert pruning.record is None and gates_of(module.net)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("pruned", "pruning_report"))]


class SaveRecordPerRank(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, FilterPruning))
        torch.save({"record": pruning.record.to_dict(), "summary": pruning.summary},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def test_ddp_spawn_every_rank_cuts_the_same_network_and_rank_zero_writes(tmp_path):
    # A spawn launcher hands rank zero's state dict back to the main process's (uncut) module, so
    # the workers cut a copy and the pruned model is the file; the main process must not fail.
    seed_everything(0)
    module = UserModule()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[Binarize(), RandomClosing(target_pfr=0.4, input_size=(3, 32, 32)), SaveRecordPerRank(str(tmp_path))],
    )
    trainer.fit(module, random_images(n=16, batch_size=8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    diffs = [r["record"].pop("max_abs_diff") for r in (r0, r1)]  # float noise may differ per process
    assert max(diffs) <= 1e-4
    assert r0["record"] == r1["record"] and r0["summary"] == r1["summary"]
    files = sorted(f for f in os.listdir(tmp_path) if f.startswith(("pruned", "pruning_report")))
    assert files == ["pruned.pt", "pruning_report.csv", "pruning_report.md", "pruning_report.png"]
    loaded = load_pruned(tmp_path / "pruned.pt")
    assert sum(p.numel() for p in loaded.parameters()) == r0["record"]["params_after"]
