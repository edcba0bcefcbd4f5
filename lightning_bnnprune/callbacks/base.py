"""What every filter-pruning callback shares: finding the groups, owning the gates, removing at the end.

Subclasses (``MainSubsidiaryPruning``, ``GreedyFilterPruning``, ``ZeroFilterPruning``) only decide
*which* gates close and when, through the override points of :class:`FilterPruning`; the groups,
the gates and the physical removal at fit end are the same for all of them, so every strategy is
measured through the same machinery. ``docs/extending.md`` shows a new strategy end to end.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from ..binarize import binary_layers
from ..introspect import example_batch, find_networks, input_size_of
from ..paths import free_stems
from ..pruning.allocation import ENGINES, allocate, allocate_latency, engine_steps, macs_per_channel
from ..pruning.distill import FrozenTeacher, distillation_loss
from ..pruning.gates import FilterGate, attach_gates, detach_gates
from ..pruning.groups import GroupAnalysis, coverage, find_channel_groups
from ..pruning.latency_table import (BinaryConvSite, LatencyTable, binary_conv_sites, measure_table, measured_speedup,
                                     network_ms)
from ..pruning.record import CHECKPOINT_KEY, PruningRecord, save_pruned
from ..pruning.report import CompressionReport, compression_report
from ..pruning.schedule import ScheduleTooLong, fit_lengths, trainer_budget
from ..pruning.surgery import check_batch, remove_filters, resolve_keep
from .binarize import FULL_PRECISION, Binarize
from .checks import ResumeMismatch, ScheduleMisconfiguration, check, check_pfr, is_int, is_number
from .deprecation import accepts_old_spellings
from .wrapping import Captured, StepWrapper, student_output

__all__ = ["FilterPruning", "BINARY_START", "DISTILL_TEACHERS"]

#: ``distill_teacher=BINARY_START``: the binary network as the fit found it (the warm start).
BINARY_START = "binary_start"
DISTILL_TEACHERS = (BINARY_START, FULL_PRECISION)

LATENCY_STEP = 4  # target_speedup's counts move in LCE's x86 output blocks at least
LATENCY_FLOOR = 0.25  # target_speedup: the share of a group's channels it keeps at least (as msf's layer_floor)
LATENCY_TOLERANCE = 0.02  # target_speedup: a plan measured within 2 % of the target is kept as it is
LATENCY_CHECKS = 3  # target_speedup: plans exported and timed at most, per allocation


def _ungated_clone(net: nn.Module) -> nn.Module:
    """A copy of ``net`` without gates, to export whole for the float layers' time."""
    clone = copy.deepcopy(net)
    detach_gates(clone)
    return clone.eval()


