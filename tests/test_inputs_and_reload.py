"""The input size pruning sees (tracing, report) is the data's; networks that are not timm models
reload from ``pruned.pt`` given either the LightningModule or its network; an exception inside
``fit`` leaves the module gated and unpruned."""
import copy

import pytest
import timm
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_bnnprune.callbacks.binarize import Binarize
from lightning_bnnprune.callbacks.greedy import GreedyFilterPruning
from lightning_bnnprune.pruning.gates import gates_of
from lightning_bnnprune.pruning.record import load_pruned

from helpers import UserModule, random_images, small_trainer


def Lit(net: nn.Module) -> UserModule:
    """A user's module around any network (no example_input_array: the size comes from the data)."""
    return UserModule(net, lr=1e-2)


def small_cnn() -> nn.Module:  # not a timm model: the record names layers from the LightningModule
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def _fit(tmp_path, module, pruning, steps=2, size=32, extra=()):
    seed_everything(0)
    trainer = small_trainer(tmp_path, [Binarize(), pruning, *extra], steps)
    trainer.fit(module, random_images(n=16, batch_size=8, size=size, classes=4))
    return trainer


def _macs(net: nn.Module, size) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy.deepcopy(net).eval()(torch.zeros(1, *size))
    return counter.get_total_flops() // 2  # conv and linear: 2 FLOPs per multiply-accumulate


def test_report_counts_macs_at_the_input_size_of_the_data(tmp_path):
    net = timm.create_model("resnet18", num_classes=4)  # timm's pretrained_cfg says 3x224x224
    expected = _macs(net, (3, 32, 32))
    pruning = GreedyFilterPruning(0.4, criterion="l1")
    _fit(tmp_path, Lit(net), pruning)
    assert pruning.record.input_size == [3, 32, 32]
    assert pruning.summary["input_size"] == [3, 32, 32]
    assert pruning.summary["macs_before"] == expected  # 35.6M at 32x32, not 1.8G at 224x224
    assert "at 3x32x32 input" in pruning.report.headline()


def test_a_network_without_binary_convolutions_is_a_one_line_error(tmp_path):
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    with pytest.raises(MisconfigurationException, match=r"^GreedyFilterPruning: the network has no binary convolution to prune"):
        _fit(tmp_path, Lit(mlp), GreedyFilterPruning(0.4, criterion="l1"))


@pytest.mark.parametrize("given", ["module", "network"])
def test_load_pruned_takes_the_module_or_its_network(tmp_path, given):
    trained = Lit(small_cnn())
    pruning = GreedyFilterPruning(0.4, criterion="l1")
    _fit(tmp_path, trained, pruning, size=16)
    assert pruning.record.network_path == "" and pruning.record.input_size == [3, 16, 16]
    fresh = Lit(small_cnn())
    loaded = load_pruned(pruning.pruned_path, model=fresh if given == "module" else fresh.net)
    assert loaded is (fresh if given == "module" else fresh.net)
    x = torch.randn(2, 3, 16, 16)
    trained.eval()
    assert torch.allclose(fresh.net(x), trained.net(x), atol=1e-5)


def test_load_pruned_says_which_module_it_needs(tmp_path):
    pruning = GreedyFilterPruning(0.4, criterion="l1")
    _fit(tmp_path, Lit(small_cnn()), pruning, size=16)
    with pytest.raises(ValueError, match=r"pruned.pt was written from a LightningModule \(layers named like 'net\.\d+'\).*"
                                         r"pass model= the whole LightningModule or the network"):
        load_pruned(pruning.pruned_path, model=nn.Sequential(nn.Linear(2, 2)))


def test_an_exception_inside_fit_leaves_the_module_gated_and_unpruned(tmp_path):
    class Boom(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:  # after the pruning at step 1, before the end
                raise RuntimeError("boom")

    module = Lit(small_cnn())
    pruning = GreedyFilterPruning(0.4, criterion="l1", warmup=1)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, module, pruning, steps=6, extra=[Boom()])
    assert pruning.record is None and pruning.pruned_path is None  # nothing removed, nothing written
    assert len(gates_of(module.net)) == len(pruning.gates) > 0  # the gates stay attached, closed as chosen
    assert module.net[3].out_channels == 16  # the filters are all still there
    assert pruning.pfr() == pytest.approx(0.4, abs=0.05)


@pytest.mark.parametrize("cut", ["half", "text"])
def test_load_pruned_on_a_truncated_file_is_one_line_naming_it(tmp_path, cut):
    pruning = GreedyFilterPruning("l1", target_pfr=0.4)
    _fit(tmp_path, Lit(small_cnn()), pruning, size=16)
    data = open(pruning.pruned_path, "rb").read()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2] if cut == "half" else b"not a model\n")
    with pytest.raises(ValueError) as raised:
        load_pruned(bad)
    message = str(raised.value)
    assert message == (f"{bad} is truncated or not a pruned model written by save_pruned ("
                       + ("its zip index is missing: the file ends early" if cut == "half"
                          else "not a zip archive as torch.save writes") + f"; {bad.stat().st_size} bytes)")
    assert load_pruned(pruning.pruned_path, model=Lit(small_cnn())) is not None  # the intact file still loads
