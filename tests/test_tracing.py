"""The channel walk over the traced graph: splits and slices at positions kept in block attributes
(CSPNet, CS3DarkNet, Res2NeXt, DPN, ReXNet), anti-aliasing BlurPool2d, and Torch-Pruning's mappings
that used to crash or time out. Each family: real timm model, tiny input, a random 40 % removed for
real, logits equal to the gated network's, reload equal to the pruned one. Radix attention
(ResNeSt, SKNet) traced in its split/add form."""
import pytest
import timm
import torch
from timm.layers import BlurPool2d
from torch import nn

from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning import attach_gates
from lightning_bnnprune.pruning.block_sizes import owner_of
from lightning_bnnprune.pruning.allocation import allocate
from lightning_bnnprune.pruning.groups import coverage, find_channel_groups
from lightning_bnnprune.pruning.record import load_pruned, save_pruned
from lightning_bnnprune.pruning.surgery import remove_filters
from lightning_bnnprune.pruning.tracing import FAN_OUT
from lightning_bnnprune.pruning.traceable import TRACEABLE_FORMS, traceable_attention

from helpers import binary_net, randomise_norms


def random_40_masks(analysis) -> dict:
    """Seeded random 40 % of every prunable group (equal counts per cell), as pruned masks."""
    names = [g.name for g in analysis.groups if g.capacity() > 0]
    counts = allocate({n: analysis[n].size for n in names}, 0.4, total_filters=analysis.num_filters,
                      quanta={n: analysis[n].num_parts for n in names})
    g = torch.Generator().manual_seed(0)
    return {n: ~analysis[n].keep_top(torch.rand(analysis[n].size, generator=g), counts[n]) for n in names}


def prune_40(net, tmp_path, size=32):
    """Random 40 % of every prunable group (equal counts per cell), removed and checked against the
    gated logits, saved and reloaded; returns the analysis, its prunable share and the reloaded net."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    analysis = find_channel_groups(net, x[:1])
    share = coverage(net, analysis).share
    masks = random_40_masks(analysis)
    gates = attach_gates(net, analysis)
    for n, keep in masks.items():
        gates[n].set_mask(keep)
    with torch.no_grad():
        gated = net(x)
    record = remove_filters(net, analysis, masks=masks, example_inputs=x, atol=1e-5)
    with torch.no_grad():
        pruned = net(x)
    assert (pruned - gated).abs().max() <= 1e-5 and record.max_abs_diff <= 1e-5
    loaded = load_pruned(save_pruned(net, record, tmp_path / "pruned.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)
    return analysis, share, loaded


def binary_filters(net: nn.Module) -> int:
    return sum(m.out_channels for m in net.modules() if isinstance(m, BinaryConv2d))


@pytest.mark.parametrize("name, block, attr", [
    ("cs3darknet_s", "stages.0", "expand_chs"),  # x.split(self.expand_chs // 2): used to crash the tracer
    ("cspresnext50", "stages.0", "expand_chs"),  # the same split, blocks with grouped convs
    ("res2next50", "layer1.0", "width"),  # torch.split(out, self.width): parts summed, grouped convs
    ("dpn48b", "features.conv2_2", "num_1x1_c"),  # x[:, :self.num_1x1_c]: residual and dense paths
])
def test_splits_at_block_positions_are_pruned_to_the_target_exactly(tmp_path, name, block, attr):
    net = binary_net(name)
    before = getattr(net.get_submodule(block), attr)
    filters = binary_filters(net)
    analysis, share, loaded = prune_40(net, tmp_path)
    assert not analysis.refused and share == 1.0
    # the target over all binary filters, grouped convs and equal split parts included
    assert 1 - binary_filters(net) / filters == pytest.approx(0.4, abs=0.02)
    after = getattr(net.get_submodule(block), attr)
    assert after < before  # the block's cut position followed its layers
    assert getattr(loaded.get_submodule(block), attr) == after  # and the replay moved it the same way


def test_equal_split_parts_lose_equal_counts(tmp_path):
    net = binary_net("cs3darknet_s")
    analysis, _, _ = prune_40(net, tmp_path)
    stage = net.get_submodule("stages.1")
    # conv_exp's output is split in two halves: both halves kept as many channels
    assert stage.conv_exp.conv.out_channels == stage.expand_chs
    assert stage.expand_chs % 2 == 0 and stage.blocks[0].conv1.conv.in_channels == stage.expand_chs // 2


def test_blur_pool_filters_are_cut_with_their_channels(tmp_path):
    net = binary_net("resnetblur18")
    blurs = {n: m.channels for n, m in net.named_modules() if isinstance(m, BlurPool2d)}
    assert blurs
    analysis, _, loaded = prune_40(net, tmp_path)
    assert any(m.module in blurs for g in analysis.groups for m in g.members)
    for n, channels in blurs.items():
        blur = net.get_submodule(n)
        assert blur.channels == blur.filt.shape[0] < channels
        assert loaded.get_submodule(n).filt.shape[0] == blur.channels


def test_channel_padded_residual_is_exact_and_follows_in_channels(tmp_path):
    net = binary_net("rexnet_100")
    block = net.get_submodule("features.2")
    assert block.use_shortcut
    before = block.in_channels
    prune_40(net, tmp_path)
    first = block.conv_exp.conv if block.conv_exp is not None else block.conv_dw.conv
    assert block.in_channels == first.in_channels < before


class OwnGlobalContext(nn.Module):
    """A user's own global context, written as GCNet writes it (``x.reshape(B, C, H*W) @ attn``),
    with no trace-time form: Torch-Pruning reads the reshape as a flatten of the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.attn = nn.Conv2d(16, 1, 1)
        self.head = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 10))

    def forward(self, x):
        x = self.conv(self.stem(x))
        b, c, h, w = x.shape
        weights = self.attn(x).reshape(b, 1, h * w).softmax(-1).unsqueeze(3)
        return self.head(x + (x.reshape(b, c, h * w).unsqueeze(1) @ weights).view(b, c, 1, 1))


