"""What every filter-pruning callback shares: finding the groups, owning the gates, removing at the end.

Subclasses (``MainSubsidiaryPruning``, ``GreedyFilterPruning``) only decide *which* gates close
and when; the groups, the gates and the physical removal at fit end are the same for all of them,
so every strategy is measured through the same machinery.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from ..binarize import binary_layers, find_networks
from ..pruning.gates import FilterGate, attach_gates
from ..pruning.groups import GroupAnalysis, example_input_for, find_channel_groups
from .binarize import Binarize

__all__ = ["FilterPruning"]


class FilterPruning(Callback):
    """Base class: channel groups and gates of one binarised network inside a LightningModule.

    In ``setup`` (before a checkpoint's weights load, so a resumed run finds the same tree) it
    traces the network once, finds its prunable channel groups and attaches one
    :class:`~lightning_bnnprune.pruning.FilterGate` per group. If the network has no binary layer
    yet and a :class:`Binarize` callback is in the trainer, that callback runs first; with none
    it is an error (pruning full-precision filters is not what this library is for).

    Args:
        target_pfr: pruned filters / prunable filters to reach, in ``[0, 1)``.
        network: attribute path of the network inside the LightningModule (default: the single
            timm model found, else the whole module).
        input_size: ``(C, H, W)`` of one input, for tracing; default ``pl_module.example_input_array``,
            else the network's timm ``pretrained_cfg["input_size"]``.
        exclude: names of binary convs whose channel groups must not be pruned.
        min_filters: the fewest channels any group keeps (never prune a layer to zero).
        remove_at_end: remove the pruned filters physically at the end of ``fit``.
    """

    def __init__(
        self,
        target_pfr: float,
        network: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        exclude: Sequence[str] = (),
        min_filters: int = 1,
        remove_at_end: bool = True,
    ) -> None:
        if not isinstance(target_pfr, (int, float)) or not 0.0 <= float(target_pfr) < 1.0:
            raise MisconfigurationException(f"`target_pfr` must be in [0, 1), got {target_pfr!r}")
        if not isinstance(min_filters, int) or min_filters < 1:
            raise MisconfigurationException(f"`min_filters` must be an int >= 1, got {min_filters!r}")
        if input_size is not None and len(input_size) != 3:
            raise MisconfigurationException(f"`input_size` must be (C, H, W), got {input_size!r}")
        self.target_pfr = float(target_pfr)
        self.network = network
        self.input_size = tuple(input_size) if input_size is not None else None
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.min_filters = min_filters
        self.remove_at_end = remove_at_end
        self.analysis: Optional[GroupAnalysis] = None
        self.gates: Dict[str, FilterGate] = {}
        self.network_path: str = ""

    # ------------------------------------------------------------------ set-up
    def network_of(self, pl_module: "pl.LightningModule") -> nn.Module:
        return pl_module.get_submodule(self.network_path) if self.network_path else pl_module

    def _example_inputs(self, pl_module: "pl.LightningModule", net: nn.Module) -> torch.Tensor:
        if self.input_size is not None:
            return example_input_for(net, self.input_size)
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, torch.Tensor):
            return example[:1].to(next(net.parameters()).device)
        return example_input_for(net)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.analysis is not None:
            return
        try:
            paths = find_networks(pl_module, [self.network] if self.network else None)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        if len(paths) != 1:
            raise MisconfigurationException(
                f"{type(self).__name__} prunes one network; found {', '.join(paths)}: pass `network=`"
            )
        self.network_path = paths[0]
        net = self.network_of(pl_module)
        if not binary_layers(net):
            binarizers = [cb for cb in trainer.callbacks if isinstance(cb, Binarize)]
            if not binarizers:
                raise MisconfigurationException(
                    f"{type(self).__name__} prunes binary layers, but the network has none: "
                    "add `Binarize()` to the Trainer's callbacks"
                )
            binarizers[0].setup(trainer, pl_module, stage)
        unknown = [n for n in self.exclude if n not in binary_layers(net)]
        if unknown:
            raise MisconfigurationException(
                f"`exclude` names unknown binary layers {unknown}; binary layers: {', '.join(binary_layers(net))}"
            )
        self.analysis = find_channel_groups(net, self._example_inputs(pl_module, net), exclude=self.exclude)
        if not self.analysis.groups:
            reasons = "; ".join(f"{k}: {v}" for k, v in self.analysis.refused.items()) or "no binary conv"
            raise MisconfigurationException(f"{type(self).__name__}: the network has no prunable layer ({reasons})")
        small = [g.name for g in self.analysis.groups if g.size <= self.min_filters]
        if small:
            rank_zero_info(f"[{type(self).__name__}] groups at or below min_filters stay whole: {small}")
        self.gates = attach_gates(net, self.analysis)
        refused = f"; not prunable: {self.analysis.refused}" if self.analysis.refused else ""
        rank_zero_info(
            f"[{type(self).__name__}] {len(self.analysis.groups)} prunable channel groups, "
            f"{self.analysis.num_filters} filters{refused}"
        )

    # ------------------------------------------------------------------ figures
    def pfr(self) -> float:
        """Pruned filters / prunable filters under the current gates."""
        total = sum(g.logits.numel() for g in self.gates.values())
        closed = sum(g.logits.numel() - g.num_open for g in self.gates.values())
        return closed / max(total, 1)

    def kept_filters(self) -> Dict[str, int]:
        return {name: gate.num_open for name, gate in self.gates.items()}
