"""CIFAR-sized networks registered in timm's model registry.

After ``import lightning_bnnprune.models`` these names resolve through ``timm.create_model``:

* ``resnet18_cifar``: timm's ResNet-18 with a CIFAR stem (one 3x3 stride-1 conv, no max-pool).
* ``resnet20_cifar``: He et al.'s ResNet-20 (3 stages x 3 BasicBlocks, 16/32/64 channels), the
  same timm ResNet class with three stages.
* ``vgg11_cifar``: VGG-11 with BatchNorm, global average pooling and one Linear classifier.
* ``nin_cifar``: Network-in-Network for CIFAR, as in the Main/Subsidiary paper
  (Xu et al., CVPR 2019).

Every model is built by timm's ``build_model_with_cfg``, so it carries a ``pretrained_cfg`` whose
``first_conv`` and ``classifier`` name its full-precision input conv and its head, and it loads
local weights with ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``.
Every conv except the classifier is followed by a BatchNorm, and every classifier is an
``nn.Linear`` returned by ``get_classifier()``.

Example::

    import timm
    import lightning_bnnprune.models  # registers the names

    model = timm.create_model("resnet20_cifar", num_classes=10)
    model.get_submodule(model.pretrained_cfg["first_conv"])  # Conv2d(3, 16, 3x3, stride 1)
"""

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from lightning_bnnprune.stats import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["ConvBnAct", "CifarResNet", "CifarVGG", "MlpConv", "NetworkInNetwork"]


