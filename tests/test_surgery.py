"""Physical filter removal on real timm families: exact, reloadable, refused where it cannot be
exact. The record's own checks are in test_record.py, the removal at fit end in
test_filter_pruning.py."""
import pytest
import torch
from torch import nn

from lightning_bnnprune.binarize import binarize_model, binary_layers
from lightning_bnnprune.pruning.gates import attach_gates, gates_of
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.rebuild import shape_manifest
from lightning_bnnprune.pruning.record import PruningRecord, load_pruned, save_pruned
from lightning_bnnprune.pruning.surgery import remove_filters, resolve_keep

from helpers import TIMM_KWARGS, binary_net, close_random, inputs, num_params

FAMILIES = [
    "test_resnet", "test_efficientnet", "test_byobnet", "test_nfnet", "resnet18", "resnet50",
    "vgg11", "mobilenetv3_small_100", "efficientnet_b0", "regnetx_002", "densenet121",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_removal_is_exact_smaller_and_reloads(tmp_path, name):
    net = binary_net(name)
    x = inputs()
    analysis = find_channel_groups(net, x[:1])
    assert analysis.groups, analysis.refused
    masks = close_random(net, analysis)
    params_before = num_params(net)
    with torch.no_grad():
        gated = net(x)

    record = remove_filters(net, analysis, example_inputs=x, timm_kwargs=TIMM_KWARGS.get(name))

    with torch.no_grad():
        pruned = net(x)
    assert (pruned - gated).abs().max() <= 1e-4
    assert record.max_abs_diff <= 1e-4
    assert not gates_of(net) and not net.training
    assert record.groups == {n: torch.nonzero(k).flatten().tolist() for n, k in masks.items()}
    assert 0.25 <= record.pfr <= 0.55
    # parameters dropped exactly as the record says
    assert record.params_before == params_before
    assert num_params(net) == record.params_after < params_before
    assert shape_manifest(net) == record.shapes
    for module_name, dim, kept in record.removed:
        module = net.get_submodule(module_name)
        size = module.weight.shape[1] * getattr(module, "groups", 1) if dim == "in" else module.weight.shape[0]
        assert size == len(kept)

    path = save_pruned(net, record, tmp_path / "pruned.pt")
    loaded = load_pruned(path)  # rebuilt from the record alone: timm name + kwargs, binarise, replay
    assert binary_layers(loaded) == binary_layers(net)
    assert num_params(loaded) == record.params_after
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)


class SpatialNormNet(nn.Module):
    """Every binary conv feeds a layer norm over channels *and* space (``LayerNorm([C, H, W])``):
    a channel's values enter every other channel's statistics together with the positions'."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm = nn.LayerNorm([16, 32, 32])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.norm(self.conv(self.stem(x))))


def test_a_family_without_prunable_group_is_refused_naming_the_layer():
    net = SpatialNormNet()
    binarize_model(net)
    net.eval()
    analysis = find_channel_groups(net, inputs(1))
    assert not analysis.groups and analysis.refused
    why = "LayerNorm normalises over channels and other dimensions together"
    assert all(why in reason for reason in analysis.refused.values())
    with pytest.raises(ValueError, match=rf"no prunable channel group.*norm: {why}"):
        remove_filters(net, analysis, example_inputs=inputs())
    refused = next(iter(analysis.refused))
    with pytest.raises(ValueError, match=rf"group '{refused}' cannot be pruned: .*{why}"):
        remove_filters(net, analysis, masks={refused: [0]}, example_inputs=inputs())


@pytest.fixture(scope="module")
def small():
    net = binary_net("test_nfnet")
    return net, find_channel_groups(net, inputs(1))


def test_refused_group_of_a_partly_prunable_family():
    net = binary_net("test_efficientnet_gn")
    analysis = find_channel_groups(net, inputs(1))
    assert analysis.groups
    refused, why = next(iter(analysis.refused.items()))
    assert "GroupNormAct normalises across channels" in why
    with pytest.raises(ValueError, match=rf"group '{refused}' cannot be pruned: .*GroupNormAct normalises"):
        remove_filters(net, analysis, masks={refused: [0]})


@pytest.mark.parametrize(
    "masks, match",
    [
        ({"nope": [0]}, r"unknown group 'nope'; prunable groups: stem"),
        ({"FIRST": [0, 99]}, r"keep indices for '.*' must be in \[0, \d+\), got \[0, 99\]"),
        ({"FIRST": [True, False]}, r"keep mask for '.*' has 2 entries, the group has \d+ channels"),
        ({"FIRST": [0.5, 0.2]}, r"keep-set for '.*' must be channel indices or a 0/1 mask"),
    ],
)
def test_bad_keep_sets(small, masks, match):
    net, analysis = small
    masks = {(analysis.names[0] if k == "FIRST" else k): v for k, v in masks.items()}
    with pytest.raises(ValueError, match=match):
        remove_filters(net, analysis, masks=masks)


def test_keep_sets_as_indices_or_masks_and_min_filters(small):
    net, analysis = small
    first, second = analysis.names[:2]
    size = analysis[first].size
    by_idx = resolve_keep(net, analysis, {first: [1, 3], second: []}, min_filters=2)
    by_mask = resolve_keep(
        net, analysis, {first: torch.tensor([i in (1, 3) for i in range(size)]), second: torch.zeros(analysis[second].size)},
        min_filters=2,
    )
    assert torch.nonzero(by_idx[first]).flatten().tolist() == [1, 3]
    assert torch.equal(by_idx[first], by_mask[first])
    assert int(by_idx[second].sum()) == 2  # an emptied group keeps min_filters channels
    assert all(bool(k.all()) for n, k in by_idx.items() if n not in (first, second))  # no gates: keep all
    with pytest.raises(ValueError, match="min_filters must be >= 1, got 0"):
        resolve_keep(net, analysis, {}, min_filters=0)


def test_explicit_keep_sets_on_an_ungated_model_and_gate_minimum(tmp_path):
    net = binary_net("test_resnet")
    x = inputs()
    analysis = find_channel_groups(net, x[:1])
    gates = attach_gates(net, analysis)
    owner = analysis.names[0]
    gates[owner].set_mask(torch.zeros(analysis[owner].size))  # every gate closed
    gates[owner].logits.data[3] = -0.1  # ... this one least
    net.train()
    record = remove_filters(net, analysis, masks={analysis.names[1]: [0, 1]}, example_inputs=x, min_filters=1)
    assert net.training and all(m.training for m in net.modules())  # the mode is given back
    assert record.groups[owner] == [3]  # the closed channel with the highest logit reopens
    assert record.groups[analysis.names[1]] == [0, 1]
    assert PruningRecord.from_json(record.to_json()) == record