class FilterPruning(Callback):
    """Base class: channel groups and gates of one binarised network inside a LightningModule.

    In ``setup`` (before a checkpoint's weights load, so a resumed run finds the same tree) it
    traces the network once, finds its prunable channel groups and attaches one
    :class:`~lightning_bnnprune.pruning.FilterGate` per group. If the network has no binary layer
    yet and a :class:`Binarize` callback is in the trainer, that callback runs first; with none
    it is an error (pruning full-precision filters is not what this library is for).

    **A new strategy** subclasses this class and overrides only these (each has a default; call
    ``super()`` in the Lightning hooks):

    - :meth:`configure_gates`: once, when the groups and gates exist, before the optimizer is
      built: plan the counts (:meth:`plan_counts`), freeze gates that a rule sets
      (:meth:`freeze_gates`);
    - Lightning's training hooks (``on_train_batch_start``, ``on_train_epoch_start``...): close
      gates when the strategy decides, ``self.gates[name].set_mask(keep)``; a schedule with
      lengths fits the trainer through :meth:`fit_schedule`;
    - :meth:`final_masks`: at fit end, before the removal, the keep masks still to set;
    - :meth:`distilling`: whether ``distill`` applies to this step;
    - :meth:`pruning_settings`: the strategy's arguments that decide what is pruned (extend
      ``super()``'s), which a resumed fit may not change;
    - ``state_dict`` / ``load_state_dict``: what the strategy needs to resume (extend ``super()``'s).

    Every strategy's constructor reads alike: the target first (the one positional argument),
    then keyword-only arguments in one order for the concepts they share (the selection, the
    allocation, the schedule ``unit``, ``warmup``, ``retrain``, ``scale_to_fit``, then this
    class's), passed on to this class by keyword.

    Args:
        target_pfr: pruned filters / prunable filters the strategy aims at, in ``[0, 1)``; None for
            a strategy whose PFR is an outcome, not a target (``ZeroFilterPruning``). ``setup``
            warns when groups that cannot be pruned cap it.
        network: attribute path of the network inside the LightningModule (default: the single
            timm model found, else the whole module).
        input_size: ``(C, H, W)`` of one input, for tracing, the removal check and the report's
            MACs; default: ``pl_module.example_input_array``, else the first training batch's
            shape, else the network's timm ``pretrained_cfg["input_size"]``
            (:func:`~lightning_bnnprune.introspect.input_size_of`).
        exclude: names of binary convs whose channel groups must not be pruned.
        min_filters: the fewest channels any group keeps (never prune a layer to zero).
        target_speedup: instead of ``target_pfr`` (exactly one of them, for the strategies with a
            target): the network's speedup in Larq Compute Engine, ``> 1``, met on a per-layer
            latency table (``latency_table``) by a latency-budgeted allocation
            (:func:`~lightning_bnnprune.pruning.allocation.allocate_latency`). With the table
            measured here, every plan is also exported and timed against the whole network;
            off by more than 2 %, it is re-planned with the estimate's bias corrected (up to 3
            files; ``summary["measured_lce_speedup"]``).
        latency_table: ``target_speedup`` only: a
            :class:`~lightning_bnnprune.pruning.latency_table.LatencyTable` (or the path of one
            saved as JSON); None: measured on this machine in ``setup`` (a few seconds, cached under
            ``~/.cache/lightning_bnnprune``; needs LCE, see :mod:`~lightning_bnnprune.pruning.lce_runtime`).
        round_to: every group keeps a multiple of this many filters, or all of them, the global
            PFR staying within 1 point of the target
            (:func:`~lightning_bnnprune.pruning.allocation.round_counts`); 1: no rounding. Or an
            engine's name (:data:`~lightning_bnnprune.pruning.allocation.ENGINES`): ``"lce"``
            keeps multiples of Larq Compute Engine's 32-bit word where a group is wider than one
            and multiples of 8 elsewhere (``setup`` says which groups in one line); ``"onednn"``
            keeps multiples of 16, else 8, for PyTorch's CPU convolutions.
        distill: weight of a distillation loss from the network as the fit found it (the warm
            start, frozen, see :mod:`~lightning_bnnprune.pruning.distill`) added to the user's loss
            while the pruned network retrains (:meth:`distilling`); 0 (default) adds nothing and
            runs no teacher. Offered to every strategy so that comparisons stay equal.
        distill_temperature: its temperature ``T``.
        distill_teacher: the teacher of that distillation: ``"binary_start"`` (default), the binary
            network as this fit found it, frozen; or ``"full_precision"``, the full-precision
            network kept by ``Binarize(teacher=...)`` (shared, not copied; that callback saves
            it), the teacher of ReActNet's and Real-to-Binary's recipes.
        remove_at_end: remove the pruned filters physically at the end of ``fit``: the
            LightningModule's network *becomes* the smaller one (in place, on every rank), and
            rank zero writes next to the checkpoints ``pruned.pt`` (weights + record, see
            :func:`~lightning_bnnprune.pruning.record.load_pruned`) and ``pruning_report.{csv,md,png}``
            (never overwriting: ``-v1``, ``-v2``... suffixes). Checkpoints saved afterwards
            (``trainer.save_checkpoint``) carry the record under ``"bnnprune_record"`` and reload
            with :func:`~lightning_bnnprune.pruning.record.restore_pruned`.

    Raises:
        MisconfigurationException: a bad argument (in ``__init__``, naming it and the rule), and
            :class:`~lightning_bnnprune.callbacks.checks.ResumeMismatch` when ``fit`` resumes from
            a checkpoint made with other pruning settings (see below).

    **Resuming** (``trainer.fit(..., ckpt_path=...)``): the checkpoint records
    :meth:`pruning_settings`, the arguments that decide which filters are pruned, how many and
    when; a fit resumed with one of them changed would go on with the checkpoint's pruning while
    saying the new value, so it is refused in one line naming the setting, the checkpoint's value
    and the new one. Free to change on resume, applying from the resumed step on: the trainer's
    length (a schedule keeps the lengths the first sitting fitted, a ``"rest"`` final retrain its
    length), the user's optimizer and learning rate, logging and checkpointing, a strategy's
    retraining learning rates and ``distill`` / ``distill_temperature`` (loss weights like a
    learning rate; but distillation cannot be switched on, since a checkpoint made without it
    holds no teacher), ``scale_to_fit`` (it shapes a fresh schedule only), ``remove_at_end``
    and ``input_size``. ``network`` and ``exclude`` decide the module tree: a change fails when
    Lightning loads the weights. Checkpoints written before 0.2.0 record no settings and
    resume as they did.

    If ``fit`` ends in an exception (Ctrl-C, SIGTERM, an error), nothing is removed or written:
    the module stays the *gated* network, every gate attached and closed as far as the schedule
    got (``pfr()`` says how far), all filters still in place, so it runs and reloads as it was;
    the checkpoints written so far resume the schedule (``trainer.fit(..., ckpt_path=...)``).

    Attributes set at fit end: ``record`` (:class:`~lightning_bnnprune.pruning.record.PruningRecord`),
    ``report`` (:class:`~lightning_bnnprune.pruning.report.CompressionReport`), ``summary``
    (``{"pfr", "mac_ratio", "compression", ...}``), ``pruned_path`` and ``report_paths``.
    """

    @accepts_old_spellings(("target_pfr", "network", "input_size", "exclude", "min_filters", "remove_at_end",
                            "distill", "distill_temperature", "round_to"))
    def __init__(
        self,
        target_pfr: Optional[float] = None,
        *,
        target_speedup: Optional[float] = None,
        latency_table: Union[None, str, LatencyTable] = None,
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
        check(is_number(distill) and distill >= 0, f"`distill` must be a number >= 0, got {distill!r}")
        check(distill_teacher in DISTILL_TEACHERS,
              f"`distill_teacher` must be one of: {', '.join(DISTILL_TEACHERS)}; got {distill_teacher!r}")
        check(is_number(distill_temperature) and distill_temperature > 0,
              f"`distill_temperature` must be a number > 0, got {distill_temperature!r}")
        check(is_int(round_to, 1) or (isinstance(round_to, str) and round_to in ENGINES),
              f"`round_to` must be an int >= 1, got {round_to!r} (or an engine: {', '.join(map(repr, ENGINES))})")
        check(target_pfr is None or target_speedup is None,
              f"give exactly one of `target_pfr` and `target_speedup`, got target_pfr={target_pfr!r} and "
              f"target_speedup={target_speedup!r}")
        check(target_speedup is None or (is_number(target_speedup) and target_speedup > 1),
              f"`target_speedup` must be a number > 1 (the unpruned network's LCE time / the pruned one's), "
              f"got {target_speedup!r}")
        check(latency_table is None or target_speedup is not None,
              "`latency_table` is for target_speedup; with target_pfr it is not used")
        check(latency_table is None or isinstance(latency_table, (str, os.PathLike, LatencyTable)),
              f"`latency_table` must be a LatencyTable or the path of its JSON, got {type(latency_table).__name__}")
        check(is_int(min_filters, 1), f"`min_filters` must be an int >= 1, got {min_filters!r}")
        check(input_size is None or len(input_size) == 3, f"`input_size` must be (C, H, W), got {input_size!r}")
        self.target_pfr = None if target_pfr is None else check_pfr("target_pfr", target_pfr)
        self.target_speedup = None if target_speedup is None else float(target_speedup)
        self.latency_table = latency_table
        self._latency: Optional[LatencyTable] = None  # the table in use (injected, loaded or measured)
        self._sites: List[BinaryConvSite] = []
        self._latency_bias = 1.0  # the estimate's speedup / the file's, of the last plan measured here
        self.network = network
        self.input_size = tuple(input_size) if input_size is not None else None
        self.exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        self.min_filters = min_filters
        self.remove_at_end = remove_at_end
        self.round_to = round_to
        self.analysis: Optional[GroupAnalysis] = None
        self.gates: Dict[str, FilterGate] = {}
        self.network_path: str = ""
        self.record: Optional[PruningRecord] = None
        self.report: Optional[CompressionReport] = None
        self.summary: Dict[str, Any] = {}
        self.pruned_path: Optional[str] = None
        self.report_paths: Dict[str, str] = {}
        self._pruned_in_place = False
        self.distill = float(distill)
        self.distill_temperature = float(distill_temperature)
        self.distill_teacher = distill_teacher
        self.teacher: Optional[FrozenTeacher] = None
        self._teacher_state: Optional[Dict[str, Any]] = None
        self._distill_wrapper: Optional[StepWrapper] = None
        self._seen_input_size: Optional[Sequence[int]] = None

    # ------------------------------------------------------------------ set-up
    def network_of(self, pl_module: "pl.LightningModule") -> nn.Module:
        return pl_module.get_submodule(self.network_path) if self.network_path else pl_module

    def _example_inputs(self, pl_module: "pl.LightningModule", net: nn.Module) -> torch.Tensor:
        return example_batch(net, self._input_shape(pl_module, net))

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
            binarize = self._binarize_of(trainer)
            if binarize is None:
                raise MisconfigurationException(
                    f"{type(self).__name__} prunes binary layers, but the network has none: "
                    "add `Binarize()` to the Trainer's callbacks"
                )
            binarize.setup(trainer, pl_module, stage)
            if not binary_layers(net):
                raise MisconfigurationException(
                    f"{type(self).__name__}: the network has no binary convolution to prune (Binarize keeps the "
                    "first conv and the classifier full precision and binarises only nn.Conv2d layers)"
                )
        unknown = [n for n in self.exclude if n not in binary_layers(net)]
        if unknown:
            raise MisconfigurationException(
                f"`exclude` names unknown binary layers {unknown}; binary layers: {', '.join(binary_layers(net))}"
            )
        self._seen_input_size = input_size_of(net, self.input_size, pl_module, trainer)  # from the data
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
        note = coverage(net, self.analysis).note(self.target_pfr) if self.target_pfr is not None else None
        if note:  # refused groups cap the PFR: say so
            rank_zero_warn(f"[{type(self).__name__}] {note}")
        self._engine_note()
        self.configure_gates(trainer, pl_module)

    def _require_target(self) -> None:
        """For a strategy with a target: exactly one of ``target_pfr`` and ``target_speedup``."""
        check(self.target_pfr is not None or self.target_speedup is not None,
              f"{type(self).__name__} needs exactly one of `target_pfr` and `target_speedup`, got neither")

    def _engine_note(self) -> None:
        """With an engine's ``round_to``: one line naming the groups that cannot keep its quantum."""
        if not isinstance(self.round_to, str):
            return
        sizes = {g.name: g.size for g in self.analysis.groups if g.capacity(self.min_filters) > 0}
        steps, short = engine_steps(sizes, self.round_to, self.min_filters)
        if short:
            first, second = ENGINES[self.round_to]
            rank_zero_info(f"[{type(self).__name__}] round_to={self.round_to!r}: {len(short)} of {len(sizes)} "
                           f"groups cannot keep multiples of {first} (too narrow) and keep multiples of {second}: "
                           f"{', '.join(f'{n} ({sizes[n]})' for n in short)}")

    # ------------------------------------------------------------------ latency budget
    def latency(self, pl_module: "pl.LightningModule") -> LatencyTable:
        """The latency table ``target_speedup`` is met on: ``latency_table`` as given (a path is
        loaded), else measured now on this machine (cached on disk)."""
        net = self.network_of(pl_module)
        if not self._sites:
            self._sites = binary_conv_sites(net, self.analysis, self._example_inputs(pl_module, net))
        if self._latency is None:
            given = self.latency_table
            if isinstance(given, LatencyTable):
                self._latency = given
            elif given is not None:
                import json

                with open(given) as f:
                    self._latency = LatencyTable.from_dict(json.load(f))
            else:
                self._latency = measure_table(_ungated_clone(net), self._sites,
                                              self._example_inputs(pl_module, net), analysis=self.analysis)
                rank_zero_info(f"[{type(self).__name__}] LCE latency table measured: {self._latency.meta}")
        return self._latency

    def latency_counts(self, pl_module: "pl.LightningModule", names: Sequence[str],
                       importance: Optional[Mapping[str, Tensor]] = None, floors: Optional[Mapping[str, int]] = None,
                       fixed: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
        """Filters to close in ``names`` so that the LCE estimate meets ``target_speedup`` with the
        other groups held at ``fixed`` (``{group: kept}``, default whole), the least ``importance``
        lost (default: every channel alike), kept counts in ``round_to``'s steps and multiples of
        :data:`LATENCY_STEP`, at least ``floors`` (default :data:`LATENCY_FLOOR` of each group:
        time is cheapest to buy in the wide early maps, which a budget alone would empty)."""
        table = self.latency(pl_module)
        sizes = {n: self.analysis[n].size for n in names}
        steps, _ = engine_steps(sizes, self.round_to, self.min_filters)
        # at least LCE's x86 output block: measured, the time steps every 4 output channels, and an
        # odd input count costs ~10 % more (the export's odd-count correction)
        steps = {n: math.lcm(steps[n], LATENCY_STEP, self.analysis[n].num_parts) for n in names}
        floors = {n: max(self.min_filters, (floors or {}).get(n, math.ceil(LATENCY_FLOOR * sizes[n])))
                  for n in names}
        importance = importance or {n: torch.ones(sizes[n]) for n in names}
        full = network_ms(table, self._sites, {})

        def plan(speedup: float) -> Dict[str, int]:
            try:
                return allocate_latency(sizes, importance, lambda kept: network_ms(table, self._sites, kept),
                                        full / speedup, steps, floors, fixed)
            except ValueError as err:
                raise MisconfigurationException(f"target_speedup={self.target_speedup}: {err}") from None

        def kept_at(counts: Mapping[str, int]) -> Dict[str, int]:
            return {**dict(fixed or {}), **{n: sizes[n] - c for n, c in counts.items()}}

        counts = plan(self.target_speedup * self._latency_bias)
        estimated = full / network_ms(table, self._sites, kept_at(counts))
        self.summary["estimated_lce_speedup"] = estimated
        trainer = pl_module.trainer
        if self.latency_table is None and trainer.is_global_zero:  # measured here: the exported files judge
            counts = self._measured_plan(pl_module, plan, kept_at, counts, estimated, full, table)
        if trainer.world_size > 1:  # timings differ per rank: every rank cuts rank zero's plan
            budget = {k: v for k, v in self.summary.items() if k.endswith("lce_speedup")}
            counts, budget = trainer.strategy.broadcast((counts, budget), src=0)
            self.summary.update(budget)
        rank_zero_info(f"[{type(self).__name__}] latency budget: estimated LCE speedup "
                       f"{self.summary['estimated_lce_speedup']:.3f}"
                       + (f", measured {self.summary['measured_lce_speedup']:.3f}"
                          if "measured_lce_speedup" in self.summary else "")
                       + f" (target {self.target_speedup}), kept {kept_at(counts)}")
        return counts

    def _measured_plan(self, pl_module: "pl.LightningModule", plan: Callable[[float], Dict[str, int]],
                       kept_at: Callable[[Mapping[str, int]], Dict[str, int]], counts: Dict[str, int],
                       estimated: float, full: float, table: LatencyTable) -> Dict[str, int]:
        """Check a plan on the files themselves: the network cut to it and the whole network,
        exported and timed in one LCE process. Off by more than :data:`LATENCY_TOLERANCE`, the
        estimate's bias (measured / estimated) corrects the next plan's target, up to
        :data:`LATENCY_CHECKS` times or until the corrected plan is the same; the plan measured
        nearest the target is kept. The bias carries over to this fit's later plans (msf's
        stages)."""
        net = _ungated_clone(self.network_of(pl_module))
        x = self._example_inputs(pl_module, net)
        best = None
        with tempfile.TemporaryDirectory() as tmp:
            whole = os.path.join(tmp, "whole.tflite")  # exported by the first check, read by the others
            for _ in range(LATENCY_CHECKS):
                measured = measured_speedup(net, self.analysis, kept_at(counts), x, whole_file=whole)
                rank_zero_info(f"[{type(self).__name__}] latency budget checked on the exported file: estimated "
                               f"{estimated:.3f}, measured {measured:.3f} (target {self.target_speedup})")
                if best is None or abs(measured / self.target_speedup - 1) < abs(best[1] / self.target_speedup - 1):
                    best = (counts, measured, estimated)
                if abs(measured / self.target_speedup - 1) <= LATENCY_TOLERANCE:
                    break
                self._latency_bias = estimated / measured  # the estimate's speedup to plan for, per unit of target
                replanned = plan(self.target_speedup * self._latency_bias)
                if replanned == counts:  # the allocation's steps are coarser than the correction
                    break
                counts = replanned
                estimated = full / network_ms(table, self._sites, kept_at(counts))
        counts, measured, estimated = best
        self.summary.update(estimated_lce_speedup=estimated, measured_lce_speedup=measured)
        return counts

    # ------------------------------------------------------------------ override points
    def configure_gates(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Override point, called once at the end of ``setup``: ``self.analysis`` and
        ``self.gates`` exist, the optimizer does not yet (so freezing a gate here keeps it out of
        every gradient). Default: nothing (the gates stay open and trainable)."""

    def freeze_gates(self) -> None:
        """Gates that a rule sets, never the optimizer: their logits get ``requires_grad=False``
        (they still sit in the user's optimizer, which skips parameters without a gradient)."""
        for gate in self.gates.values():
            gate.logits.requires_grad_(False)

    def plan_counts(self, pl_module: "pl.LightningModule", names: Sequence[str], allocation: str = "uniform",
                    total_filters: Optional[int] = None,
                    scores: Optional[Dict[str, Tensor]] = None) -> Dict[str, int]:
        """Filters to close in each of the groups ``names`` so that ``target_pfr`` is met: the
        allocation every strategy shares (:func:`~lightning_bnnprune.pruning.allocation.allocate`),
        with ``min_filters``, ``round_to`` and grouped convs' cells; ``"macs"`` is measured at this
        fit's input size, ``"global"`` ranks ``scores``. With ``target_speedup`` the counts are
        the latency budget's instead (:meth:`latency_counts`, ``scores`` as the importance). The
        PFR's denominator is ``total_filters``
        (default: the filters of ``names``).

        Raises:
            MisconfigurationException: a target the floors cannot reach (the message gives the
                largest reachable PFR).
        """
        if self.target_speedup is not None:
            return self.latency_counts(pl_module, names, scores)
        groups = {name: self.analysis[name] for name in names}
        macs = None
        if allocation == "macs":
            net = self.network_of(pl_module)
            macs = macs_per_channel(net, self.analysis, self._example_inputs(pl_module, net))
        try:
            return allocate({n: g.size for n, g in groups.items()}, self.target_pfr, allocation, self.min_filters,
                            total_filters=total_filters, macs_per_channel=macs, round_to=self.round_to,
                            quanta={n: g.num_parts for n, g in groups.items()}, scores=scores, groups=groups)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None

    def fit_schedule(self, trainer: "pl.Trainer", unit: str, lengths: Dict[str, int], repeats: Dict[str, int], *,
                     scale_to_fit: bool, origin: int = 0, extra: int = 0) -> Dict[str, int]:
        """The schedule rule every strategy shares (call it in ``on_fit_start`` or later): the
        lengths that fit the trainer's ``max_steps`` / ``max_epochs`` from ``origin`` on, scaled
        when ``scale_to_fit``, else a one-line error naming what would fit
        (:func:`~lightning_bnnprune.pruning.schedule.fit_lengths`).

        Raises:
            MisconfigurationException: the schedule does not fit (see above).
        """
        available, knob, per_epoch = trainer_budget(trainer, unit, origin)
        start = self._binary_weights_start(trainer, unit, per_epoch) - origin
        if lengths.get("warmup", start) < start:
            rank_zero_info(f"[{type(self).__name__}] pruning starts once the weights are binary "
                           f"(Binarize's two steps): warmup {lengths['warmup']} -> {start} {unit}")
            lengths = {**lengths, "warmup": start}
        try:
            fitted = fit_lengths(type(self).__name__, lengths, repeats, available, unit, knob=knob,
                                 per_epoch=per_epoch, scale_to_fit=scale_to_fit, extra=extra, origin=origin)
        except ScheduleTooLong as err:
            raise ScheduleMisconfiguration(err) from None
        if fitted != lengths:
            rank_zero_info(f"[{type(self).__name__}] schedule scaled to fit {int(available)} {unit}: {fitted}")
        check(fitted.get("warmup", start) >= start,
              f"{type(self).__name__}: scaled to fit the trainer, pruning would start at {unit} "
              f"{fitted.get('warmup')}, before the weights turn binary at {start} (Binarize's "
              "binary_weights_from); lengthen the trainer or binarise the weights earlier")
        return fitted

    @staticmethod
    def _binarize_of(trainer: "pl.Trainer") -> Optional[Binarize]:
        """The trainer's (first) ``Binarize`` callback, if any."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, Binarize)), None)

    def _binary_weights_start(self, trainer: "pl.Trainer", unit: str, per_epoch: float) -> int:
        """When ``Binarize``'s two-step binarisation makes the weights binary, in ``unit``
        (0 without it): no strategy prunes a network whose weights are still real."""
        binarize = self._binarize_of(trainer)
        if binarize is None or binarize.binary_weights_from is None:
            return 0
        if unit == binarize.binary_weights_unit:
            return binarize.binary_weights_from
        steps = binarize.binary_weights_step(trainer)
        return steps if unit == "steps" else math.ceil(steps / max(per_epoch, 1))

    def final_masks(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[Dict[str, Tensor]]:
        """Override point, called at fit end before the removal (also with ``remove_at_end=False``):
        ``{group: 0/1 keep vector}`` to set on the gates, or None to remove what the gates say now.
        Default: None."""
        return None

    # ------------------------------------------------------------------ figures
    def pfr(self) -> float:
        """Pruned filters / prunable filters under the current gates (after removal: as removed)."""
        if self.record is not None:
            return self.record.pfr
        total = sum(g.logits.numel() for g in self.gates.values())
        closed = sum(g.logits.numel() - g.num_open for g in self.gates.values())
        return closed / max(total, 1)

    def kept_filters(self) -> Dict[str, int]:
        if self.record is not None:
            return {name: len(kept) for name, kept in self.record.groups.items()}
        return {name: gate.num_open for name, gate in self.gates.items()}

    # ------------------------------------------------------------------ distillation
    def distilling(self) -> bool:
        """Whether this step retrains a pruned network (then ``distill`` applies): once a gate
        is closed. Subclasses with phases of their own say more precisely."""
        return any(g.num_open < g.logits.numel() for g in self.gates.values())

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.distill <= 0 or self.analysis is None:
            return
        net = self.network_of(pl_module)
        if self.distill_teacher == FULL_PRECISION:
            binarize = self._binarize_of(trainer)
            self.teacher = binarize.full_precision_teacher if binarize is not None else None
            check(self.teacher is not None, f"{type(self).__name__}: distill_teacher='full_precision' distils "
                                            "from Binarize's teacher; add Binarize(teacher='full_precision') "
                                            "(or a module or weights file) to the trainer")
        else:
            # After a checkpoint's weights are restored: a resumed fit takes its teacher from the
            # checkpoint (the first sitting's start), not from the network it resumes.
            self.teacher = FrozenTeacher(net)
            if self._teacher_state is not None:
                self.teacher.load_state_dict(self._teacher_state)
                self._teacher_state = None
            self.teacher.to(pl_module.device)
        self._install_distill(pl_module, net)

    def _install_distill(self, pl_module: "pl.LightningModule", net: nn.Module) -> None:
        """Add the distillation loss to the user's ``training_step`` while :meth:`distilling`."""

        def add_distillation(loss: Tensor, captured: Optional[Captured]) -> Tensor:
            s_args, s_kwargs, student = student_output(captured, type(self).__name__, self.network_path, "distill")
            kd = distillation_loss(student, self.teacher(*s_args, **s_kwargs), self.distill_temperature)
            pl_module.log("prune/distill", kd.detach(), on_step=True, on_epoch=False)
            return loss + self.distill * kd

        self._distill_wrapper = StepWrapper(pl_module, net, self.distilling, add_distillation)

    def _uninstall_distill(self) -> None:
        if self._distill_wrapper is not None:
            self._distill_wrapper.remove()
            self._distill_wrapper = None

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._uninstall_distill()

    # ------------------------------------------------------------------ resume
    def pruning_settings(self) -> Dict[str, Any]:
        """Override point: the arguments that decide what is pruned (which filters, how many,
        when), as plain values, extending ``super()``'s. ``state_dict`` records them and a fit
        resumed from the checkpoint must have the same (see "Resuming" in the class docstring)."""
        return {"target_pfr": self.target_pfr, "target_speedup": self.target_speedup, "min_filters": self.min_filters,
                "round_to": self.round_to, "distill_teacher": self.distill_teacher}

    @override
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"settings": self.pruning_settings()}
        if self.teacher is not None and self.distill_teacher == BINARY_START:  # Binarize keeps the other
            state["distill_teacher"] = self.teacher.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        recorded = state_dict.get("settings")
        if recorded is not None:  # None: a checkpoint from before 0.2.0, which resumes as it did
            self._check_resume(recorded, has_teacher=state_dict.get("distill_teacher") is not None)
        self._teacher_state = state_dict.get("distill_teacher")

    def _check_resume(self, recorded: Dict[str, Any], has_teacher: bool) -> None:
        """Refuse a resume whose pruning settings differ from the checkpoint's (the first one)."""
        owner = type(self).__name__
        now = self.pruning_settings()
        for key, old in recorded.items():
            if key in now and now[key] != old:
                raise ResumeMismatch(owner, key, old, now[key])
        if self.distill > 0 and self.distill_teacher == BINARY_START and not has_teacher:
            raise ResumeMismatch(owner, "distill", 0.0, self.distill,
                                 "so it holds no distillation teacher (the network as the first fit found it)")

    # ------------------------------------------------------------------ removal
    def _input_shape(self, pl_module: "pl.LightningModule", net: nn.Module) -> Sequence[int]:
        """The input size the network sees in this fit (found once, in ``setup``)."""
        if self._seen_input_size is None:
            self._seen_input_size = input_size_of(net, self.input_size, pl_module)
        return self._seen_input_size

    @staticmethod
    def _output_dir(trainer: "pl.Trainer") -> str:
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None) if checkpoint is not None else None
        # trainer.log_dir broadcasts: every rank must ask, which is why this runs on all of them.
        return os.fspath(dirpath or trainer.log_dir or trainer.default_root_dir)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._uninstall_distill()
        if self.analysis is None or self.record is not None:
            return
        for name, keep in (self.final_masks(trainer, pl_module) or {}).items():
            self.gates[name].set_mask(keep)
        if not self.remove_at_end:
            return
        net = self.network_of(pl_module)
        keep = resolve_keep(net, self.analysis, min_filters=self.min_filters)
        spawned = isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)
        if spawned:
            # A spawn/fork launcher loads rank zero's final state dict back into the main process's
            # module, which was never binarised nor cut: a pruned state dict would fail there on
            # sizes. So the workers' modules stay as they are and the removal works on a copy;
            # the pruned model is the file written below.
            net = copy.deepcopy(net)
            detach_gates(net)
        # Every rank cuts its own network (same gates under DDP, so the same module everywhere);
        # the seeded check batch is the same on every rank too.
        self.record = remove_filters(
            net, self.analysis, masks=keep,
            example_inputs=check_batch(net, self._input_shape(pl_module, net)),
            min_filters=self.min_filters, network_path=self.network_path,
        )
        self._pruned_in_place = not spawned
        self.report = compression_report(net, self.record)
        budget = {k: self.summary[k] for k in ("estimated_lce_speedup", "measured_lce_speedup") if k in self.summary}
        self.summary = dict(self.report.summary, **budget)
        directory = self._output_dir(trainer)
        if not trainer.is_global_zero:
            return
        os.makedirs(directory, exist_ok=True)
        stems = free_stems(directory, {"pruned": (".pt",), "pruning_report": (".csv", ".md", ".png")})
        self.pruned_path = save_pruned(net, self.record, stems["pruned"] + ".pt")
        self.report_paths = self.report.save(stems["pruning_report"])
        rank_zero_info(f"[{type(self).__name__}] removed the pruned filters (max |logit diff| "
                       f"{self.record.max_abs_diff:.2g}):\n{self.report}\n"
                       f"pruned model: {self.pruned_path}; report: {self.report_paths['md']}")
        if spawned:
            rank_zero_warn(
                f"[{type(self).__name__}] with a spawn/fork launcher the main process's module cannot be "
                f"replaced by the pruned one: load it with lightning_bnnprune.load_pruned({self.pruned_path!r})"
            )

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: Dict[str, Any]) -> None:
        # After the removal the module tree is the pruned one: the record rebuilds it on load.
        if self.record is None or not self._pruned_in_place:
            return
        checkpoint[CHECKPOINT_KEY] = self.record.to_dict()
        current = {id(p) for p in pl_module.parameters()}
        stale = any(id(p) not in current for opt in trainer.optimizers for g in opt.param_groups for p in g["params"])
        if stale:  # the fit's optimizer still holds the uncut tensors: its state fits no pruned module
            checkpoint.pop("optimizer_states", None)
            checkpoint.pop("lr_schedulers", None)
