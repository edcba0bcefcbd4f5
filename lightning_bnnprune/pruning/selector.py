r"""The selector phase: the loss that trains the gates, the logits they start from, the masks they end in.

In a selector phase of :class:`~lightning_bnnprune.MainSubsidiaryPruning` only the stage's gates
train, on

.. math:: L = L_{user} + \lambda_{kd}\, T^2\, \mathrm{KL}(\sigma(t/T) \,\|\, \sigma(s/T)) + \sum_u B_u,

with the teacher ``t`` the network with the stage's gates all open
(:func:`~.distill.open_gates_forward`) and one budget term ``B_u`` per *budget unit*: a group, or
all the groups of a stage when they share one budget (learned counts). The derivation and the
choices are in ``docs/method.md``, section 2.

**Budget term.** Xu et al. (CVPR 2019) add ``lambda_s * ||m_l||_0`` to the selector loss; the L0
norm of the mask passes no gradient (its official code's penalty is a constant for autograd), and
a fixed ``lambda_s`` would need tuning per architecture. *Choice* (``docs/method.md``, section
2.3): a hinge on the share of open gates, the form of the sparsity constraint of Schiavone et al.
(BDG, ECML-PKDD 2023) (:func:`budget_term`),

.. math::  h = \mathrm{relu}\big(\tfrac1n \textstyle\sum_k g_k - \kappa_l\big), \qquad
           B = \lambda h, \qquad
           \frac{\partial B}{\partial m_k} = \frac{\lambda}{n} \frac{\partial g_k}{\partial m_k}
           \ \text{while } h > 0,

differentiable through the gates' straight-through gradient, with ``kappa_l`` the kept share of the
layer's allocation. Every open gate gets the same push; the loss gradient decides which of them
give way. The push must be of the size of the loss gradients that tell filters apart: the gate
optimizer is Adam, which normalises each logit's steps, so a push much larger than the loss
gradients (BDG's ``lambda = gamma L / (h (1 - gamma))`` is, and it grows like ``1/h``) moves
every logit down in lock-step and closes the whole layer on one step, whatever the filters are
worth. The adaptive weight therefore follows the gradients (:func:`budget_weight`):

.. math::  \lambda = \beta \, \frac{n}{\partial g / \partial m} \, \mathrm{std}_k\!\big(\partial L / \partial m_k\big),

so the push on each logit is ``beta`` times the spread of the loss gradients over the layer's
gates (:func:`gradient_spread`, averaged over the past steps by :meth:`SelectorLoss.observe`, no
gradient through it). The spread is taken over gates, so the uniform push itself does not enter
it, and it is free of the loss's scale. A fixed ``lambda`` may be passed instead.

**Start and end.** The gates start open, or ranked by a criterion around the group's cut
(:func:`rank_logits`). At the end of the phase the share is enforced exactly: the learned logits
rank the filters, the budget says how many stay (:meth:`~.groups.ChannelGroup.keep_top` per
group, :func:`keep_top_across` when a stage's groups share one budget).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .distill import distillation_loss, open_gates_forward
from .gates import FilterGate
from .groups import ChannelGroup

__all__ = [
    "BudgetUnit", "SelectorLoss", "budget_term", "budget_weight", "gradient_spread", "keep_top_across", "rank_logits",
]


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


def budget_term(gates: Tensor, keep: float, weight: float) -> Tensor:
    r"""``weight * relu(mean(gates) - keep)`` (see the module docstring).

    Args:
        gates: the layer's 0/1 gates, with their straight-through gradient.
        keep: the share of the layer's filters to keep, ``kappa_l``.
        weight: ``lambda``, from :func:`budget_weight` or fixed.
    """
    return weight * torch.relu(gates.mean() - keep)


def budget_weight(grad_spread: float, size: int, strength: float = 1.0, slope: float = 0.5) -> float:
    r"""The adaptive ``lambda`` that pushes each logit by ``strength * grad_spread``.

    Args:
        grad_spread: the spread (std over the layer's gates) of ``dL/dm``, averaged over steps.
        size: the number of gates ``n``.
        strength: ``beta``, the push in units of the spread.
        slope: ``dg/dm`` of the gate's straight-through estimator (1/2 for :class:`FilterGate`).
    """
    return strength * grad_spread * size / slope


def gradient_spread(grad: Tensor, logits: Tensor, clip: float = 1.0) -> float:
    """``std`` of the gate gradients over the gates whose straight-through gradient is alive."""
    alive = grad[logits.detach().abs() <= clip]
    return float(alive.std()) if alive.numel() > 1 else 0.0


@torch.no_grad()
def rank_logits(scores: Tensor, prune: int, spread: float) -> Tensor:
    r"""Gate logits that encode a criterion's ranking: the filter of rank ``r`` (0 = lowest score,
    stable order as the greedy rule sorts) gets :math:`\mathrm{spread}\,(r + 1/2 - p)/n`, so the
    ``p = prune`` lowest are closed (negative), the others open, and
    :meth:`~.groups.ChannelGroup.keep_top` with ``n - p`` kept returns exactly the greedy rule's
    selection. The small spread lets the loss reorder neighbours in a few gate steps and far ranks
    only with a consistent gradient.
    """
    n = scores.numel()
    ranks = torch.empty(n, dtype=torch.float32)
    ranks[torch.argsort(scores.detach().float().cpu().flatten(), stable=True)] = torch.arange(n, dtype=torch.float32)
    return spread * (ranks + 0.5 - prune) / max(n, 1)


@torch.no_grad()
def keep_top_across(logits: Mapping[str, Tensor], keep: int, floors: Mapping[str, int]) -> Dict[str, Tensor]:
    """0/1 masks keeping the ``keep`` highest logits over all the groups together, each group
    keeping at least ``floors[group]`` (its own highest logits first,
    :meth:`~.groups.ChannelGroup.keep_top` over the whole group).

    The learned per-layer counts: one keep budget over several groups' logits, which compare
    because every group's gates start alike and move under the same optimizer and budget term.
    Ties go to the earlier group, then the lower index (deterministic on every rank). The masks
    are on the logits' devices.

    Raises:
        ValueError: if the floors alone exceed ``keep`` or ``keep`` exceeds the filters.
    """
    sizes = {g: t.numel() for g, t in logits.items()}
    floors = {g: min(int(floors.get(g, 0)), n) for g, n in sizes.items()}
    if not sum(floors.values()) <= keep <= sum(sizes.values()):
        raise ValueError(f"keep={keep} must lie in [{sum(floors.values())} (the floors), {sum(sizes.values())}]")
    masks = {g: ChannelGroup(g, sizes[g], ()).keep_top(t, floors[g]).to(t.device) for g, t in logits.items()}
    rest = [
        (-float(v), order, i, g)
        for order, (g, t) in enumerate(logits.items())
        for i, v in enumerate(t.detach().flatten().cpu().tolist())
        if not masks[g][i]
    ]
    for _, _, i, g in sorted(rest)[: keep - sum(floors.values())]:
        masks[g][i] = True
    return masks
