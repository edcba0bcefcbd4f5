"""The last CNN families: ConvNeXt's layer norm over channels (its statistics follow the gates),
DPN's plain blocks (a cut position that moves with its conv's cut), free per-channel parameters
(layer scales), FastViT's channel-multiplier convs and ECA's conv across channels (run on the open
channels while gated). Each: a real timm model in a tiny configuration, a random 40 % of every
group closed, the closed gates equal to the removed channels, the reload equal to the pruned model,
and the PFR over all binary filters at the target; ConvNeXt also through a real Trainer."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning import attach_gates, detach_gates
from lightning_bnnprune.pruning.allocation import allocate
from lightning_bnnprune.pruning.gated_norm import masked_layer_norm
from lightning_bnnprune.pruning.groups import coverage, find_channel_groups
from lightning_bnnprune.pruning.record import load_pruned, save_pruned
from lightning_bnnprune.pruning.slicing import per_channel_axis
from lightning_bnnprune.pruning.surgery import remove_filters

from helpers import randomise_norms


def binary_net(name: str, **kwargs) -> nn.Module:
    """Binarised, eval mode; batch norms, layer norms and layer scales random, so that a wrong cut or
    a norm that still sees a closed channel shows in the logits (ConvNeXt's layer scale starts at
    1e-6, which would hide every residual branch)."""
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10, **kwargs)
    binarize_model(net)
    randomise_norms(net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
        for n, p in net.named_parameters():
            if n.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return net.eval()


def binary_filters(net: nn.Module) -> int:
    return sum(m.out_channels for m in net.modules() if isinstance(m, BinaryConv2d))


def prune_40(net, tmp_path, timm_kwargs, size=32):
    """A seeded random 40 % of every prunable group closed, removed (checked against the gated
    logits), saved and reloaded from the record; returns the analysis and its prunable share."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    analysis = find_channel_groups(net, x[:1])
    share = coverage(net, analysis).share
    names = [g.name for g in analysis.groups if g.capacity() > 0]
    counts = allocate({n: analysis[n].size for n in names}, 0.4, total_filters=analysis.num_filters,
                      quanta={n: analysis[n].num_parts for n in names})
    g = torch.Generator().manual_seed(0)
    masks = {n: ~analysis[n].keep_top(torch.rand(analysis[n].size, generator=g), counts[n]) for n in names}
    gates = attach_gates(net, analysis)
    for n, keep in masks.items():
        gates[n].set_mask(keep)
    with torch.no_grad():
        gated = net(x)
    detach_gates(net)
    record = remove_filters(net, analysis, masks=masks, example_inputs=x, atol=1e-5, timm_kwargs=timm_kwargs)
    with torch.no_grad():
        pruned = net(x)
    assert (pruned - gated).abs().max() <= 1e-5 and record.max_abs_diff <= 1e-5
    loaded = load_pruned(save_pruned(net, record, tmp_path / "pruned.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)
    return analysis, share


@pytest.mark.parametrize("axis, shape", [(1, (2, 6, 3, 3)), (-1, (2, 3, 3, 6))])
def test_masked_layer_norm_equals_the_norm_over_the_kept_channels(axis, shape):
    x = torch.randn(*shape)
    weight, bias = torch.randn(6), torch.randn(6)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    kept = mask.bool()
    y = masked_layer_norm(x, mask, weight, bias, 1e-6, axis)
    if axis == 1:
        ref = F.layer_norm(x[:, kept].permute(0, 2, 3, 1), (4,), weight[kept], bias[kept], 1e-6).permute(0, 3, 1, 2)
        assert torch.allclose(y[:, kept], ref, atol=1e-6)
    else:
        ref = F.layer_norm(x[..., kept], (4,), weight[kept], bias[kept], 1e-6)
        assert torch.allclose(y[..., kept], ref, atol=1e-6)
    assert torch.isfinite(y).all()  # a closed channel's output is finite: masked consumers zero it


# convnext_atto's blocks in the NCHW form (LayerNorm2d, 1x1 convs: binarised), test_convnext's in the
# channels-last form (nn.LayerNorm over the last dimension, linear layers: full precision)
CONVNEXTS = [
    ("convnext_atto", dict(depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))),
    ("test_convnext", {}),
]


@pytest.mark.parametrize("name, kwargs", CONVNEXTS, ids=[n for n, _ in CONVNEXTS])
def test_convnext_layer_norms_follow_the_gates_and_are_cut_exactly(tmp_path, name, kwargs):
    net = binary_net(name, **kwargs)
    norms = {n: m.normalized_shape[0] for n, m in net.named_modules() if isinstance(m, nn.LayerNorm)}
    filters = binary_filters(net)
    analysis, share = prune_40(net, tmp_path, kwargs)
    assert not analysis.refused
    assert any(m.module in norms for g in analysis.groups for m in g.members)
    cut = {n for n, c in norms.items() if net.get_submodule(n).normalized_shape[0] < c}
    assert cut and all(net.get_submodule(n).weight.shape[0] == net.get_submodule(n).normalized_shape[0] for n in cut)
    if name == "convnext_atto":  # every binary filter is in a group: the target over all of them
        assert share == 1.0
        assert 1 - binary_filters(net) / filters == pytest.approx(0.4, abs=0.02)


def test_an_open_gate_leaves_the_layer_norm_as_it_was():
    net = binary_net("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = net(x)
    attach_gates(net, find_channel_groups(net, x[:1]))
    with torch.no_grad():
        assert torch.allclose(net(x), plain, atol=1e-5)  # all open: the same norm, computed the masked way
    detach_gates(net)
    with torch.no_grad():
        assert torch.equal(net(x), plain)  # hooks gone


def test_layer_scales_are_cut_with_their_channels(tmp_path):
    kwargs = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
    net = binary_net("convnext_atto", **kwargs)
    scales = {n: p.numel() for n, p in net.named_parameters() if n.endswith("gamma")}
    assert scales and all(per_channel_axis(p) == 0 for n, p in net.named_parameters() if n in scales)
    analysis, _ = prune_40(net, tmp_path, kwargs)
    assert any(m.role == "param:gamma" for g in analysis.groups for m in g.members)
    assert all(dict(net.named_parameters())[n].numel() < size for n, size in scales.items())


def test_plain_dpn_blocks_move_their_cut_position_with_their_conv(tmp_path):
    # dpn68 (no "b"): c1x1_c makes the residual and the dense increment in one conv, cut at num_1x1_c
    kwargs = dict(k_sec=(2, 2, 1, 1), k_r=64)
    net = binary_net("dpn68", **kwargs)
    block = net.get_submodule("features.conv2_2")
    assert block.c1x1_c1 is None
    before = block.num_1x1_c, block.inc
    filters = binary_filters(net)
    analysis, share = prune_40(net, tmp_path, kwargs)
    assert not analysis.refused and share == 1.0
    assert block.num_1x1_c < before[0] and block.num_1x1_c + block.inc == block.c1x1_c.conv.out_channels
    assert 1 - binary_filters(net) / filters == pytest.approx(0.4, abs=0.02)


def test_fastvit_layer_scales_and_channel_multipliers_are_cut_exactly(tmp_path):
    # FastViT's patch embedding widens the stream with a depthwise conv of channel multiplier 2
    # (groups == in, out == 2 * in): input channel c and outputs 2c, 2c+1 go together, so every
    # stage's stream is one group; its layer scales (LayerScale2d.gamma, [C, 1, 1]) are cut with it
    kwargs = dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 64, 128))
    net = binary_net("fastvit_t8", **kwargs)
    embed = net.get_submodule("stages.1.downsample.proj.0.large_conv.conv")
    assert embed.groups == embed.in_channels == 16 and embed.out_channels == 32
    filters = binary_filters(net)
    analysis, share = prune_40(net, tmp_path, kwargs)
    assert not analysis.refused and share == 1.0
    assert embed.groups == embed.in_channels < 16 and embed.out_channels == 2 * embed.in_channels
    scale = net.get_submodule("stages.1.blocks.0.layer_scale").gamma
    assert scale.shape == (embed.out_channels, 1, 1)
    assert 1 - binary_filters(net) / filters == pytest.approx(0.4, abs=0.02)


