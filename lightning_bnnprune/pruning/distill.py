r"""Distillation: the selector's teacher, and the unpruned network while a pruned one retrains.

Xu et al. (CVPR 2019) distil the unpruned network into the selector's student: the teacher is the
same network with the stage's gates all open (:func:`open_gates_forward`, one extra forward, no
copy). The same loss is also offered to every strategy's *retraining* (the greedy rules too), so
that a comparison between strategies stays equal; that teacher is a frozen copy of the network as
the fit found it (:class:`FrozenTeacher`, the warm start): gates removed, evaluation mode (its own
batch-norm statistics), no gradient. See ``docs/method.md``, section 2.

Loss: Hinton et al.'s soft targets, :math:`T^2\,\mathrm{KL}(\sigma(t/T)\,\|\,\sigma(s/T))`
("Distilling the knowledge in a neural network", 2015; the :math:`T^2` keeps the gradient's scale
independent of ``T``).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .gates import GATE_ATTR, detach_gates

__all__ = ["FrozenTeacher", "distillation_loss", "open_gates_forward"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    r"""Hinton et al.'s soft-target loss, :math:`T^2 \, \mathrm{KL}(\sigma(t/T) \,\|\, \sigma(s/T))`,
    classes along dim 1, averaged over every other position (samples, pixels)."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher.detach().to(student.dtype) / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean() * temperature**2


@torch.no_grad()
def open_gates_forward(network: nn.Module, groups: Sequence[str], args: tuple, kwargs: dict) -> Tensor:
    """The selector's teacher: ``network(*args, **kwargs)`` with the gates of ``groups`` all open
    (``m = 0`` is open), without gradient, its batch-norm statistics left as they are (the buffers
    go in as copies): one forward, no copy of the module, whatever mode it is in."""
    overrides = {f"{name}.{GATE_ATTR}.logits": torch.zeros_like(network.get_submodule(f"{name}.{GATE_ATTR}").logits)
                 for name in groups}
    overrides.update({n: b.clone() for n, b in network.named_buffers()})
    return functional_call(network, overrides, args, kwargs, strict=False)


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
