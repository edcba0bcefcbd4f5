"""What trains in a phase: one set of parameters, every other frozen, in the manner of Lightning's
``BaseFinetuning`` (freeze / unfreeze), and put back as it was at the end of the fit.

A frozen parameter gets ``requires_grad=False``, so autograd stops early (a selector phase then
back-propagates only down to its layer), except under DDP without ``find_unused_parameters``,
whose reducer expects a gradient for every parameter it wraps. In every case the frozen
parameters' gradients are dropped before the user's optimizer steps (:meth:`drop_frozen_grads`;
torch's optimizers skip a parameter without one, weight decay included), so nothing outside the
phase moves.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["PhaseParameters"]


class PhaseParameters:
    """The user's trainable parameters (less ``own``, the callback's own, e.g. gate logits), and
    which of all of them train in the current phase.

    Args:
        trainer: the fit's trainer (read for its DDP wrapper).
        pl_module: the user's LightningModule.
        own: parameters that are not the main network's.
    """

    def __init__(self, trainer: Any, pl_module: nn.Module, own: Iterable[Tensor]) -> None:
        skip = {id(p) for p in own}
        self._requires_grad: Dict[str, bool] = {n: p.requires_grad for n, p in pl_module.named_parameters()}
        self.main: List[nn.Parameter] = [p for p in pl_module.parameters() if p.requires_grad and id(p) not in skip]
        ddp = trainer.strategy.model
        #: False under DDP without find_unused_parameters: frozen weights keep requires_grad
        self.toggle = not (isinstance(ddp, DistributedDataParallel) and not ddp.find_unused_parameters)
        self.frozen: List[nn.Parameter] = []

    def train_only(self, pl_module: nn.Module, trainable: Iterable[Tensor]) -> None:
        """``trainable`` train from now on; every other parameter of ``pl_module`` is frozen."""
        trainable = list(trainable)
        ids = {id(p) for p in trainable}
        self.frozen = [p for p in pl_module.parameters() if id(p) not in ids]
        if self.toggle:
            for p in trainable:
                p.requires_grad_(True)
            for p in self.frozen:
                p.requires_grad_(False)

    def drop_frozen_grads(self) -> None:
        """Before the optimizer's step: the frozen parameters' gradients go."""
        for p in self.frozen:
            p.grad = None

    def restore(self, pl_module: nn.Module) -> None:
        """Every parameter's ``requires_grad`` as it was when the fit started."""
        for name, p in pl_module.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
