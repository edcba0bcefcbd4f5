"""Importance criteria on a real binarised timm network: each against a direct computation."""
import pytest
import timm
import torch

from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning import attach_gates, criteria, find_channel_groups


@pytest.fixture(scope="module")
def binary_resnet():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10)
    binarize_model(net)
    analysis = find_channel_groups(net, torch.randn(1, 3, 32, 32))
    return net, analysis


def _direct(net, group, per_filter):
    """Score of each group channel, summed over binary producers, computed the plain way."""
    scores = torch.zeros(group.size)
    for member in group.members:
        conv = net.get_submodule(member.module)
        if member.role == "out" and isinstance(conv, BinaryConv2d):
            for i, r in zip(member.idxs, member.root_idxs):
                scores[r] += per_filter(conv.weight.detach()[i])
    return scores


def _cos2(w):
    alpha = w.abs().mean()
    error = (w - alpha * torch.where(w >= 0, 1.0, -1.0)).pow(2).sum()  # ||W_k - alpha_k sign(W_k)||^2
    return 1.0 - error / w.pow(2).sum()


def test_registry_lists_choices_and_rejects_unknown():
    assert criteria.available() == ("binarization_error", "l1", "random")
    choices = r"registered criteria: binarization_error, l1, random$"
    with pytest.raises(ValueError, match=r"Unknown criterion 'l2'; " + choices):
        criteria.get("l2")
    with pytest.raises(ValueError, match=r"Cannot interpret 3 .*binarization_error, l1, random or a callable"):
        criteria.get(3)
    with pytest.raises(TypeError):
        criteria.get("l1", seed=1)

    def mine(network, group):
        return torch.zeros(group.size)

    assert criteria.get(mine) is mine
    assert isinstance(criteria.get("random", seed=3), criteria.RandomScore)


def test_l1_is_mean_abs_latent_weight_summed_over_binary_producers(binary_resnet):
    net, analysis = binary_resnet
    l1 = criteria.get("l1")
    multi = [g for g in analysis.groups if len(list(criteria.binary_producers(net, g))) > 1]
    assert multi, "test_resnet has residual groups with several binary producers"
    for group in analysis.groups:
        expected = _direct(net, group, lambda w: w.abs().mean())
        torch.testing.assert_close(l1(net, group), expected, rtol=1e-5, atol=1e-7)


def test_binarization_error_is_relative_xnor_error(binary_resnet):
    net, analysis = binary_resnet
    crit = criteria.get("binarization_error")
    for group in analysis.groups:
        expected = _direct(net, group, _cos2)
        scores = crit(net, group)
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
        n_producers = len(list(criteria.binary_producers(net, group)))
        assert scores.min() >= 0 and scores.max() <= n_producers + 1e-6  # cos^2 in [0, 1] per producer


def test_binarization_error_prunes_largest_relative_error_first_not_smallest_magnitude(binary_resnet):
    net, analysis = binary_resnet
    group = analysis["layer1.0.conv1"]  # a single binary producer
    conv = net.get_submodule("layer1.0.conv1")
    original = conv.weight.detach().clone()
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            shape = conv.weight.shape[1:]
            conv.weight.uniform_(-0.3, 0.3, generator=g)
            # filter 0: tiny but all of one magnitude -> its binary form is exact (error 0)
            conv.weight[0] = 0.01 * torch.where(torch.randn(shape, generator=g) >= 0, 1.0, -1.0)
            # filter 1: large, but all weight in a few entries, the rest near zero -> worst binary fit
            spiky = torch.randn(shape, generator=g) * 1e-3
            spiky.view(-1)[:3] = 0.9
            conv.weight[1] = spiky
        l1 = criteria.get("l1")(net, group)
        be = criteria.get("binarization_error")(net, group)
        assert int(l1.argmin()) == 0  # l1 would prune the tiny filter first ...
        assert int(be.argmax()) == 0 and be[0] == pytest.approx(1.0)  # ... it binarises exactly: kept
        assert int(be.argmin()) == 1  # the largest relative error goes first
    finally:
        with torch.no_grad():
            conv.weight.copy_(original)


def test_scores_count_only_kept_input_channels(binary_resnet):
    net, analysis = binary_resnet
    gates = attach_gates(net, analysis)
    try:
        upstream = gates["conv1.6"]  # feeds layer1.0.conv1's input channels
        keep = torch.ones(upstream.logits.numel())
        keep[::3] = 0
        upstream.set_mask(keep)
        conv = net.get_submodule("layer1.0.conv1")
        w = conv.weight.detach()[:, keep.bool()]
        torch.testing.assert_close(
            criteria.get("l1")(net, analysis["layer1.0.conv1"]), w.abs().mean((1, 2, 3)), rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(
            criteria.get("binarization_error")(net, analysis["layer1.0.conv1"]),
            torch.stack([_cos2(f) for f in w]), rtol=1e-4, atol=1e-6,
        )
    finally:
        for gate in gates.values():
            gate.set_mask(torch.ones(gate.logits.numel()))


def test_binarization_error_centres_when_the_quantizer_does():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10)
    binarize_model(net, kernel_quantizer_kwargs={"center": True})
    analysis = find_channel_groups(net, torch.randn(1, 3, 32, 32))
    group = analysis["layer1.0.conv1"]
    w = net.get_submodule("layer1.0.conv1").weight.detach()
    centred = w - w.mean(1, keepdim=True)
    torch.testing.assert_close(
        criteria.get("binarization_error")(net, group), torch.stack([_cos2(f) for f in centred]), rtol=1e-4, atol=1e-6
    )


def test_random_is_reproducible_by_seed_and_order_free(binary_resnet):
    net, analysis = binary_resnet
    a, b = analysis.groups[0], analysis.groups[1]
    first = [criteria.get("random", seed=7)(net, g) for g in (a, b)]
    again = [criteria.get("random", seed=7)(net, g) for g in (b, a)][::-1]
    other = criteria.get("random", seed=8)(net, a)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1], again[1], rtol=0, atol=0)
    assert not torch.equal(first[0], other)
    assert first[0].shape == (a.size,)
