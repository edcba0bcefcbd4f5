"""A phase's learning rate on the user's optimizer, for one step at a time.

A strategy's retrain phases want their own rate (Xu et al. retrain at about 1e-4, see
``docs/method.md`` section 2) without taking the user's optimizer or schedulers away. So the rate
is set on the optimizer's param groups just before its step and put back right after it, by a
step post-hook: Lightning steps the user's schedulers before ``on_train_batch_end``, and they must
see (and update) their own rate, never the phase's.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["PhaseRates"]


class PhaseRates:
    """Set a rate for one optimizer step, restore it after the step.

    Example (inside a callback)::

        rates = PhaseRates(trainer.optimizers)                  # on_train_start
        rates.set(optimizer, lambda group: 1e-4)                # on_before_optimizer_step
        rates.remove()                                          # on_fit_end / on_exception
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        # the user's initial rates: torch's schedulers keep them as "initial_lr"; without a
        # scheduler the rate is constant anyway
        self._base = {id(g): g["lr"] for opt in optimizers for g in opt.param_groups}
        self._saved: Optional[Tuple[torch.optim.Optimizer, List[float]]] = None
        self._hooks: List[Any] = [opt.register_step_post_hook(lambda *_: self.restore()) for opt in optimizers]

    def base(self, group: Dict[str, Any]) -> float:
        """The user's initial rate of a param group."""
        return group.get("initial_lr", self._base.get(id(group), group["lr"]))

    def set(self, optimizer: torch.optim.Optimizer, rate: Callable[[Dict[str, Any]], float]) -> None:
        """``group["lr"] = rate(group)`` for every param group, until :meth:`restore`."""
        self.restore()
        self._saved = (optimizer, [group["lr"] for group in optimizer.param_groups])
        for group in optimizer.param_groups:
            group["lr"] = rate(group)

    def restore(self) -> None:
        """Put the user's rates back (idempotent)."""
        if self._saved is not None:
            optimizer, lrs = self._saved
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            self._saved = None

    def remove(self) -> None:
        """Restore, and remove the step hooks."""
        self.restore()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
