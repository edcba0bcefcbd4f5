import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import lightning_bnnprune.models  # noqa: F401  (registers the names)
from lightning_bnnprune.models import CifarResNet, CifarVGG

CIFAR_MODELS = ["resnet18_cifar", "resnet20_cifar", "vgg11_cifar", "nin_cifar"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: timm.create_model(name).eval() for name in CIFAR_MODELS}


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_listed_in_timm(name):
    assert name in timm.list_models("*_cifar")


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_forward_and_timm_interface(models, name):
    model = models[name]
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model(x))


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_pretrained_cfg_names_first_conv_and_classifier(models, name):
    model = models[name]
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 10 and cfg["input_size"] == (3, 32, 32)
    first = model.get_submodule(cfg["first_conv"])
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    assert first is next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == 10
    assert model.get_submodule(cfg["classifier"]) is head


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_batchnorm_after_every_conv(models, name):
    convs = [m for m in models[name].modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in models[name].modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [n.num_features for n in norms]


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_num_classes_and_in_chans(name):
    model = timm.create_model(name, num_classes=100, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_reset_classifier(name):
    model = timm.create_model(name)
    model.reset_classifier(5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_grad_checkpointing_gives_same_output(models, name):
    model = models[name]
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    model.set_grad_checkpointing(True)
    try:
        torch.testing.assert_close(model(x), expected)
    finally:
        model.set_grad_checkpointing(False)


def test_resnet18_cifar_stem(models):
    model = models["resnet18_cifar"]
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    assert model.feature_info[-1]["reduction"] == 8


def test_resnet20_cifar_is_he_et_al(models):
    model = models["resnet20_cifar"]
    assert model.stage_names == ["layer1", "layer2", "layer3"]
    assert [len(getattr(model, s)) for s in model.stage_names] == [3, 3, 3]
    assert model.conv1.out_channels == 16 and model.num_features == 64
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 64, 8, 8)
    _, taps = model.forward_intermediates(torch.randn(2, 3, 32, 32))
    assert [t.shape[1:] for t in taps] == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_resnet20_cifar_features_only():
    model = timm.create_model("resnet20_cifar", features_only=True)
    assert model.feature_info.reduction() == [1, 1, 2, 4]
    assert [f.shape[1] for f in model(torch.randn(2, 3, 32, 32))] == [16, 16, 32, 64]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_load_local_weights_through_timm(tmp_path, name, fmt):
    source = timm.create_model(name)
    path = tmp_path / f"weights.{fmt}"
    if fmt == "pth":
        torch.save(source.state_dict(), path)
    else:
        save_file(source.state_dict(), str(path))
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_pretrained_without_file_fails_clearly():
    with pytest.raises(RuntimeError, match="No pretrained weights exist for resnet20_cifar"):
        timm.create_model("resnet20_cifar", pretrained=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=(2, 2), channels=(16, 32, 64)), "1 to 4 stages"),
        (dict(layers=(1,) * 5, channels=(8,) * 5), "1 to 4 stages"),
        (dict(layers=(1, 1), channels=(15, 32)), "must be even"),
    ],
)
def test_cifar_resnet_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CifarResNet(**kwargs)


@pytest.mark.parametrize("cfg", [("M",), (64, "X"), (64, -1)])
def test_cifar_vgg_bad_cfg(cfg):
    with pytest.raises(ValueError, match="positive conv widths"):
        CifarVGG(cfg)
