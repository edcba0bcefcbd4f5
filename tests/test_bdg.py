"""BDG: the learnable {phi - tau, phi + tau} domain, its sparsity constraint, and empty-filter removal."""
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bnnprune import Binarize, BinaryConv2d
from lightning_bnnprune.callbacks.bdg import ZeroFilterPruning
from lightning_bnnprune.quantizers import BinaryDomainWeight

from helpers import UserModule, random_images, small_trainer


def _fit(callbacks, steps=10, lr=1e-2, tmp_path=None):
    seed_everything(0)
    module = UserModule(attr="model", lr=lr)
    small_trainer(tmp_path, callbacks, steps).fit(module, random_images(n=32, batch_size=16))
    return module


def _upper_share(module):
    layers = [m for m in module.modules() if isinstance(m, BinaryConv2d)]
    return sum(float((m.weight >= 0).float().mean()) for m in layers) / len(layers)


def test_tau_and_phi_learn(tmp_path):
    module = _fit([Binarize(kernel_quantizer="bdg")], tmp_path=tmp_path)
    q = module.model.layer1[0].conv1.kernel_quantizer
    assert isinstance(q, BinaryDomainWeight)
    assert q.tau.item() != 1.0 and q.phi.item() != 0.0


def test_sparsity_constraint_lowers_the_share_of_upper_values(tmp_path):
    kw = dict(kernel_quantizer="bdg", kernel_quantizer_kwargs={"zero_lower": True})
    free = _fit([Binarize(**kw)], steps=15, tmp_path=tmp_path)
    constrained = _fit([Binarize(**kw, sparsity=0.2, sparsity_gamma=0.9)], steps=15, tmp_path=tmp_path)
    assert _upper_share(constrained) < _upper_share(free) - 0.02, (_upper_share(constrained), _upper_share(free))


def test_zero_lower_domain_is_zero_or_two_tau():
    q = BinaryDomainWeight(tau=0.3, zero_lower=True)
    kernel, _ = q(torch.randn(4, 4, 3, 3))
    assert torch.allclose(kernel.unique(), torch.tensor([0.0, 0.6]))
    assert q.phi is None


def test_empty_filters_are_removed_and_their_share_reported(tmp_path):
    class EmptySome(ZeroFilterPruning):
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)
            conv = pl_module.model.layer1[0].conv1
            with torch.no_grad():
                conv.weight[:3] = -0.9  # three filters all at the lower value: exact zeros
            self.expected = 3

    pruning = EmptySome()
    kw = dict(kernel_quantizer="bdg", kernel_quantizer_kwargs={"zero_lower": True})
    module = _fit([Binarize(**kw), pruning], steps=2, lr=1e-4, tmp_path=tmp_path)
    conv = module.model.layer1[0].conv1
    group_size = pruning.analysis["layer1.0.conv1"].size
    assert conv.out_channels == group_size - 3
    assert pruning.summary["empty_filter_share"] == pytest.approx(3 / pruning.analysis.num_filters)
    assert pruning.record is not None  # removal ran, and with it its exactness check


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_quantizer="bdg", sparsity=1.2), r"`sparsity` \(EC\) must be in \(0, 1\)"),
        (dict(kernel_quantizer="xnor", sparsity=0.3), "constrains the 'bdg' weight domain"),
        (dict(kernel_quantizer="bdg", sparsity=0.3, sparsity_gamma=1.0), r"`sparsity_gamma` must be in \(0, 1\)"),
    ],
)
def test_bad_sparsity_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        Binarize(**kwargs)


def test_negative_atol_is_rejected():
    with pytest.raises(MisconfigurationException, match="`atol` must be >= 0"):
        ZeroFilterPruning(atol=-1)


def test_xnor_weights_warn_that_nothing_can_be_emptied(tmp_path):
    """prune=bdg with binarize=xnor is a mistake worth a warning: +-alpha is never zero."""
    pruning = ZeroFilterPruning()
    with pytest.warns(UserWarning, match=r"no binary layer has the sparse \{0, 2 tau\} domain"):
        _fit([Binarize(), pruning], steps=1, tmp_path=tmp_path)
    assert pruning.summary["empty_filter_share"] == 0.0
