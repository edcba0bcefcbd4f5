"""Mixed precision on CPU: ``precision="bf16-mixed"`` trains the binary network in bfloat16
(autocast), MainSubsidiaryPruning prunes it, the removal is exact and the pruned model reloads
equal, in float32 and under bfloat16 autocast."""
from __future__ import annotations

import copy

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnnprune import Binarize, MainSubsidiaryPruning, load_pruned

from helpers import UserModule

LAYERS = ["conv1.6", "layer2.0.conv1"]  # tests/test_msf_ddp.py's smallest schedule
#: max |logit difference| of the pruned network against the gated one it was cut from: in float32
#: (the record's exactness check), and under bfloat16 autocast relative to the largest logit, one
#: bfloat16 step (8 bits of mantissa), should a kernel sum the kept channels in another order.
#: Both measured 0 here (CPU, torch 2.14): a closed gate contributes exact zeros.
FLOAT32_EXACT = 1e-5
BF16_RELATIVE = 2 ** -8


class TrainingDtype(Callback):
    """The classifier's output dtypes during training (the callbacks' own checks run in float32),
    and the gated network that fit leaves."""

    def on_train_start(self, trainer, pl_module):
        self.dtypes = set()
        pl_module.net.get_classifier().register_forward_hook(lambda m, i, out: self.dtypes.add(out.dtype))

    def on_train_end(self, trainer, pl_module):  # before the removal, in on_fit_end
        self.gated = copy.deepcopy(pl_module.net).eval()


def test_bf16_mixed_prunes_removes_exactly_and_reloads_equal(tmp_path):
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)),
                      batch_size=4)
    module = UserModule("test_resnet", lr=1e-2)
    msf = MainSubsidiaryPruning(target_pfr=0.4, selector=2, retrain=1, warmup=1, layers=LAYERS)
    seen = TrainingDtype()
    trainer = Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=8, default_root_dir=tmp_path,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[Binarize(), msf, seen])
    trainer.fit(module, data)

    assert trainer.precision == "bf16-mixed" and torch.bfloat16 in seen.dtypes  # the steps ran in bfloat16
    for name in LAYERS:  # the learned share of each pruned layer was cut
        size = msf.record.group_sizes[name]
        assert len(msf.record.groups[name]) == size - msf.prune_counts[name] < size
    assert msf.record.max_abs_diff <= FLOAT32_EXACT
    pruned = module.net.eval()
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert (pruned(x) - seen.gated(x)).abs().max() <= FLOAT32_EXACT
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cut, gated = pruned(x).float(), seen.gated(x).float()
        assert (cut - gated).abs().max() <= BF16_RELATIVE * gated.abs().max()

        loaded = load_pruned(msf.pruned_path)
        assert torch.equal(loaded(x), pruned(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(loaded(x), pruned(x))
