"""The users' LightningModules the tests train: a timm network under an attribute of the user's
choosing (:class:`UserModule`), and the plain SGD classifier of the MSF tests (:class:`Classifier`)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

__all__ = ["Classifier", "UserModule"]


class UserModule(LightningModule):
    """A user's own module: a network (a timm name, built with 10 classes, or any module) under an
    attribute of the user's choosing, cross-entropy, one optimizer over every parameter.

    Args:
        net: a timm model name or a module.
        attr: the attribute holding the network (the record's ``network_path``).
        lr: the optimizer's learning rate.
        optimizer: the optimizer class; ``optimizer_kwargs`` go to it (``weight_decay=...``).
        example_input_size: ``(C, H, W)`` for ``example_input_array`` (None: the size comes from
            the data).
    """

    def __init__(self, net: Union[str, nn.Module] = "test_resnet", attr: str = "net", lr: float = 1e-3,
                 optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
                 example_input_size: Optional[Sequence[int]] = None, **optimizer_kwargs: Any) -> None:
        super().__init__()
        self.attr = attr
        setattr(self, attr, timm.create_model(net, num_classes=10) if isinstance(net, str) else net)
        if example_input_size is not None:
            self.example_input_array = torch.zeros(2, *example_input_size)
        self.lr, self.optimizer_class, self.optimizer_kwargs = lr, optimizer, optimizer_kwargs

    def forward(self, x):
        return getattr(self, self.attr)(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self.optimizer_class(self.parameters(), lr=self.lr, **self.optimizer_kwargs)


class Classifier(LightningModule):
    """A user's own module: a timm network in ``net``, a plain training_step, SGD with momentum.

    ``zero_init_last=False``: timm zero-initialises the last norm of every residual block, which
    cuts the gradient to the gates inside the blocks until the block has trained; the tests want
    a network like the trained ones the callback is for.
    """

    def __init__(self, name: str = "test_resnet", returns_dict: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = timm.create_model(name, num_classes=10, zero_init_last=False)
        self.returns_dict = returns_dict
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return {"loss": loss} if self.returns_dict else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
