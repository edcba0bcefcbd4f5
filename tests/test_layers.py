"""BinaryConv2d equals F.conv2d on the binarised tensors, for every conv shape timm builds."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import create_conv2d
from timm.layers.padding import pad_same
from torch import nn

from lightning_bnnprune import quantizers
from lightning_bnnprune.layers import BinaryConv2d


def _reference(conv: BinaryConv2d, x: torch.Tensor, same: bool) -> torch.Tensor:
    xb = torch.where(x >= 0, 1.0, -1.0)
    w = conv.weight
    wb = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=(1, 2, 3), keepdim=True)
    if same:
        xb = pad_same(xb, conv.kernel_size, conv.stride, conv.dilation)
    return F.conv2d(xb, wb, conv.bias, conv.stride, 0 if same else conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=""),  # static symmetric pad
        dict(in_channels=8, out_channels=8, kernel_size=3, stride=2, padding="", depthwise=True),
        dict(in_channels=8, out_channels=12, kernel_size=3, groups=4, padding=""),
        dict(in_channels=8, out_channels=6, kernel_size=3, dilation=2, padding=""),
        dict(in_channels=8, out_channels=6, kernel_size=3, stride=2, padding="same"),  # dynamic SAME
        dict(in_channels=8, out_channels=6, kernel_size=1, bias=True),
    ],
    ids=["plain", "depthwise-stride2", "grouped", "dilated", "tf-same", "pointwise-bias"],
)
def test_binary_conv_equals_conv2d_on_binarised_tensors(kwargs):
    torch.manual_seed(0)
    conv = create_conv2d(**kwargs)  # timm's factory: picks Conv2dSame for dynamic padding
    same = type(conv).__name__ == "Conv2dSame"
    binary = BinaryConv2d.from_conv(conv)
    assert isinstance(binary, nn.Conv2d) and binary.same_padding == same
    assert torch.equal(binary.weight, conv.weight)
    x = torch.randn(2, 8, 11, 11)  # odd size so SAME padding is asymmetric
    assert torch.allclose(binary(x), _reference(binary, x, same), atol=1e-5)


def test_input_mask_zeroes_channels_after_binarisation():
    torch.manual_seed(0)
    binary = BinaryConv2d(4, 3, 3, padding=1, bias=False)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    binary.set_input_mask(lambda: mask)
    x = torch.randn(1, 4, 5, 5)
    kept = BinaryConv2d(2, 3, 3, padding=1, bias=False)
    kept.weight.data.copy_(binary.weight.data[:, mask.bool()])
    # the masked layer is the layer with those input channels removed (XNOR scale included)
    assert torch.allclose(binary(x), kept(x[:, mask.bool()]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("center", [False, True])
def test_input_mask_on_grouped_conv_equals_the_sliced_conv(center):
    # groups=2, 3 input channels per conv group; each conv group drops one (different) channel
    torch.manual_seed(0)
    conv = BinaryConv2d(6, 4, 3, padding=1, groups=2, kernel_quantizer=quantizers.XnorWeight(center=center))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    conv.set_input_mask(lambda: mask)
    x = torch.randn(2, 6, 5, 5)
    sliced = BinaryConv2d(4, 4, 3, padding=1, groups=2, kernel_quantizer=quantizers.XnorWeight(center=center))
    # filters 0-1 read channels 0-2 (keep local 0, 2); filters 2-3 read channels 3-5 (keep local 1, 2)
    sliced.weight.data.copy_(torch.cat([conv.weight.data[:2, [0, 2]], conv.weight.data[2:, [1, 2]]]))
    sliced.bias.data.copy_(conv.bias.data)
    assert torch.allclose(conv(x), sliced(x[:, mask.bool()]), rtol=0, atol=1e-6)


def test_gradients_reach_latent_weights_and_inputs():
    conv = BinaryConv2d(3, 4, 3, padding=1)
    x = (torch.rand(2, 3, 6, 6) * 2 - 1).requires_grad_()
    conv(x).square().mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_quantizer_is_rejected():
    with pytest.raises(ValueError, match="registered quantizers"):
        BinaryConv2d(3, 4, 3, kernel_quantizer="ternary")
    with pytest.raises(ValueError, match="needs a kernel_quantizer"):
        BinaryConv2d(3, 4, 3, kernel_quantizer=None)


def test_export_kernel_of_a_plain_module_quantizer_reads_its_values():
    class PlainSign(nn.Module):  # a kernel quantizer that does not subclass KernelQuantizer
        def forward(self, weight, in_mask=None):
            return torch.where(weight >= 0, 0.5, -0.5), None

    conv = BinaryConv2d(3, 4, 3, kernel_quantizer=PlainSign())
    exported = conv.export_kernel()
    assert (exported.lower, exported.upper, exported.scale) == (-0.5, 0.5, None) and exported.symmetric
    assert torch.equal(exported.kernel(), conv.quantized_kernel()[0])
    assert torch.equal(exported.bits, conv.weight.detach() >= 0)