class OwnEcaNet(nn.Module):
    """ECA in front of a full-precision classifier: a binary consumer would hide it (sign(x * a) =
    sign(x) for a positive attention a), a linear layer sees every change of a channel's window."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers.eca import EcaModule

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.attn = EcaModule(kernel_size=5)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.head(self.attn(self.bn(self.conv(self.stem(x)))))


def test_eca_runs_on_the_kept_channels_while_gated_and_is_removed_exactly(tmp_path):
    # ECA's 1-D conv runs across the channels: after a cut, channel c's window holds its kept
    # neighbours; gated, the layer runs on the open channels only, so the logits agree
    torch.manual_seed(0)
    net = OwnEcaNet()
    binarize_model(net)
    randomise_norms(net).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    analysis = find_channel_groups(net, x[:1])
    assert not analysis.refused and analysis.names == ["conv"]
    assert any(m.module == "attn" and m.role == "mixer" for m in analysis["conv"].members)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    record = remove_filters(net, analysis, masks={"conv": keep}, example_inputs=x, atol=1e-5)
    assert record.max_abs_diff <= 1e-5 and net.conv.out_channels == net.head[2].in_features == int(keep.sum())
    loaded = load_pruned(save_pruned(net, record, tmp_path / "pruned.pt"), model=OwnEcaNet())
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_eca_resnet_prunes_to_the_target_exactly(tmp_path):
    net = binary_net("eca_resnet33ts")
    filters = binary_filters(net)
    analysis, share = prune_40(net, tmp_path, {})
    assert not analysis.refused and share == 1.0
    assert 1 - binary_filters(net) / filters == pytest.approx(0.4, abs=0.02)


def test_convnext_fit_with_learned_gates_prunes_to_the_target_exactly(tmp_path):
    # through a real Trainer: Main/Subsidiary's gates learn through the gated layer norms, the
    # removal at fit end is exact and the saved model reloads to the same logits
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_bnnprune import Binarize, MainSubsidiaryPruning

    from helpers import UserModule

    kwargs = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64))
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    module = UserModule(timm.create_model("convnext_atto", num_classes=10, **kwargs), example_input_size=(3, 32, 32))
    pruning = MainSubsidiaryPruning(target_pfr=0.4, selector=1, retrain=1, allocation="uniform")
    trainer = Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[Binarize(), pruning])
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert not pruning.analysis.refused
    assert pruning.summary["binary_pfr"] == pytest.approx(0.4, abs=0.02)
    assert pruning.record.max_abs_diff <= 1e-4
    loaded = load_pruned(pruning.pruned_path, model=timm.create_model("convnext_atto", num_classes=10, **kwargs))
    x = torch.randn(3, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))


class NormActNet(nn.Module):
    """timm's LayerNormAct2d (norm, then its activation) between two binary convs, and a user's own
    layer-norm subclass, whose forward this library does not know, refused by name."""

    def __init__(self, own_norm: bool = False) -> None:
        super().__init__()
        from timm.layers import LayerNormAct2d

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.norm = OwnLayerNorm2d(16) if own_norm else LayerNormAct2d(16, act_layer=nn.GELU)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.conv2(self.norm(self.conv(self.stem(x)))))


class OwnLayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * 2.0


def test_layer_norm_with_activation_is_gated_and_an_unknown_form_is_refused():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    net = NormActNet()
    binarize_model(net)
    with torch.no_grad():
        net.norm.weight.normal_(1.0, 0.3)
        net.norm.bias.normal_(0.0, 0.3)
    analysis = find_channel_groups(net.eval(), x[:1])
    assert "conv" in analysis.names
    keep = torch.arange(16) % 3 != 1
    record = remove_filters(net, analysis, masks={"conv": keep}, example_inputs=x, atol=1e-5)
    assert record.max_abs_diff <= 1e-5 and net.norm.normalized_shape == (int(keep.sum()),)
    own = NormActNet(own_norm=True)
    binarize_model(own)
    refused = find_channel_groups(own.eval(), x[:1]).refused
    assert refused["conv"] == "norm: OwnLayerNorm2d is a layer norm whose forward this library does not know"
