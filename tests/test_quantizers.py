"""Quantizers: forward values and gradients against the formulas in their docstrings."""
import pytest
import torch
from torch import nn

from lightning_bnnprune import quantizers
from lightning_bnnprune.quantizers import BinaryDomainWeight, XnorWeight, approx_sign, ste_sign

X = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.5])


def test_ste_sign_forward_maps_zero_to_plus_one():
    assert ste_sign(X).tolist() == [-1, -1, -1, 1, 1, 1, 1]


@pytest.mark.parametrize("clip", [1.0, 0.4])
def test_ste_sign_gradient_is_clipped_identity(clip):
    x = X.clone().requires_grad_()
    ste_sign(x, clip).backward(torch.arange(1.0, 8.0))
    expected = torch.arange(1.0, 8.0) * (X.abs() <= clip).float()
    assert torch.equal(x.grad, expected)


def test_approx_sign_gradient_is_bireal_piecewise_linear():
    x = X.clone().requires_grad_()
    out = approx_sign(x)
    out.sum().backward()
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1]
    assert torch.allclose(x.grad, (2 - 2 * X.abs()).clamp(min=0))


def test_xnor_weight_scale_is_mean_abs_per_filter_and_sign_of_zero_is_plus_one():
    w = torch.randn(4, 3, 3, 3)
    w[0, 0, 0, 0] = 0.0
    kernel, alpha = XnorWeight()(w)
    assert torch.equal(kernel, torch.where(w >= 0, 1.0, -1.0))
    assert torch.allclose(alpha, w.abs().mean(dim=(1, 2, 3)))


def test_xnor_weight_gradient_flows_through_sign_and_scale():
    w = (torch.rand(2, 2, 1, 1) - 0.5).requires_grad_()
    kernel, alpha = XnorWeight()(w)
    (kernel * alpha.view(-1, 1, 1, 1)).sum().backward()
    # d/dW [alpha * sign(W)] summed = alpha (STE) + sign(W) * sum(sign) / n  (through alpha)
    n = 2
    sign = torch.where(w >= 0, 1.0, -1.0)
    expected = alpha.detach().view(-1, 1, 1, 1) + sign * sign.sum(dim=(1, 2, 3), keepdim=True) / n
    assert torch.allclose(w.grad, expected)


def test_xnor_centring_and_mask_use_only_kept_input_channels():
    w = torch.randn(3, 5, 3, 3)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    kernel, alpha = XnorWeight(center=True)(w, in_mask=mask)
    kept = w[:, mask.bool()]
    centred = kept - kept.mean(dim=1, keepdim=True)
    ref_kernel, ref_alpha = XnorWeight(center=False)(centred)
    assert torch.allclose(alpha, ref_alpha, atol=1e-6)
    assert torch.equal(kernel[:, mask.bool()], ref_kernel)


def test_bdg_domain_values_and_learnable_tau_phi():
    q = BinaryDomainWeight(tau=0.5, phi=0.2)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    kernel, scale = q(w)
    assert scale is None
    assert torch.allclose(kernel.detach().unique(), torch.tensor([-0.3, 0.7]))
    kernel.sum().backward()
    sign = torch.where(w >= 0, 1.0, -1.0)
    assert q.tau.grad == pytest.approx(sign.sum().item())  # d/dtau sum(tau*s+phi) = sum(s)
    assert q.phi.grad == pytest.approx(float(w.numel()))
    assert torch.allclose(w.grad, 0.5 * (w.detach().abs() <= 1).float())


def test_get_resolves_alias_instance_callable_and_none():
    assert isinstance(quantizers.get("ste_sign"), quantizers.SteSign)
    assert isinstance(quantizers.get("xnor", center=True), XnorWeight)
    inst = quantizers.ApproxSign()
    assert quantizers.get(inst) is inst
    wrapped = quantizers.get(torch.tanh)
    assert isinstance(wrapped, nn.Module) and torch.equal(wrapped(X), torch.tanh(X))
    assert quantizers.get(None) is None
    assert set(quantizers.available()) >= {"ste_sign", "approx_sign", "xnor", "bdg"}


@pytest.mark.parametrize("bad", ["sign", 3, 1.5])
def test_get_rejects_unknown_identifiers_listing_choices(bad):
    with pytest.raises(ValueError, match="ste_sign"):
        quantizers.get(bad)


def test_bad_quantizer_kwarg_is_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword"):
        quantizers.get("xnor", centre=True)


def test_ste_sign_rejects_non_positive_clip():
    with pytest.raises(ValueError, match="clip_value must be > 0"):
        quantizers.SteSign(clip_value=0)


# ------------------------------------------------------------------ the contract the exports read
@pytest.mark.parametrize("quantizer, lower, upper, has_scale", [
    (XnorWeight(), -1.0, 1.0, True),
    (XnorWeight(center=True), -1.0, 1.0, True),
    (BinaryDomainWeight(tau=0.7, phi=0.2), 0.2 - 0.7, 0.2 + 0.7, False),
    (BinaryDomainWeight(tau=0.7, zero_lower=True), 0.0, 1.4, False),
])
def test_exported_kernel_is_the_forward_kernel_as_bits_and_two_values(quantizer, lower, upper, has_scale):
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    w[0, 0, 0, 0] = 0.0  # sign(0) = +1: the upper value
    exported = quantizer.export(w)
    kernel, scale = quantizer(w)
    assert exported.bits.dtype == torch.bool and bool(exported.bits[0, 0, 0, 0])
    assert exported.lower == pytest.approx(lower) and exported.upper == pytest.approx(upper)
    assert torch.equal(exported.kernel(), kernel.detach())  # bit for bit, the values as forward rounds them
    assert (exported.scale is not None) == has_scale
    if has_scale:
        assert torch.equal(exported.scale, scale.detach())
    assert exported.symmetric == (lower == -upper)


def test_declared_signs_learned_parameters_and_precision():
    assert quantizers.SteSign().is_sign and quantizers.ApproxSign().is_sign
    assert not quantizers.get(torch.tanh).is_sign  # a callable is not declared a sign
    assert BinaryDomainWeight().learned_parameters() == ("tau", "phi")
    assert BinaryDomainWeight(zero_lower=True).learned_parameters() == ("tau",)  # phi tied to tau
    assert XnorWeight().learned_parameters() == ()
    assert all(q.precision == 1 for q in (quantizers.SteSign(), XnorWeight(), BinaryDomainWeight()))
    assert BinaryDomainWeight().value_set == "{phi - tau, phi + tau}"
    assert BinaryDomainWeight(zero_lower=True).value_set == "{0, 2 tau}"
    assert quantizers.display_name(XnorWeight()) == "'xnor' (XnorWeight)"


def test_a_kernel_of_more_than_two_values_is_refused_naming_the_quantizer():
    ternary = quantizers.get(lambda w: torch.round(w.clamp(-1, 1)))
    with pytest.raises(ValueError, match=r"^kernel quantizer callable <lambda> gives 3 distinct kernel values "
                                         r"\(-1, 0, 1\), not two$"):
        ternary.export(torch.tensor([[-2.0, 0.1], [0.9, 0.2]]))
