"""Per-filter gates (pruning/gates.py) alone: the gate's forward and straight-through gradient, its
masks, and gates on a real binarised network acting on the consumers' inputs."""
import pytest
import timm
import torch

from lightning_bnnprune import binarize_model, find_channel_groups
from lightning_bnnprune.pruning.gates import FilterGate, attach_gates, detach_gates, gates_of, is_gate_key

from helpers import randomise_norms


def test_gate_forward_is_zero_one_with_a_clipped_straight_through_gradient():
    gate = FilterGate(4)
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-2.0, -0.5, 0.0, 0.5]))
    g = gate()
    assert g.tolist() == [0.0, 0.0, 1.0, 1.0]  # sign(0) = +1: m = 0 is open
    g.sum().backward()
    assert gate.logits.grad.tolist() == [0.0, 0.5, 0.5, 0.5]  # 1/2 inside |m| <= 1, 0 outside
    assert gate.num_open == 2 and gate.mask().tolist() == [0.0, 0.0, 1.0, 1.0]


def test_set_mask_sets_the_logits_and_checks_the_size():
    gate = FilterGate(3)
    gate.set_mask(torch.tensor([1, 0, 1]))
    assert gate.logits.tolist() == [0.5, -0.5, 0.5] and gate.num_open == 2
    with pytest.raises(ValueError, match="keep has 2 entries, the gate 3"):
        gate.set_mask(torch.tensor([1, 0]))


def test_gates_act_on_the_consumers_and_come_off_cleanly():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10)
    binarize_model(net)
    randomise_norms(net).eval()  # a wrong routing shows in the logits
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
    analysis = find_channel_groups(net, x[:1])
    gates = attach_gates(net, analysis)
    assert list(gates) == analysis.names and gates_of(net) == gates
    assert attach_gates(net, analysis) == gates  # idempotent: the same gate objects
    with torch.no_grad():
        assert torch.equal(net(x), before)  # all open: the network is unchanged
        gates[analysis.names[0]].set_mask(torch.zeros(analysis.groups[0].size))
        assert not torch.equal(net(x), before)
    keys = [k for k in net.state_dict() if is_gate_key(k)]
    assert len(keys) == len(gates) and all(k.endswith(".filter_gate.logits") for k in keys)
    masks = detach_gates(net)
    assert set(masks) == set(gates) and not gates_of(net)
    assert not any(is_gate_key(k) for k in net.state_dict())
    with torch.no_grad():
        assert torch.equal(net(x), before)
