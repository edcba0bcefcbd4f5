r"""The selector phase's loss: Xu et al.'s distillation plus the budget that drives the gates.

In a selector phase of :class:`~lightning_bnnprune.MainSubsidiaryPruning` only the stage's gates
train, on

.. math:: L = L_{user} + \lambda_{kd}\, T^2\, \mathrm{KL}(\sigma(t/T) \,\|\, \sigma(s/T)) + \sum_u B_u,

with the teacher ``t`` the network with the stage's gates all open
(:func:`~.distill.open_gates_forward`) and one budget term ``B_u`` per *budget unit*: a group, or
all the groups of a stage when they share one budget (learned counts). Each term is
:func:`~.budget.budget_term` with its weight from :func:`~.budget.budget_weight`: the spread of the
loss gradients over the unit's gates, averaged over steps (:meth:`SelectorLoss.observe`). The
derivation and the choices are in ``docs/method.md``, section 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .budget import budget_term, budget_weight, gradient_spread
from .distill import distillation_loss, open_gates_forward
from .gates import FilterGate

__all__ = ["BudgetUnit", "SelectorLoss"]


@dataclass(frozen=True)
class BudgetUnit:
    """Gates that share one budget: ``close`` of their ``size`` filters are to close."""

    key: str
    groups: Tuple[str, ...]
    close: int
    size: int


class SelectorLoss:
    """The selector's loss terms, and the running gradient spread that weighs the budget.

    Args:
        lambda_kd: weight of the distillation (0: none, and no teacher forward).
        temperature: the distillation temperature ``T``.
        strength: ``beta``, the adaptive budget's push in units of the gradient spread.
        fixed_weight: a fixed budget weight ``lambda`` instead of the adaptive one.
    """

    def __init__(self, lambda_kd: float, temperature: float, strength: float,
                 fixed_weight: Optional[float] = None) -> None:
        self.lambda_kd, self.temperature = lambda_kd, temperature
        self.strength, self.fixed_weight = strength, fixed_weight
        self.spread: Dict[str, float] = {}  # per unit key; survives a resume (the callback's state)

    def weight(self, unit: BudgetUnit) -> float:
        """The budget weight of ``unit`` now (adaptive: 0 on a phase's first step, so the loss
        alone starts the ranking)."""
        if self.fixed_weight is not None:
            return float(self.fixed_weight)
        return budget_weight(self.spread.get(unit.key, 0.0), unit.size, self.strength)

    def terms(self, network: nn.Module, gates: Mapping[str, FilterGate], groups: Sequence[str],
              units: Sequence[BudgetUnit], loss: Tensor,
              student: Optional[Tuple[tuple, dict, Tensor]]) -> Tuple[Tensor, Tensor]:
        """``(kd, budget)`` for this step. ``student``: the network's ``(args, kwargs, logits)``
        (needed when ``lambda_kd > 0``); ``groups``: the stage's groups, opened for the teacher."""
        kd = loss.new_zeros(())
        if self.lambda_kd > 0 and any(gates[n].num_open < gates[n].logits.numel() for n in groups):
            args, kwargs, logits = student
            kd = distillation_loss(logits, open_gates_forward(network, groups, args, kwargs), self.temperature)
        # else the student is the teacher: the loss and its gradient are 0, the forward is skipped
        budget = sum(
            budget_term(torch.cat([gates[n]() for n in u.groups]), 1.0 - u.close / u.size, self.weight(u))
            for u in units
        )
        return kd, budget

    @torch.no_grad()
    def observe(self, gates: Mapping[str, FilterGate], units: Sequence[BudgetUnit]) -> None:
        """After the backward: fold this step's gradient spread of each unit into its average."""
        for u in units:
            logits: List[Tensor] = [gates[n].logits for n in u.groups]
            if all(t.grad is not None for t in logits):
                spread = gradient_spread(torch.cat([t.grad for t in logits]), torch.cat([t.detach() for t in logits]))
                old = self.spread.get(u.key)
                self.spread[u.key] = spread if old is None else 0.9 * old + 0.1 * spread
