"""The Binarize callback on real timm models inside a real Trainer, with the user's own module."""
import pytest
import timm
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_bnnprune import Binarize, BinaryConv2d, binarize_model
from lightning_bnnprune.binarize import full_precision_names

from helpers import UserModule, pattern_images, small_trainer

FAMILIES = ["test_resnet", "test_efficientnet", "test_convnext", "resnet18"]


class LossRecordingModule(UserModule):
    """The user's module with the timm network under an arbitrary attribute name, recording every
    training loss."""

    def __init__(self, model_name: str, lr: float = 2e-3):
        super().__init__(model_name, attr="backbone_of_mine", lr=lr)
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


@pytest.mark.parametrize("model_name", FAMILIES)
def test_binarize_swaps_all_but_first_conv_keeps_head_fp_and_learns(tmp_path, model_name):
    seed_everything(0)
    module = LossRecordingModule(model_name, lr=5e-3)
    convs = [n for n, m in module.backbone_of_mine.named_modules() if isinstance(m, nn.Conv2d)]
    first_conv = module.backbone_of_mine.pretrained_cfg["first_conv"]
    binarize = Binarize()
    small_trainer(tmp_path, [binarize], 20).fit(module, pattern_images(n=16))

    net = module.backbone_of_mine
    binary = [n for n, m in net.named_modules() if isinstance(m, BinaryConv2d)]
    fp_convs = [n for n in convs if n not in binary]
    assert len(fp_convs) == 1 and fp_convs[0].startswith(first_conv)
    assert binarize.num_swapped == len(convs) - 1
    head = net.get_classifier()
    assert not any(isinstance(m, BinaryConv2d) for m in head.modules())
    # memorising one fixed batch: the loss must go down
    first, last = sum(module.losses[:3]) / 3, sum(module.losses[-3:]) / 3
    assert last < first, module.losses


def test_resume_from_checkpoint_finds_the_same_binary_tree(tmp_path):
    seed_everything(0)
    ckpt_dir = tmp_path / "ckpt"
    module = LossRecordingModule("test_resnet")
    save = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)
    small_trainer(tmp_path, [Binarize(), save], 6).fit(module, pattern_images())
    seed_everything(0)
    uninterrupted = LossRecordingModule("test_resnet")
    small_trainer(tmp_path / "b", [Binarize()], 6).fit(uninterrupted, pattern_images())

    seed_everything(0)
    resumed = LossRecordingModule("test_resnet")  # a fresh, full-precision module: weights come from the ckpt
    small_trainer(tmp_path / "c", [Binarize()], 6).fit(
        resumed, pattern_images(), ckpt_path=str(next(ckpt_dir.glob("*step=2.ckpt")))  # end of epoch 0
    )
    for (name, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert isinstance(resumed.backbone_of_mine.layer1[0].conv1, BinaryConv2d)


def test_keep_fp_patterns_and_plain_function():
    net = timm.create_model("test_efficientnet", num_classes=10)
    keep = full_precision_names(net, keep_fp=["*.se.*"])
    swapped = binarize_model(net, keep_fp=["*.se.*"])
    assert swapped and not any(".se." in n for n in swapped)
    assert any(".se." in n for n in keep)
    assert "conv_stem" in keep and "classifier" in keep
    assert binarize_model(net, keep_fp=["*.se.*"]) == []  # already binary: nothing more to swap
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_plain_module_without_timm_falls_back_to_first_conv_and_last_linear():
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    assert binarize_model(net) == ["2"]
    assert type(net[0]) is nn.Conv2d and type(net[6]) is nn.Linear


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_quantizer="sign"), "Unknown quantizer 'sign'.*ste_sign"),
        (dict(kernel_quantizer="ternary"), "Unknown quantizer 'ternary'.*xnor"),
        (dict(kernel_quantizer=None), "kernel_quantizer.*required"),
        (dict(kernel_quantizer_kwargs={"centre": True}), "centre"),
        (dict(weight_clip=0), "weight_clip.*> 0"),
        (dict(input_quantizer=42), "Cannot interpret 42"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        Binarize(**kwargs)


def test_unknown_network_name_is_an_error(tmp_path):
    module = LossRecordingModule("test_resnet")
    with pytest.raises(MisconfigurationException, match="network 'net' not found.*backbone_of_mine"):
        small_trainer(tmp_path, [Binarize(networks=["net"])], 1).fit(module, pattern_images())


def test_weight_clip_bounds_latent_weights(tmp_path):
    module = LossRecordingModule("test_resnet", lr=0.5)  # a large lr pushes latent weights past the bound
    small_trainer(tmp_path, [Binarize(weight_clip=0.05)], 3).fit(module, pattern_images())
    for m in module.modules():
        if isinstance(m, BinaryConv2d):
            assert m.weight.abs().max() <= 0.05 + 1e-7


@pytest.mark.parametrize("relu, kind", [("identity", nn.Identity), ("hardtanh", nn.Hardtanh), (None, nn.ReLU)])
def test_relus_before_binary_convs_are_replaced(relu, kind):
    # sign(relu(x)) == +1 everywhere: with binary inputs a ReLU erases every activation bit
    net = timm.create_model("resnet18", num_classes=10)
    binarize_model(net, relu=relu)
    assert type(net.layer1[0].act1) is kind and type(net.act1) is kind
    assert not any(isinstance(m, nn.ReLU) for m in net.modules()) or relu is None


def test_weight_only_binarisation_keeps_relus():
    net = timm.create_model("test_resnet", num_classes=10)
    binarize_model(net, input_quantizer=None)
    assert isinstance(net.layer1[0].act1, nn.ReLU)


def test_unknown_relu_replacement_is_rejected():
    with pytest.raises(MisconfigurationException, match="Unknown `relu` replacement 'gelu'.*identity, hardtanh"):
        Binarize(relu="gelu")