def test_a_reshape_read_as_a_flatten_is_refused_by_name_not_a_time_out():
    net = OwnGlobalContext()
    binarize_model(net)
    analysis = find_channel_groups(net.eval(), torch.randn(1, 3, 16, 16))
    assert analysis.refused["conv"] == (f"conv: channel mapping fans out past {FAN_OUT} entries per channel "
                                        "(a reshape Torch-Pruning reads as a flatten)")


def test_global_context_is_pruned_to_the_target_exactly(tmp_path):
    # GCNet's context is traced as a weighted sum over space; its attention map [B, 1, H, W] is
    # broadcast over the channels (no channel map), its MLP's LayerNorm2d takes the gates
    net = binary_net("gcresnet33ts")
    filters = binary_filters(net)
    analysis, share, _ = prune_40(net, tmp_path)
    assert not analysis.refused and share == 1.0
    assert 1 - binary_filters(net) / filters == pytest.approx(0.4, abs=0.02)


def resnest_2x(width: int = 16) -> nn.Module:
    """ResNeSt with two cardinal groups (radix 2): RadixSoftmax's transpose reorders fc2's channels."""
    torch.manual_seed(0)
    net = timm.create_model("resnest14d", cardinality=2, base_width=width, num_classes=10)
    binarize_model(net)
    randomise_norms(net)
    return net.eval()


@pytest.mark.parametrize("make", [lambda: binary_net("resnest14d"), lambda: binary_net("skresnet18"), resnest_2x,
                                  lambda: binary_net("gcresnet33ts")],
                         ids=["resnest14d", "skresnet18", "resnest_2x", "gcresnet33ts"])
def test_radix_attention_trace_form_computes_the_real_forward(make):
    net = make()
    blocks = [m for m in net.modules() if type(m) in TRACEABLE_FORMS]
    assert blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        real = net(x)
        with traceable_attention(net):
            assert all("forward" in vars(b) for b in blocks)
            traced = net(x)
    assert (traced - real).abs().max() <= 1e-5
    assert not any("forward" in vars(b) for b in blocks)  # the class's forward is back


