"""``GreedyFilterPruning``: rule-based filter selection on the same gates as the learned selector.

The baselines the papers compare against (Xu et al., CVPR 2019, fig. 4: greedy selection at equal
PFR) and STQ-Nets' binarisation-error rule (Munagala et al., BMVC 2020) as one callback: score each
channel group with a criterion from :mod:`lightning_bnnprune.pruning.criteria`, close the gates of
the lowest-scored channels, retrain. Selection goes through the same gates, and the removal at fit
end through the same :class:`FilterPruning` machinery, as :class:`MainSubsidiaryPruning`, so the
strategies differ only in *which* filters they pick.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from ..pruning import criteria
from ..pruning.allocation import ALLOCATIONS as FIXED_ALLOCATIONS
from ..pruning.allocation import GLOBAL
from ..pruning.criteria import Criterion, scores_for
from ..pruning.schedule import RETRAIN, WARMUP, check_lengths
from .base import BINARY_START, FilterPruning
from .checks import check, checked, is_int, is_number, spelled
from .deprecation import accepts_old_spellings

__all__ = ["GreedyFilterPruning", "MODES", "ALLOCATIONS"]

MODES = ("oneshot", "layerwise")
#: The fixed allocations shared with MainSubsidiaryPruning (same counts per layer at the same
#: target, so the strategies differ only in which filters they pick), plus a criterion-driven one.
ALLOCATIONS = FIXED_ALLOCATIONS + (GLOBAL,)


class GreedyFilterPruning(FilterPruning):
    r"""Close the gates of the least important filters by a fixed rule, one-shot or layer by layer.

    After ``warmup`` steps (or epochs, see ``unit``) every prunable channel group is scored by
    ``criterion`` (higher = more important) and the lowest-scored channels' gates close
    (``gate.set_mask(keep)``). With ``mode="layerwise"`` the groups are pruned one at a time from
    the input side, ``retrain`` steps/epochs apart, as in Xu et al.'s layer-wise schedule for the
    learned selector. Training goes on with the gates fixed; at fit end the closed filters are
    removed physically by :class:`FilterPruning`. If ``fit`` stops before the schedule is through
    (early stopping), the remaining groups are pruned at fit end, so the target is always met.

    Gates never train: their logits get ``requires_grad=False`` in ``setup``, so they are in the
    user's optimizer (they exist when ``configure_optimizers`` runs) but never get a gradient, and
    torch's optimizers (SGD, Adam, AdamW, weight decay included) skip parameters whose ``grad`` is
    ``None``.

    Count: the achieved PFR (closed channels / channels of the prunable groups) is
    ``round(target_pfr * total) / total``, within half a filter of the target; ``min_filters``
    holds per group, and per-group rounding is corrected across groups so the total is exact.

    Args:
        target_pfr: pruned filters / prunable filters, in ``[0, 1)``.
        target_speedup, latency_table: instead of ``target_pfr``, a speedup in Larq Compute
            Engine (see :class:`FilterPruning`): the counts per group are chosen when the first
            group is pruned, the criterion's scores against the time each step saves.
        criterion: a name from :func:`lightning_bnnprune.pruning.criteria.available`
            (``"l1"``, ``"binarization_error"``, ``"random"``) or a callable
            ``(network, group) -> Tensor[group.size]`` of scores, higher = keep.
        seed: seed of the ``"random"`` criterion.
        mode: ``"oneshot"`` (all groups at once, after the warm-up) or ``"layerwise"`` (one group
            at a time, bottom-up, ``retrain`` apart).
        allocation: how many filters each group loses. ``"uniform"``, ``"size"``, ``"macs"``: a
            fixed share per group, as :func:`lightning_bnnprune.pruning.allocation.allocate` gives
            (the same counts as :class:`MainSubsidiaryPruning`); ``"global"``: one ranking of all
            channels by the criterion, scores normalised per group by their mean. In layer-wise
            mode the global counts are fixed when the first group is pruned; each group's
            *choice* of filters is scored at its own turn.
        unit: ``"steps"`` (optimizer steps, ``trainer.global_step``) or ``"epochs"``.
        warmup: training before the first pruning, in ``unit`` (0: prune before the first
            optimizer step and retrain from there).
        retrain: layer-wise mode only (required there): retraining between two groups, in ``unit``.
        scale_to_fit: shrink ``warmup`` (and ``retrain``) when the trainer's ``max_steps`` /
            ``max_epochs`` cannot hold the schedule, as :class:`MainSubsidiaryPruning` does
            (``False``: that is an error naming the lengths that would fit).
        network, input_size, exclude, min_filters, round_to: see :class:`FilterPruning`.
        distill, distill_temperature, distill_teacher: distillation from the unpruned start
            network (or the full-precision one) once filters are closed (see
            :class:`FilterPruning`), as ``MainSubsidiaryPruning`` offers it.
        remove_at_end: see :class:`FilterPruning`.

    Raises:
        MisconfigurationException: on an unknown criterion, mode, allocation or unit; a
            ``target_pfr`` outside ``[0, 1)``; a negative ``warmup``; ``retrain`` missing or
            below 1 in layer-wise mode, or given in one-shot mode; a target that ``min_filters``
            makes unreachable (in ``setup``); a schedule longer than the trainer's
            ``max_steps`` / ``max_epochs`` without ``scale_to_fit`` (in ``on_fit_start``, with
            the trainer length and the schedule lengths that would fit); a resume with changed
            pruning settings (:class:`~lightning_bnnprune.callbacks.checks.ResumeMismatch`, see
            :class:`FilterPruning`).

    Example::

        from lightning import Trainer
        from lightning_bnnprune import Binarize, GreedyFilterPruning

        trainer = Trainer(max_epochs=20, callbacks=[
            Binarize(),
            GreedyFilterPruning(0.4, criterion="binarization_error", mode="layerwise",
                                unit="epochs", warmup=2, retrain=1),
        ])
        trainer.fit(my_lightning_module, datamodule)  # afterwards the module is the pruned network
    """

    @accepts_old_spellings(
        ("criterion", "target_pfr", "mode", "allocation", "warmup", "retrain", "unit", "seed", "min_filters", "network",
         "input_size", "exclude", "remove_at_end", "distill", "distill_temperature", "round_to", "scale_to_fit"),
        first_is_old=lambda first: not is_number(first),  # 0.1 put the criterion first
        old_defaults={"target_pfr": 0.4},
    )
    def __init__(
        self,
        target_pfr: Optional[float] = None,
        *,
        target_speedup: Optional[float] = None,
        latency_table: Any = None,
        criterion: Union[str, Criterion] = "l1",
        seed: int = 0,
        mode: str = "oneshot",
        allocation: str = "uniform",
        unit: str = "steps",
        warmup: int = 0,
        retrain: Optional[int] = None,
        scale_to_fit: bool = False,
        network: Optional[str] = None,
        input_size: Optional[Sequence[int]] = None,
        exclude: Sequence[str] = (),
        min_filters: int = 1,
        round_to: Union[int, str] = 1,
        distill: float = 0.0,
        distill_temperature: float = 4.0,
        distill_teacher: str = BINARY_START,
        remove_at_end: bool = True,
    ) -> None:
        super().__init__(
            target_pfr,
            target_speedup=target_speedup,
            latency_table=latency_table,
            network=network,
            input_size=input_size,
            exclude=exclude,
            min_filters=min_filters,
            round_to=round_to,
            distill=distill,
            distill_temperature=distill_temperature,
            distill_teacher=distill_teacher,
            remove_at_end=remove_at_end,
        )
        self._require_target()
        check(target_speedup is None or allocation == "uniform",
              f"with `target_speedup` the latency budget decides the counts per group (criterion scores against "
              f"time saved): leave `allocation` at 'uniform', got {allocation!r}")
        check(is_int(seed), f"`seed` must be an int, got {seed!r}")
        self.criterion = checked(criteria.get, criterion, **({"seed": seed} if criterion == "random" else {}),
                                 prefix="`criterion`: ")
        check(mode in MODES, f"`mode` must be one of {', '.join(MODES)}; got {mode!r}")
        check(allocation in ALLOCATIONS, f"`allocation` must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
        checked(check_lengths, unit, {WARMUP: warmup})
        if mode == "layerwise":
            checked(check_lengths, unit, {RETRAIN: retrain}, prefix="mode='layerwise': ")
        check(mode != "oneshot" or retrain is None,
              f"`retrain` is for mode='layerwise'; with mode='oneshot' it must be None "
              f"(training after the pruning is all retraining), got {retrain!r}")
        self.criterion_name = spelled(criterion)
        self.mode = mode
        self.allocation = allocation
        self.warmup = warmup
        self.retrain = retrain
        self.unit = unit
        self.seed = seed
        self.scale_to_fit = bool(scale_to_fit)
        self.stages: List[List[str]] = []
        # resume state (the callback's state_dict): groups pruned so far, the per-group counts and
        # the lengths fitted to the first sitting's trainer (``warmup`` / ``retrain`` stay the arguments)
        self.done: List[str] = []
        self.counts: Optional[Dict[str, int]] = None
        self.lengths: Optional[Dict[str, int]] = None

    # ------------------------------------------------------------------ schedule
    @property
    def num_to_close(self) -> int:
        """Filters closed at the end: ``round(target_pfr * prunable filters)``, or the latency
        budget's counts (0 until they are chosen)."""
        if self.target_pfr is None:
            return sum(self.counts.values()) if self.counts else 0
        return round(self.target_pfr * self.analysis.num_filters) if self.analysis is not None else 0

    def due(self, stage: int) -> int:
        """The step / epoch at which ``stages[stage]`` is pruned: ``warmup + stage * retrain``, in
        the lengths fitted to the trainer (from ``on_fit_start`` on; the arguments before)."""
        lengths = self.lengths or {WARMUP: self.warmup, RETRAIN: self.retrain}
        return lengths[WARMUP] + stage * (lengths.get(RETRAIN) or 0)

    @property
    def finished(self) -> bool:
        return len(self.done) == sum(len(s) for s in self.stages)

    @override
    def configure_gates(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.freeze_gates()  # fixed by rule, never by the optimizer
        names = [g.name for g in self.analysis.groups if g.capacity(self.min_filters) > 0]  # others stay whole
        self.stages = [names] if self.mode == "oneshot" else [[n] for n in names]
        if self.target_speedup is not None:  # the latency budget, from the criterion's scores at the first pruning
            return
        if self.allocation != "global":
            if self.counts is None:
                self.counts = self.plan_counts(pl_module, names, self.allocation, self.analysis.num_filters)
            return
        capacity = sum(self.analysis[n].capacity(self.min_filters) for n in names)
        if self.num_to_close > capacity:
            raise MisconfigurationException(
                f"target_pfr={self.target_pfr} needs {self.num_to_close} of {self.analysis.num_filters} filters "
                f"pruned, but keeping min_filters={self.min_filters} per layer allows at most {capacity} "
                f"(PFR {capacity / self.analysis.num_filters:.4f})"
            )

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        if not self.stages:
            return
        # a resumed fit keeps the lengths its first sitting fitted (checked against this trainer)
        resumed = self.lengths is not None
        lengths = self.lengths or {WARMUP: self.warmup} | ({RETRAIN: self.retrain} if self.mode == "layerwise" else {})
        self.lengths = self.fit_schedule(trainer, self.unit, lengths, {WARMUP: 1, RETRAIN: len(self.stages) - 1},
                                         scale_to_fit=self.scale_to_fit and not resumed, extra=1)
        rank_zero_info(
            f"[{type(self).__name__}] {self.criterion_name}, {self.mode}, "
            f"{self.allocation if self.target_speedup is None else f'target_speedup={self.target_speedup}'}: close "
            f"{self.num_to_close or 'the latency budget of'}/{self.analysis.num_filters} filters in "
            f"{len(self.stages)} stage(s) "
            f"at {self.unit} {[self.due(i) for i in range(len(self.stages))]}"
        )

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.unit == "steps":
            self._prune_due(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.unit == "epochs":
            self._prune_due(trainer, pl_module, trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        pl_module.log("prune/pfr", self.pfr(), on_step=False, on_epoch=True)

    @override
    def final_masks(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.finished:
            # Training stopped early (early stopping, a shorter run): reach the target anyway.
            rank_zero_warn(
                f"{type(self).__name__}: fit ended before the schedule did; pruning the remaining "
                f"{sum(len(s) for s in self.stages) - len(self.done)} group(s) now, without retraining"
            )
            self._prune_due(trainer, pl_module, math.inf, at="fit end")
        return None  # the gates now say it all

    # ------------------------------------------------------------------ pruning
    def _prune_due(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", now: float, at: Optional[str] = None
    ) -> None:
        for i, stage in enumerate(self.stages):
            if self.due(i) > now:
                break
            todo = [name for name in stage if name not in self.done]
            if todo:
                self._prune(trainer, pl_module, todo, at=at or f"{self.unit[:-1]} {now}")

    @torch.no_grad()
    def _prune(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", names: List[str], at: str) -> None:
        net = self.network_of(pl_module)
        if self.counts is None:  # "global" / target_speedup: one ranking, when the first group is pruned
            everything = [n for stage in self.stages for n in stage]
            scores = {n: scores_for(self.criterion, net, self.analysis[n]) for n in everything}
            self.counts = self.plan_counts(pl_module, everything, self.allocation, self.analysis.num_filters, scores)
        # Score the whole stage before closing anything, so one-shot scores see the unpruned net.
        scores = {name: scores_for(self.criterion, net, self.analysis[name]) for name in names}
        for name in names:
            group = self.analysis[name]
            # the lowest-scored close (ties: the lower index), as many per cell where a grouped conv needs it
            keep = (~group.keep_top(-scores[name], self.counts[name])).float()
            gate = self.gates[name]
            keep = trainer.strategy.broadcast(keep.to(gate.logits.device), src=0)  # one decision on every rank
            gate.set_mask(keep)
            self.done.append(name)
        what = names[0] if len(names) == 1 else f"{len(names)} groups"
        rank_zero_info(
            f"[{type(self).__name__}] {at}: closed {sum(self.counts[n] for n in names)} filters of {what} "
            f"by {self.criterion_name}; PFR now {self.pfr():.3f}"
        )

    # ------------------------------------------------------------------ state
    @override
    def pruning_settings(self) -> Dict[str, Any]:
        return {**super().pruning_settings(), "criterion": self.criterion_name, "seed": self.seed, "mode": self.mode,
                "allocation": self.allocation, "unit": self.unit, "warmup": self.warmup, "retrain": self.retrain}

    @override
    def state_dict(self) -> Dict[str, Any]:
        state = dict(super().state_dict())
        state.update(greedy_done=list(self.done), greedy_counts=dict(self.counts) if self.counts else None,
                     greedy_lengths=dict(self.lengths) if self.lengths else None)
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state = dict(state_dict)
        done = list(state.pop("greedy_done", []))
        counts = state.pop("greedy_counts", None)
        lengths = state.pop("greedy_lengths", None)
        super().load_state_dict(state)  # refuses changed settings before anything is taken over
        self.done = done
        self.counts = dict(counts) if counts is not None else None
        self.lengths = dict(lengths) if lengths is not None else None
