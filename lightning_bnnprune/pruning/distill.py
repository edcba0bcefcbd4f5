r"""Distillation from the unpruned network while a pruned one retrains.

Xu et al. (CVPR 2019) distil the unpruned network into the selector's student; here the same loss
is offered to every strategy's *retraining* (the greedy rules too), so that a comparison between
strategies stays equal. The teacher is a frozen copy of the network as the fit found it (the warm
start): gates removed, evaluation mode (its own batch-norm statistics), no gradient.

Loss: Hinton et al.'s soft targets, :math:`T^2\,\mathrm{KL}(\sigma(t/T)\,\|\,\sigma(s/T))`
("Distilling the knowledge in a neural network", 2015; the :math:`T^2` keeps the gradient's scale
independent of ``T``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gates import detach_gates

__all__ = ["FrozenTeacher", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    r"""Hinton et al.'s soft-target loss, :math:`T^2 \, \mathrm{KL}(\sigma(t/T) \,\|\, \sigma(s/T))`,
    classes along dim 1, averaged over every other position (samples, pixels)."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher.detach().to(student.dtype) / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


class FrozenTeacher:
    """A frozen copy of ``network`` as it is now, gates and masks removed.

    Not an ``nn.Module`` attribute of anything, so it is in no optimizer, no ``state_dict`` of the
    model and no device move of Lightning's: :meth:`to` follows the student explicitly, and
    :meth:`state_dict` / :meth:`load_state_dict` carry it through a checkpoint (a resumed fit must
    distil from the network the first sitting started from, not from the one it resumes).
    """

    def __init__(self, network: nn.Module) -> None:
        self.net = copy.deepcopy(network)
        detach_gates(self.net)
        self.net.eval()
        self.net.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.net(*args, **kwargs)

    def to(self, device: torch.device) -> "FrozenTeacher":
        self.net.to(device)
        return self

    def state_dict(self) -> Dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.net.load_state_dict(state)
