"""The ``Binarize`` callback: binary convolutions inside the user's own ``Trainer``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from .. import quantizers
from ..binarize import RELU_REPLACEMENTS, binarize_model, binary_layers
from ..introspect import find_networks
from ..layers import BinaryConv2d
from ..quantizers import BinaryDomainWeight
from .checks import check

__all__ = ["Binarize"]


class Binarize(Callback):
    r"""Swap the convolutions of the LightningModule's network(s) for :class:`BinaryConv2d`.

    The swap happens in ``setup("fit")``: before the optimizer is built and before a checkpoint's
    weights are restored, so ``trainer.fit(..., ckpt_path=...)`` finds the same module tree it
    saved. The trained weights become the latent weights. The first conv and the classifier stay
    full precision, found from the model (timm's ``pretrained_cfg["first_conv"]`` and
    ``get_classifier()``, else the first conv and the last linear layer).

    After every optimizer step the latent weights are clipped to ``[-weight_clip, weight_clip]``
    (the usual BNN constraint; it also keeps the clipped straight-through gradient alive).

    Args:
        input_quantizer: activation quantizer alias (``"ste_sign"``, ``"approx_sign"``), module,
            callable, or ``None`` for real-valued inputs (weight-only binarisation).
        kernel_quantizer: weight quantizer alias (``"xnor"``, ``"bdg"``), module or callable.
        kernel_quantizer_kwargs: keyword arguments for an aliased kernel quantizer, e.g.
            ``{"center": True}`` for XNOR or ``{"tau": 1.0, "phi": 0.0}`` for BDG.
        keep_fp: extra ``fnmatch`` patterns of module names that stay full precision.
        networks: attribute paths of the networks to binarise (default: every timm model found
            in the LightningModule, else the whole module).
        weight_clip: bound for the latent weights; ``None`` disables clipping.
        relu: what replaces the ReLUs outside the full-precision layers when inputs are binary:
            ``"identity"`` (default, Bi-Real Net's choice), ``"hardtanh"``, or ``None`` to keep
            them. A ReLU in front of ``sign`` makes every activation ``+1``.
        sparsity: BDG's sparsity constraint (Schiavone et al., ECML-PKDD 2023): the
            target share ``EC`` of weights at the upper value of the ``bdg`` domain. Each step
            adds :math:`\lambda h` with :math:`h = \mathrm{mean}_l\, \mathrm{relu}(s_l - EC)`
            (``s_l`` the upper share of layer ``l``, differentiable through the STE) and the
            adaptive :math:`\lambda = \gamma L / (h (1 - \gamma))` computed without gradient, so
            the term is worth :math:`\gamma / (1 - \gamma)` of the task loss ``L`` while active.
            ``None`` (default) disables it. Needs ``kernel_quantizer="bdg"``.
        sparsity_gamma: :math:`\gamma` in ``(0, 1)``.

    Raises:
        MisconfigurationException: on an unknown quantizer, a bad ``weight_clip``, a sparsity
            target outside ``(0, 1)`` or without the ``bdg`` quantizer, or a network name that
            does not exist.

    Example::

        from lightning import Trainer
        from lightning_bnnprune import Binarize

        trainer = Trainer(callbacks=[Binarize(keep_fp=["*.se.*"])])
        trainer.fit(my_lightning_module, datamodule)
    """

    def __init__(
        self,
        input_quantizer: quantizers.Identifier = "ste_sign",
        kernel_quantizer: quantizers.Identifier = "xnor",
        kernel_quantizer_kwargs: Optional[Dict[str, Any]] = None,
        keep_fp: Sequence[str] = (),
        networks: Optional[Sequence[str]] = None,
        weight_clip: Optional[float] = 1.0,
        sparsity: Optional[float] = None,
        sparsity_gamma: float = 0.5,
        relu: Optional[str] = "identity",
    ) -> None:
        try:
            quantizers.get(input_quantizer)
            quantizers.get(kernel_quantizer, **(kernel_quantizer_kwargs or {}))
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(str(err)) from None
        check(kernel_quantizer is not None,
              f"`kernel_quantizer` is required; registered: {', '.join(quantizers.available())}")
        check(weight_clip is None or weight_clip > 0, f"`weight_clip` must be > 0 or None, got {weight_clip!r}")
        check(relu is None or relu in RELU_REPLACEMENTS,
              f"Unknown `relu` replacement {relu!r}; choose one of: {', '.join(RELU_REPLACEMENTS)} or None")
        if sparsity is not None:
            check(0.0 < float(sparsity) < 1.0, f"`sparsity` (EC) must be in (0, 1) or None, got {sparsity!r}")
            check(isinstance(kernel_quantizer, BinaryDomainWeight) or kernel_quantizer == "bdg",
                  f"`sparsity` constrains the 'bdg' weight domain; got kernel_quantizer={kernel_quantizer!r}")
            check(0.0 < float(sparsity_gamma) < 1.0, f"`sparsity_gamma` must be in (0, 1), got {sparsity_gamma!r}")
        if isinstance(keep_fp, str):
            keep_fp = [keep_fp]
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer
        self.kernel_quantizer_kwargs = dict(kernel_quantizer_kwargs or {})
        self.keep_fp = list(keep_fp)
        self.networks = list(networks) if networks else None
        self.weight_clip = weight_clip
        self.relu = relu
        self.sparsity = None if sparsity is None else float(sparsity)
        self.sparsity_gamma = float(sparsity_gamma)
        self.swapped: Dict[str, List[str]] = {}
        self._loss: Optional[torch.Tensor] = None

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        try:
            paths = find_networks(pl_module, self.networks)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        for path in paths:
            net = pl_module.get_submodule(path) if path else pl_module
            if path in self.swapped or binary_layers(net):
                continue  # already binary: a second fit, or a module saved after binarisation
            self.swapped[path] = binarize_model(
                net,
                input_quantizer=self.input_quantizer,
                kernel_quantizer=self.kernel_quantizer,
                kernel_quantizer_kwargs=self.kernel_quantizer_kwargs,
                keep_fp=self.keep_fp,
                relu=self.relu,
            )
            rank_zero_info(
                f"[Binarize] {path or type(pl_module).__name__}: "
                f"{len(self.swapped[path])} convs -> BinaryConv2d "
                f"({self.input_quantizer} inputs, {self.kernel_quantizer} weights)"
            )

    def _bdg_layers(self, pl_module: "pl.LightningModule") -> List[BinaryConv2d]:
        return [
            m for m in pl_module.modules()
            if isinstance(m, BinaryConv2d) and isinstance(m.kernel_quantizer, BinaryDomainWeight)
        ]

    @override
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.sparsity is not None:
            self._loss = loss.detach()

    @override
    def on_after_backward(self, trainer, pl_module) -> None:
        """Add the gradient of BDG's sparsity term to the latent weights.

        The term depends on the weights only, so its gradient is computed on its own graph with
        ``torch.autograd.grad`` instead of being added to the user's loss: the user's
        ``training_step`` stays untouched and there is still one backward through the network.
        Under DDP the loss is averaged over ranks first so every rank adds the same gradient.
        """
        if self.sparsity is None or self._loss is None:
            return
        layers = self._bdg_layers(pl_module)
        if not layers:
            return
        shares = torch.stack([m.kernel_quantizer.upper_share(m.weight) for m in layers])
        h = torch.relu(shares - self.sparsity).mean()
        loss = trainer.strategy.reduce(self._loss, reduce_op="mean")
        pl_module.log("bdg/upper_share", shares.detach().mean(), on_step=True, on_epoch=False)
        pl_module.log("bdg/h", h.detach(), on_step=True, on_epoch=False)
        if h.item() <= 0:
            return
        lam = self.sparsity_gamma * loss / (h.detach() * (1.0 - self.sparsity_gamma))
        weights = [m.weight for m in layers]
        grads = torch.autograd.grad(lam * h, weights)
        for w, g in zip(weights, grads):
            w.grad = g if w.grad is None else w.grad + g

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.weight_clip is None:
            return
        with torch.no_grad():
            for module in pl_module.modules():
                if isinstance(module, BinaryConv2d):
                    module.weight.clamp_(-self.weight_clip, self.weight_clip)

    @property
    def num_swapped(self) -> int:
        return sum(len(v) for v in self.swapped.values())
