"""Model definitions; importing this package registers them in timm's model registry."""

from lightning_bnnprune.models.cifar import (
    CifarResNet,
    CifarVGG,
    ConvBnAct,
    MlpConv,
    NetworkInNetwork,
)

__all__ = ["ConvBnAct", "CifarResNet", "CifarVGG", "MlpConv", "NetworkInNetwork"]