@pytest.mark.parametrize("name, attn", [("resnest14d", "layer2.0.conv2"), ("skresnet18", "layer2.0.conv1")])
def test_split_attention_is_pruned_to_the_target_exactly(tmp_path, name, attn):
    # the radix paths' channel j, fc2's (or fc_select's) logits for it and the output channel j are
    # one group channel: all pruned together, the paths keep equal widths
    net = binary_net(name)
    filters = binary_filters(net)
    block = net.get_submodule(attn)
    widths_before = block.fc1.in_channels if name == "resnest14d" else block.attn.fc_reduce.in_channels
    analysis, share, loaded = prune_40(net, tmp_path)
    assert not analysis.refused and share == 1.0
    assert 1 - binary_filters(net) / filters == pytest.approx(0.4, abs=0.02)
    if name == "resnest14d":
        width = block.fc1.in_channels
        assert block.conv.out_channels == block.fc2.out_channels == block.radix * width
    else:
        width = block.attn.fc_reduce.in_channels
        assert all(p.conv.out_channels == width for p in block.paths)
        assert block.attn.fc_select.out_channels == block.num_paths * width
        assert block.in_channels == sum(p.conv.in_channels for p in block.paths)  # its input split followed
    assert width < widths_before
    assert loaded.get_submodule(attn).state_dict().keys() == block.state_dict().keys()


def test_split_attention_with_cardinal_groups_is_removed_exactly():
    net = resnest_2x()
    x = torch.randn(2, 3, 32, 32)
    analysis = find_channel_groups(net, x[:1])
    assert not analysis.refused
    # no reload here: the record cannot read cardinality=2 back from the model (timm_kwargs would)
    record = remove_filters(net, analysis, masks=random_40_masks(analysis), example_inputs=x, atol=1e-5)
    assert record.max_abs_diff <= 1e-5
    block = net.get_submodule("layer3.0.conv2")
    assert block.conv.groups == 4 and block.fc2.out_channels == block.conv.out_channels == 2 * block.fc1.in_channels


class OwnRadixBlock(nn.Module):
    """A user's own radix sum, written as split attention writes it, with no trace-time form."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.paths = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 10))

    def forward(self, x):
        x = self.paths(self.stem(x))
        return self.head(x.reshape(x.shape[0], 2, 8, *x.shape[2:]).sum(1))


def test_a_radix_reshape_without_a_trace_form_is_refused_by_name():
    net = OwnRadixBlock()
    binarize_model(net)
    analysis = find_channel_groups(net.eval(), torch.randn(1, 3, 16, 16))
    assert analysis.refused["paths"].endswith("which Torch-Pruning maps as a flatten")


class OwnSliceBlock(nn.Module):
    """A user's own block that cuts a conv's output at a position written in its code."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.conv(self.stem(x))[:, :12])


def test_a_slice_whose_block_has_no_rule_is_refused_by_name():
    net = OwnSliceBlock()
    binarize_model(net)
    assert owner_of(net, "conv") is None
    analysis = find_channel_groups(net.eval(), torch.randn(1, 3, 16, 16))
    assert analysis.refused["conv"] == "conv: its output is sliced at channel positions fixed in the model's code"


def test_mixed_kernel_splits_follow_their_convs(tmp_path):
    from timm.layers.mixed_conv2d import MixedConv2d
    net = binary_net("mixnet_s")
    before = {n: list(m.splits) for n, m in net.named_modules() if isinstance(m, MixedConv2d) and len(m.splits) > 1}
    analysis, share, loaded = prune_40(net, tmp_path)
    assert share > 0.9  # was 0.09 while every mixed-kernel split was refused
    cut = [n for n in before if sum(net.get_submodule(n).splits) < sum(before[n])]
    assert cut
    for n in cut:
        mixed = net.get_submodule(n)
        assert mixed.splits == [c.in_channels for c in mixed.values()] == loaded.get_submodule(n).splits