class ConvBnAct(nn.Sequential):
    """``conv -> bn -> act`` with named children, so module paths read ``...conv`` / ``...bn``.

    timm's ``ConvNormAct`` folds the activation into a ``BatchNormAct2d``; here the norm stays a
    plain ``nn.BatchNorm2d`` and the activation its own module, so a binarising callback can swap
    the conv and the activation independently and pruning code sees the usual conv -> BN pair.

    Args:
        in_chs: Input channels.
        out_chs: Output channels (filters).
        kernel_size: Square kernel size; padding keeps the spatial size ("same").
        stride: Convolution stride.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(
                    in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False
                ),
                bn=nn.BatchNorm2d(out_chs),
                act=nn.ReLU(inplace=True),
            )
        )


def _init_weights(model: nn.Module) -> None:
    # Same rule as timm's ResNet.init_weights, so every model here starts alike.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class _ClassifierMixin:
    """timm's model interface (``get_classifier`` / ``reset_classifier`` / ``forward_head``,
    ``forward_features`` with gradient checkpointing) for models made of a ``features`` trunk and
    a ``global_pool -> dropout -> fc`` head."""

    num_features: int
    num_classes: int
    drop_rate: float
    global_pool: nn.Module
    fc: nn.Module
    training: bool
    features: nn.Module
    grad_checkpointing: bool

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def _make_head(self, num_classes: int, global_pool: str) -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        """Return the full-precision classifier (its name if ``name_only``)."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0 removes it)."""
        self._make_head(
            num_classes, self.global_pool.pool_type if global_pool is None else global_pool
        )
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, drop out and classify; ``pre_logits`` returns the pooled features."""
        x = self.global_pool(x)
        x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(ResNet):
    """timm's ``ResNet`` with a CIFAR stem and one to four stages.

    The stem is one 3x3 stride-1 conv and ``maxpool`` is ``nn.Identity`` (He et al., 2016,
    Sec. 4.2), so a 32x32 input reaches the first stage at full resolution. Blocks, downsampling
    (1x1 conv + BN projection shortcuts), head and the rest of the timm interface are timm's own.

    Args:
        block: Residual block class (``BasicBlock`` or ``Bottleneck``).
        layers: Blocks per stage.
        channels: Width of each stage; ``channels[0]`` is also the stem width.
        in_chans: Input channels.
        **kwargs: Passed to ``timm.models.resnet.ResNet`` (``num_classes``, ``drop_rate``, ...).

    Raises:
        ValueError: If ``layers`` and ``channels`` differ in length, have more than 4 stages, or
            ``channels[0]`` is odd.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck] = BasicBlock,
        layers: Sequence[int] = (2, 2, 2, 2),
        channels: Sequence[int] = (64, 128, 256, 512),
        in_chans: int = 3,
        **kwargs: Any,
    ) -> None:
        if len(layers) != len(channels) or not 1 <= len(channels) <= 4:
            raise ValueError(
                f"layers={tuple(layers)} and channels={tuple(channels)}"
                " must both have 1 to 4 stages"
            )
        if channels[0] % 2:
            raise ValueError(f"channels[0]={channels[0]} must be even")
        # timm's single-conv stem is always 64 wide, its 'deep' stem 2 * stem_width wide: ask for
        # the deep stem of the right width, so the first stage is built for it, then replace it.
        super().__init__(
            block=block,
            layers=tuple(layers),
            channels=tuple(channels),
            in_chans=in_chans,
            stem_type="deep",
            stem_width=channels[0] // 2,
            **kwargs,
        )
        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        self.conv1 = nn.Conv2d(
            in_chans, channels[0], kernel_size=3, stride=1, padding=1, bias=False, **dd
        )
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        self.stage_names = [f"layer{i + 1}" for i in range(len(channels))]
        # The stem no longer downsamples (timm assumed /4 before layer1).
        self.feature_info = [dict(self.feature_info[0], reduction=1)] + [
            dict(info, reduction=max(1, info["reduction"] // 4)) for info in self.feature_info[1:]
        ]

    def _stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stage_names]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self._stages(), x, flatten=True)
        for stage in self._stages():
            x = stage(x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` (stem + one tap per stage), for any number of stages."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; use 'NCHW'")
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        intermediates = [x] if 0 in take_indices else []
        stages = self._stages()[:max_index] if stop_early else self._stages()
        for idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if idx in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """timm's ``prune_intermediate_layers`` for any number of stages."""
        take_indices, max_index = feature_take_indices(len(self.stage_names) + 1, indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())
        prune_end = max_index < len(self.stage_names)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


class CifarVGG(_ClassifierMixin, nn.Module):
    """VGG with BatchNorm for 32x32 inputs: conv3x3-BN-ReLU stacks and max-pools, then global
    average pooling and one Linear classifier (no 4096-wide FC layers).

    Module paths: ``features.<i>.conv`` / ``.bn`` / ``.act`` for each conv, ``features.<i>`` for
    each ``MaxPool2d``, ``fc`` for the classifier.

    Args:
        cfg: Conv widths, with ``"M"`` for a 2x2 max-pool (VGG's configuration letters).
        num_classes: Classifier outputs; 0 gives no classifier.
        in_chans: Input channels.
        drop_rate: Dropout before the classifier.
        global_pool: timm pooling type (``"avg"``, ``"max"``, ``"avgmax"``, ...).

    Raises:
        ValueError: If ``cfg`` holds no conv or an entry that is neither a positive int nor ``"M"``.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        widths = [c for c in cfg if c != "M"]
        if not widths or not all(isinstance(c, int) and c > 0 for c in widths):
            raise ValueError(f"cfg={list(cfg)} must hold positive conv widths and 'M' for max-pool")
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        layers: list[nn.Module] = []
        chs = in_chans
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(ConvBnAct(chs, c, 3))
                chs = c
        self.features = nn.Sequential(*layers)
        self.num_features = chs
        self._make_head(num_classes, global_pool)
        _init_weights(self)


class MlpConv(nn.Sequential):
    """One Network-in-Network "mlpconv" block: a spatial conv then 1x1 convs, each with BN + ReLU.

    Args:
        in_chs: Input channels.
        widths: Output channels of the spatial conv, then of each 1x1 conv.
        kernel_size: Kernel of the first (spatial) conv.
    """

    def __init__(self, in_chs: int, widths: Sequence[int], kernel_size: int) -> None:
        chs = [in_chs, *widths]
        super().__init__(
            *[
                ConvBnAct(chs[i], chs[i + 1], kernel_size if i == 0 else 1)
                for i in range(len(widths))
            ]
        )


class NetworkInNetwork(_ClassifierMixin, nn.Module):
    """Network-in-Network for CIFAR (Lin et al., 2014), in the layout that XNOR-Net and the
    Main/Subsidiary paper (Xu et al., CVPR 2019) binarise:

    ``mlpconv(5x5: 192-160-96) -> maxpool 3/2 -> dropout -> mlpconv(5x5: 192-192-192) -> avgpool 3/2
    -> dropout -> mlpconv(3x3: 192-192) -> global avg pool -> fc``.

    Classifier choice: NIN ends in a 1x1 conv to ``num_classes`` followed by global average
    pooling. Both maps are linear, so that equals global average pooling followed by a Linear layer
    with the same weights; this model uses the latter, so its classifier is an ``nn.Linear`` like
    every other model here (and ``pre_logits`` features exist). Every conv has BN + ReLU after it.

    Module paths: ``features.block{1,2,3}.<j>.conv`` / ``.bn`` / ``.act``, ``features.pool{1,2}``,
    ``features.drop{1,2}``, ``fc``.

    Args:
        num_classes: Classifier outputs; 0 gives no classifier.
        in_chans: Input channels.
        drop_rate: Dropout after the first two pooling layers (NIN's placement), not before ``fc``.
        global_pool: timm pooling type (``"avg"`` in the paper).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.5,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.drop_rate = 0.0  # the head has no dropout of its own; see drop_rate above
        self.grad_checkpointing = False
        self.features = nn.Sequential(
            OrderedDict(
                block1=MlpConv(in_chans, (192, 160, 96), kernel_size=5),
                pool1=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                drop1=nn.Dropout(drop_rate),
                block2=MlpConv(96, (192, 192, 192), kernel_size=5),
                pool2=nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
                drop2=nn.Dropout(drop_rate),
                block3=MlpConv(192, (192, 192), kernel_size=3),
            )
        )
        self.num_features = 192
        self._make_head(num_classes, global_pool)
        _init_weights(self)


def _cfg(first_conv: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": first_conv,
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


# No published weights: `pretrained=True` needs `pretrained_cfg_overlay=dict(file=...)`.
default_cfgs = generate_default_cfgs(
    {
        "resnet18_cifar": _cfg("conv1", pool_size=(4, 4)),
        "resnet20_cifar": _cfg("conv1", pool_size=(8, 8), paper_ids="arXiv:1512.03385"),
        "vgg11_cifar": _cfg("features.0.conv", pool_size=(1, 1), paper_ids="arXiv:1409.1556"),
        "nin_cifar": _cfg("features.block1.0.conv", pool_size=(8, 8), paper_ids="arXiv:1312.4400"),
    }
)


def _create_resnet(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    # timm's default features_only taps (0..4) assume four stages.
    num_stages = len(kwargs.get("layers", ()))
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=tuple(range(num_stages + 1))),
        **kwargs,
    )


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2], 64-512 wide), 3x3 stride-1 stem and no max-pool."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), channels=(64, 128, 256, 512))
    return _create_resnet("resnet18_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 of He et al. (2016), Sec. 4.2: 3 stages of 3 BasicBlocks, 16/32/64 wide (0.27 M).

    Shortcuts that change shape are 1x1 conv + BN projections (the paper's option B) rather than
    zero-padding (option A), so every channel is owned by a conv/BN that pruning can slice.
    """
    model_args = dict(block=BasicBlock, layers=(3, 3, 3), channels=(16, 32, 64))
    return _create_resnet("resnet20_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> CifarVGG:
    """VGG-11 ("A" configuration) with BatchNorm, global average pooling and a Linear classifier."""
    model_args = dict(cfg=(64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"))
    return build_model_with_cfg(CifarVGG, "vgg11_cifar", pretrained, **dict(model_args, **kwargs))


@register_model
def nin_cifar(pretrained: bool = False, **kwargs: Any) -> NetworkInNetwork:
    """Network-in-Network for CIFAR (three mlpconv blocks, 192-160-96 first), Linear classifier."""
    return build_model_with_cfg(NetworkInNetwork, "nin_cifar", pretrained, **kwargs)
