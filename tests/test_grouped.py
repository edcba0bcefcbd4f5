"""Grouped convolutions (RegNet, ResNeXt): equal counts per conv group, exact removal, reload; and
the fit-start line when refused groups cap the PFR."""
import pytest
import timm
import torch
from lightning.pytorch import seed_everything
from torch import nn

from lightning_bnnprune import Binarize, GreedyFilterPruning, MainSubsidiaryPruning, load_pruned
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.pruning.allocation import allocate
from lightning_bnnprune.pruning.groups import coverage, find_channel_groups
from lightning_bnnprune.pruning.slicing import slice_channels
from lightning_bnnprune.pruning.surgery import remove_filters

from helpers import UserModule, random_images, small_trainer


def _fit(tmp_path, name, pruning, max_steps):
    seed_everything(0)
    module = UserModule(name, example_input_size=(3, 32, 32))
    trainer = small_trainer(tmp_path, [Binarize(), pruning], max_steps)
    trainer.fit(module, random_images(n=16, batch_size=8))
    return module


@pytest.mark.parametrize("name, make", [
    ("regnety_002", lambda: GreedyFilterPruning(criterion="binarization_error", target_pfr=0.4)),
    ("regnetx_002", lambda: MainSubsidiaryPruning(target_pfr=0.4, selector=1, retrain=1, allocation="uniform")),
])
def test_grouped_conv_network_reaches_the_target_exactly_and_reloads(tmp_path, name, make):
    pruning = make()
    module = _fit(tmp_path, name, pruning, max_steps=2)
    assert not pruning.analysis.refused  # every bottleneck group, grouped convs included, is prunable
    assert any(g.num_parts > 1 for g in pruning.analysis.groups)
    # the target over *all* binary filters, not only the prunable ones (the 12.8 % before)
    assert pruning.summary["binary_pfr"] == pytest.approx(0.4, abs=0.02)
    assert pruning.record.max_abs_diff <= 1e-4
    grouped = [m for m in module.net.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels]
    assert grouped and all(m.in_channels % m.groups == 0 == m.out_channels % m.groups for m in grouped)
    x = torch.randn(3, 3, 32, 32)
    loaded = load_pruned(pruning.pruned_path)
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


def test_selections_keep_equal_counts_per_conv_group():
    net = timm.create_model("resnext26ts", num_classes=10)
    binarize_model(net)
    analysis = find_channel_groups(net.eval(), torch.randn(1, 3, 32, 32))
    group = next(g for g in analysis.groups if g.num_parts > 1)
    cells = torch.tensor(group.parts)
    scores = torch.randn(group.size, generator=torch.Generator().manual_seed(0))
    keep = group.keep_top(scores, group.size // 2)
    per_cell = [int(keep[cells == c].sum()) for c in range(group.num_parts)]
    assert len(set(per_cell)) == 1 and sum(per_cell) == group.size // 2
    for c in range(group.num_parts):  # the best of each cell stay
        assert scores[(cells == c) & keep].min() >= scores[(cells == c) & ~keep].max()
    with pytest.raises(ValueError, match=f"multiple of {group.num_parts}"):
        group.keep_top(scores, group.num_parts + 1)
    # an unbalanced explicit keep-set is refused in one line, before anything is cut
    unbalanced = torch.ones(group.size, dtype=torch.bool)
    unbalanced[0] = False
    with pytest.raises(ValueError, match="same number of channels in each of its"):
        remove_filters(net, analysis, masks={group.name: unbalanced})
    conv = nn.Conv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match=r"groups=2.*keep \[3, 4\]"):
        slice_channels(conv, "in", [0, 1, 2, 4, 5, 6, 7])


def test_allocation_with_quanta_keeps_multiples_and_the_total():
    sizes = {"a": 64, "b": 48, "c": 96, "d": 40}
    quanta = {"b": 8, "c": 16}
    counts = allocate(sizes, 0.4, "uniform", quanta=quanta)
    assert counts["b"] % 8 == 0 and counts["c"] % 16 == 0
    assert sum(counts.values()) == round(0.4 * sum(sizes.values()))
    # a grouped group keeps at least one channel per cell: 96 - 16 is its most
    assert allocate({"c": 96}, 0.8, quanta={"c": 16})["c"] == 80


def test_fit_start_says_when_refused_groups_cap_the_pfr(tmp_path):
    pruning = GreedyFilterPruning(criterion="l1", target_pfr=0.4)
    with pytest.warns(UserWarning, match=r"target PFR 40.0% reaches only .* GroupNormAct normalises across channels"):
        _fit(tmp_path, "test_efficientnet_gn", pruning, max_steps=1)
    markdown = pruning.report.to_markdown()
    assert "Groups left whole" in markdown and "GroupNormAct normalises across channels" in markdown
    assert pruning.summary["binary_pfr"] < 0.1  # what the line announced


def test_no_line_when_the_target_is_reachable():
    net = timm.create_model("regnetx_002", num_classes=10)
    binarize_model(net)
    cov = coverage(net, find_channel_groups(net.eval(), torch.randn(1, 3, 32, 32)))
    assert cov.share == 1.0 and cov.note(0.4) is None


class SplitNet(nn.Module):
    """A split into sizes fixed in the code (Res2Net, MixNet, CSP) must be refused by name; paths
    stacked and summed channel by channel are one group; the rest is cut exactly."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.path_a, self.path_b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.sk_a, self.sk_b = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(8, 6, 5, padding=2)
        self.conv3 = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv1(torch.relu(self.stem(x)))
        a, b = torch.split(x, [4, 4], dim=1)
        x = self.conv2(torch.cat([self.path_a(a), self.path_b(b)], dim=1))
        x = torch.stack([self.sk_a(x), self.sk_b(x)], dim=1).sum(1)
        return self.fc(self.conv3(x).mean((2, 3)))


def test_a_fixed_split_is_refused_by_name_and_the_rest_is_exact():
    torch.manual_seed(0)
    net = SplitNet()
    binarize_model(net)
    x = torch.randn(2, 3, 8, 8)
    analysis = find_channel_groups(net.eval(), x[:1])
    assert "split into fixed sizes" in analysis.refused["conv1"]
    assert analysis["sk_a"].producers == ["sk_a", "sk_b"]  # stacked, then summed: one channel each
    masks = {g.name: [0] for g in analysis.groups}
    record = remove_filters(net, analysis, masks=masks, example_inputs=x)
    assert record.max_abs_diff <= 1e-4 and record.num_pruned > 0
