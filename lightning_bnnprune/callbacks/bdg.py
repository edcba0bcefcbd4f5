"""Removing the filters that BDG's sparse binary domain has emptied.

With the ``{0, 2 tau}`` domain (``Binarize(kernel_quantizer="bdg",
kernel_quantizer_kwargs={"zero_lower": True}, sparsity=EC)``), a weight at the lower value is an
exact zero. A filter whose weights all end there computes nothing but its bias; this callback
closes the gates of such filters at the end of training and lets the shared removal cut them.
The PFR is whatever the sparsity constraint produced, not a target; it is reported.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..layers import BinaryConv2d
from ..pruning.allocation import engine_steps
from ..pruning.criteria import binary_producers
from ..pruning.slicing import OUT
from .base import FilterPruning
from .checks import check, is_number
from .deprecation import accepts_old_spellings

__all__ = ["ZeroFilterPruning"]


class ZeroFilterPruning(FilterPruning):
    """Close and remove every filter whose binary weights are all zero (the BDG strategy).

    A group channel is empty when, in every producer of that channel, the binarised kernel
    ``k(W) * s(W)`` is zero over the kept input channels; a channel with a full-precision
    producer is never empty. Removing an empty filter drops the constant its batch norm adds,
    so unlike the other strategies this can change the logits: the test after ``fit`` measures
    the pruned network.

    It has no target (the PFR is an outcome), so every argument is keyword-only.

    Args:
        atol: a binary weight with ``|w| <= atol`` counts as zero (0 for the exact ``{0, 2 tau}``
            domain).
        network, input_size, exclude, min_filters: see :class:`FilterPruning`.
        round_to: keep a multiple of this many filters per group (or all; an engine name: its
            quantum, see :class:`FilterPruning`), by keeping some empty
            filters: the PFR here is what the training freed, so it can only go down.
        remove_at_end: see :class:`FilterPruning`.

    Raises:
        MisconfigurationException: for a negative ``atol``, and as :class:`FilterPruning`.

    Example::

        trainer = Trainer(callbacks=[
            Binarize(kernel_quantizer="bdg", kernel_quantizer_kwargs={"zero_lower": True}, sparsity=0.3),
            ZeroFilterPruning(),
        ])
    """

    @accepts_old_spellings(("atol", "network", "input_size", "exclude", "min_filters", "remove_at_end", "round_to"),
                           positional=0)
    def __init__(
        self,
        *,
        atol: float = 0.0,
        network: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        exclude: Sequence[str] = (),
        min_filters: int = 1,
        round_to: Union[int, str] = 1,
        remove_at_end: bool = True,
    ) -> None:
        super().__init__(None, network=network, input_size=input_size, exclude=exclude, min_filters=min_filters,
                         round_to=round_to, remove_at_end=remove_at_end)
        check(is_number(atol) and atol >= 0, f"`atol` must be >= 0, got {atol!r}")
        self.atol = float(atol)
        self.empty_share: Optional[float] = None

    @override
    def pruning_settings(self) -> Dict[str, Any]:
        return {**super().pruning_settings(), "atol": self.atol}

    @override
    def configure_gates(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.freeze_gates()  # decided at the end, never by the optimizer
        if self.atol == 0 and not any(
            getattr(m.kernel_quantizer, "zero_lower", False)
            for m in self.network_of(pl_module).modules() if isinstance(m, BinaryConv2d)
        ):
            # XNOR's +-alpha (or a {phi - tau, phi + tau} domain) is never exactly zero: nothing to remove.
            rank_zero_warn(
                f"[{type(self).__name__}] no binary layer has the sparse {{0, 2 tau}} domain, so no filter "
                "can end all zero; use Binarize(kernel_quantizer='bdg', kernel_quantizer_kwargs={'zero_lower': True})"
            )

    @torch.no_grad()
    def empty_channels(self, pl_module: "pl.LightningModule") -> Dict[str, torch.Tensor]:
        """``{group: 0/1 keep vector}``: 0 where every producer's binary filter is all zero."""
        net = self.network_of(pl_module)
        keep: Dict[str, torch.Tensor] = {}
        for group in self.analysis.groups:
            empty = torch.ones(group.size, dtype=torch.bool)
            fp_channels = torch.zeros(group.size, dtype=torch.bool)
            for member in group.members:
                module = net.get_submodule(member.module)
                if member.role == OUT and not isinstance(module, BinaryConv2d):
                    fp_channels[list(member.root_idxs)] = True
            empty &= ~fp_channels
            for conv, idxs, root_idxs in binary_producers(net, group):
                kernel = conv.binarized_kernel().flatten(1)
                filter_empty = (kernel.abs() <= self.atol).all(dim=1).cpu()
                empty[root_idxs] &= filter_empty[idxs]
            if int((~empty).sum()) < self.min_filters:  # never empty a layer completely
                empty[torch.nonzero(empty).flatten()[: self.min_filters - int((~empty).sum())]] = False
            kept = int((~empty).sum())
            # Up to the next multiple, per group: unlike round_counts (nearest, then the global PFR),
            # this rounding may only keep more, since a filter that is not empty is never cut.
            step = engine_steps({group.name: group.size}, self.round_to, self.min_filters)[0][group.name]
            if step > 1 and kept % step:  # keep empties up to the next multiple
                extra = min(group.size, -(-kept // step) * step) - kept
                empty[torch.nonzero(empty).flatten()[:extra]] = False
            keep[group.name] = (~empty).float()
        return keep

    @override
    def final_masks(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Dict[str, torch.Tensor]:
        keep = self.empty_channels(pl_module)
        self.empty_share = sum(int((k == 0).sum()) for k in keep.values()) / max(sum(k.numel() for k in keep.values()), 1)
        rank_zero_info(f"[{type(self).__name__}] {self.empty_share:.1%} of prunable filters are all zero")
        return keep

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_end(trainer, pl_module)
        self.summary["empty_filter_share"] = self.empty_share
