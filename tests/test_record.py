"""The pruning record and its rebuild (pruning/record.py, pruning/rebuild.py): what a removal cut,
replayed on a fresh model; saving and reloading pruned models, and the errors a mismatching model
gets."""
import pytest
import timm
import torch

from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.rebuild import replay
from lightning_bnnprune.pruning.record import load_pruned, save_pruned
from lightning_bnnprune.pruning.surgery import remove_filters

from helpers import binary_net, close_random, inputs


def removed():
    """A binarised ``test_resnet`` with a seeded random 30-50 % of every group removed, and its record."""
    net = binary_net("test_resnet")
    x = inputs()
    analysis = find_channel_groups(net, x[:1])
    close_random(net, analysis)
    return net, remove_filters(net, analysis, example_inputs=x)


def test_reload_into_a_model_that_does_not_match_is_a_clear_error(tmp_path):
    net, record = removed()
    path = save_pruned(net, record, tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"does not match the pruning record before the removal: .*model \[5, \d+\], record \[10, \d+\]"):
        load_pruned(path, model=timm.create_model("test_resnet", num_classes=5))
    with pytest.raises(ValueError, match=r"the model's binary layers differ from the record's"):
        other = timm.create_model("test_resnet", num_classes=10)
        binarize_model(other, keep_fp=["layer1.*"])
        load_pruned(path, model=other)
    with pytest.raises(ValueError, match=r"the model's weights do not match the record"):
        save_pruned(binary_net("test_resnet"), record, tmp_path / "q.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"is not a pruned model written by save_pruned"):
        load_pruned(tmp_path / "plain.pt")


def test_replay_on_an_already_pruned_model_is_a_no_op(tmp_path):
    net, record = removed()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert replay(net, record) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
