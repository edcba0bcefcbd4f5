"""``MainSubsidiaryPruning``: Xu et al.'s learned filter selector, in stages of layers, inside one ``fit``.

Xu, Dong, Li, Su, "Main/Subsidiary Network: Learning to Prune Filters in Binary Neural Networks"
(CVPR 2019). See ``docs/method.md`` (the selector, section 2) and the class docstring for the
choices this implementation makes where the paper or its code is silent. The callback does the
callback's job (arguments, phases, what trains when); the maths lives in the pruning core: the
schedule (:mod:`~lightning_bnnprune.pruning.schedule`), the counts
(:mod:`~lightning_bnnprune.pruning.allocation`), the selector's loss
(:mod:`~lightning_bnnprune.pruning.selector`) and the distillation
(:mod:`~lightning_bnnprune.pruning.distill`); the wrapper of the user's ``training_step``
(:mod:`.wrapping`) and the per-step learning rates (:mod:`.phase_rates`) are shared pieces.
Besides the arguments (each checked in ``__init__`` and documented, the Lightning way), the class
is one state machine (enter / leave a phase, resume into one) that reads best in one place.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from ..pruning import criteria
from ..pruning.allocation import ALLOCATIONS, round_counts
from ..pruning.criteria import Criterion, scores_for
from ..pruning.schedule import (DONE, FINAL, LEAST, RETRAIN, SELECTOR, WARMUP, Phase, StagewiseSchedule,
                                check_lengths, trainer_budget)
from ..pruning.selector import BudgetUnit, SelectorLoss, keep_top_across, rank_logits
from ..pruning.slicing import OUT
from .base import BINARY_START, FilterPruning
from .checks import check, checked, is_int, is_number, spelled
from .deprecation import accepts_old_spellings, gate_init_rename
from .phase_params import PhaseParameters
from .phase_rates import PhaseRates
from .wrapping import Captured, InstancePatch, StepWrapper, student_output

__all__ = ["MainSubsidiaryPruning", "MSF_ALLOCATIONS", "REST"]

_DEFAULT_RETRAIN_LR = 1e-4
#: The fixed shares of :func:`~lightning_bnnprune.pruning.allocation.allocate`, plus counts learned
#: over each stage's groups together.
MSF_ALLOCATIONS = ALLOCATIONS + ("learned",)
#: ``final_retrain="rest"``: the final retrain takes what is left of the trainer's length.
REST = "rest"
#: ``layer_floor=None`` with learned counts: every group keeps at least this share (the value
#: measured best, ``benchmarks/results/cifar10_cpu_v2.md``).
_DEFAULT_LAYER_FLOOR = 0.25


class MainSubsidiaryPruning(FilterPruning):
    r"""Learn which filters of a binary network to prune: Xu et al.'s selector, with this project's
    measured defaults (one stage of all layers, gates started from the L1 ranking, learned
    per-layer counts, a final retrain on a restarted cosine). Xu et al.'s own layer-by-layer
    method: ``layers_per_stage=1, allocation="uniform", gate_init_criterion=None, final_retrain=0``.

    Every prunable channel group (see :func:`~lightning_bnnprune.pruning.find_channel_groups`;
    a residual add or a depthwise conv ties channels into one group) gets one subsidiary gate per
    filter, :math:`g_k = (\mathrm{sign}(m_k) + 1)/2` with a clipped straight-through gradient.
    Inside the user's own ``trainer.fit`` the callback then runs a
    :class:`~lightning_bnnprune.pruning.StagewiseSchedule`:

    1. *warm-up* (optional): the main binary network trains as the user wrote it, gates open;
    2. for each stage (``layers_per_stage`` groups, from the input side; by default one stage of all):

       - *selector*: only the stage's gate logits train, with Adam (``gate_lr``) in an optimizer
         of the callback's own; every main weight is frozen (bit-identical) and the user's
         optimizer state is left untouched. The loss is Xu et al.'s selector loss (``docs/method.md``, 2.2)

         .. math:: L = L_{user} + \lambda_{kd}\, T^2\, \mathrm{KL}(\sigma(t/T) \| \sigma(s/T)) + B,

         (:math:`\lambda_{kd}`: ``selector_distill``, :math:`T`: ``selector_distill_temperature``)

         with the teacher ``t`` the same network with the stage's gates all open (one extra
         forward without gradient; no copy of the module, one backward per step) and ``B`` the
         budget term of :func:`~lightning_bnnprune.pruning.selector.budget_term`, which drives the
         layer to its share of ``target_pfr``. At the end of the phase the share is enforced
         exactly: the filters with the highest logits stay open.
       - *retrain*: the main network trains with the gates fixed, at ``retrain_lr`` (or
         ``retrain_lr_factor`` times the user's learning rate), set on the user's optimizer for
         each step and put back after it, so the user's schedulers never see it.
    3. *final* (``final_retrain``; by default the rest of the trainer's length): the whole network
       retrains with every gate fixed, its learning rate on a cosine restarted from the user's
       initial one (this project's addition; the greedy rules retrain for their whole run after
       one cut);
    4. *done*: after the schedule the user's training goes on with the gates fixed.

    The user's LightningModule is not changed: its ``training_step`` (returning a loss or a dict
    with ``"loss"``) is wrapped for the fit, and the network's output, the student, is read by a
    forward hook. The learning-rate schedulers of the user keep running through every phase.

    Where the paper and its code are silent, the choices (the budget that replaces the L0
    penalty, the gates' start, learned counts, frozen weights, DDP) are set out in
    ``docs/method.md``, sections 2.3 and 2.4. The final PFR is the target, up to rounding.
    Learned counts (``allocation="learned"``) are learned across the groups of a stage only (the
    default: one stage of all groups).

    *Defaults, as measured*: each default is the configuration measured best against the paper's
    schedule and one-shot greedy L1 at equal PFR; the figures, and what the defaults cost in MACs,
    are in ``benchmarks/results/cifar10_cpu_v2.md`` (binary ResNet-20, CIFAR-10).

    Progress: ``msf/stage``, ``msf/phase`` (0 warm-up, 1 selector, 2 retrain, 4 final, 3 done:
    :data:`~lightning_bnnprune.pruning.schedule.PHASE_CODES`),
    ``msf/kd``, ``msf/budget``, ``msf/pfr`` and ``msf/kept/<group>`` go to the logger; the
    progress bar shows ``msf=selector 3``.

    A :class:`~lightning_bnnprune.Binarize` callback must be in the trainer if the network is not
    binary yet: it is then run first; without it the network has nothing to prune and it is an
    error. Manual optimisation is not supported (the loss terms need Lightning's backward).

    Args:
        target_pfr: global pruned filters / prunable filters, in ``[0, 1)``.
        target_speedup, latency_table: instead of ``target_pfr``, a speedup in Larq Compute
            Engine (see :class:`FilterPruning`; ``allocation="learned"`` only). The stages' filter
            budgets start from the latency plan with every channel alike; at the end of each
            selector phase the learned counts are re-allocated under the latency budget, the
            gates' keep probabilities as the importance (:meth:`FilterPruning.latency_counts`).
        layers: names of the groups to prune (the owner conv, or any binary conv producing the
            group's channels), default all; ``target_pfr`` is then the PFR of these groups, the
            others stay whole.
        allocation: how ``target_pfr`` is shared out over layers: ``"uniform"``, ``"size"`` or
            ``"macs"`` (see :func:`~lightning_bnnprune.pruning.allocation.allocate`), or
            ``"learned"`` (see above; the default).
        layer_floor: ``allocation="learned"`` only: the share of each group's filters it keeps
            at least (on top of ``min_filters``); ``None``: 0.25 with learned counts.
        unit: ``"steps"`` (optimizer steps) or ``"epochs"``.
        warmup: length of the warm-up of the main network, in ``unit`` (0: none).
        selector: length of each selector phase, in ``unit``.
        retrain: length of each retrain phase, in ``unit``.
        layers_per_stage: groups whose selectors train together in one stage (``None``: all of
            them, one stage; the paper: 1).
        final_retrain: length of the final retrain after the last stage, in ``unit`` (0: none), or
            ``"rest"`` (the default): what is left of the trainer's ``max_steps`` / ``max_epochs``
            after the stages.
        scale_to_fit: scale the phases down when the trainer's ``max_steps`` / ``max_epochs``
            cannot hold the schedule (else that is an error).
        gate_init_criterion: start each selector from this criterion's ranking (a name from
            :func:`~lightning_bnnprune.pruning.criteria.available`, e.g. ``"l1"``, or a callable);
            ``None``: all gates open (the paper). Default ``"l1"``.
        gate_lr: Adam learning rate of the gates in a selector phase (0: the gates do not learn).
        gate_init_logit: ``gate_init_criterion=None`` only: the logit every gate of a stage starts
            at, in ``[0, 1]`` (``None``: ``gate_lr`` times a quarter of the selector phase's steps,
            at most 0.5).
        gate_init_spread: with ``gate_init_criterion``: the spread of the ranked starting logits
            (:func:`~lightning_bnnprune.pruning.selector.rank_logits`), in ``(0, 1]`` (``None``: the
            default logit above, at least 0.01).
        selector_distill: weight of the selector's distillation loss, from the same network with
            the stage's gates open (0: none, and no teacher forward); ``lambda_kd`` before 0.2.0.
        selector_distill_temperature: its temperature ``T``; ``temperature`` before 0.2.0.
        budget_strength: the adaptive budget's push on each open gate's logit, in units of the
            spread of the loss gradients over the layer's gates (``beta``).
        lambda_budget: a fixed budget weight ``lambda`` instead of the adaptive one.
        retrain_lr: learning rate of a retrain phase (default ``1e-4``).
        retrain_lr_factor: instead of ``retrain_lr``, this factor times the user's learning rate.
        network, input_size, exclude, min_filters, round_to, distill, distill_temperature,
            distill_teacher, remove_at_end:
            see :class:`~lightning_bnnprune.callbacks.base.FilterPruning` (``distill`` applies in
            the retrain, final and done phases, from the warm start or the full-precision
            network; the selector distils with ``selector_distill``).

    Raises:
        MisconfigurationException: ``target_pfr`` outside ``[0, 1)``, a phase of length 0, an
            unknown ``unit`` or ``allocation``, a negative weight or learning rate, both
            ``retrain_lr`` and ``retrain_lr_factor``, a network with no prunable layer, unknown
            names in ``layers`` / ``exclude``, a target the ``min_filters`` floors cannot reach,
            no ``Binarize`` for a full-precision network, manual optimisation, a trainer too
            short for the schedule, or a resume with changed pruning settings
            (:class:`~lightning_bnnprune.callbacks.checks.ResumeMismatch`, see :class:`FilterPruning`).

    Example::

        from lightning import Trainer
        from lightning_bnnprune import Binarize, MainSubsidiaryPruning

        trainer = Trainer(
            max_steps=12_000,
            callbacks=[Binarize(), MainSubsidiaryPruning(0.4, selector=200, retrain=600)],
        )
        trainer.fit(my_lightning_module, datamodule)
    """

    @accepts_old_spellings(
        ("target_pfr", "selector", "retrain", "warmup", "unit", "layers_per_stage", "layers", "allocation", "gate_lr",
         "gate_init", "retrain_lr", "retrain_lr_factor", "lambda_kd", "temperature", "budget_strength", "lambda_budget",
         "scale_to_fit", "final_retrain", "gate_init_criterion", "layer_floor", "network", "input_size", "exclude",
         "min_filters", "remove_at_end", "distill", "distill_temperature", "round_to"),
        renamed={"lambda_kd": "selector_distill", "temperature": "selector_distill_temperature",
                 "gate_init": gate_init_rename},
    )
    def __init__(
        self,
        target_pfr: Optional[float] = None,
        *,
        target_speedup: Optional[float] = None,
        latency_table: Any = None,
        layers: Optional[Sequence[str]] = None,
        allocation: str = "learned",
        layer_floor: Optional[float] = None,
        unit: str = "steps",
        warmup: int = 0,
        selector: int = 200,
        retrain: int = 400,
        layers_per_stage: Optional[int] = None,
        final_retrain: Union[int, str] = REST,
        scale_to_fit: bool = False,
        gate_init_criterion: Optional[Union[str, Criterion]] = "l1",
        gate_lr: float = 1e-3,
        gate_init_logit: Optional[float] = None,
        gate_init_spread: Optional[float] = None,
        selector_distill: float = 1.0,
        selector_distill_temperature: float = 4.0,
        budget_strength: float = 1.0,
        lambda_budget: Optional[float] = None,
        retrain_lr: Optional[float] = None,
        retrain_lr_factor: Optional[float] = None,
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
        super().__init__(target_pfr, target_speedup=target_speedup, latency_table=latency_table, network=network,
                         input_size=input_size, exclude=exclude, min_filters=min_filters, round_to=round_to,
                         distill=distill, distill_temperature=distill_temperature, distill_teacher=distill_teacher,
                         remove_at_end=remove_at_end)
        self._require_target()
        check(target_speedup is None or allocation == "learned",
              f"`target_speedup` re-allocates the learned counts under the latency budget: it needs "
              f"allocation='learned', got {allocation!r}")
        check(allocation in MSF_ALLOCATIONS, f"`allocation` must be one of {MSF_ALLOCATIONS}, got {allocation!r}")
        check(layer_floor is None or (is_number(layer_floor) and 0 <= layer_floor < 1),
              f"`layer_floor` must be None or in [0, 1), got {layer_floor!r}")
        check(not layer_floor or allocation == "learned",
              f"`layer_floor` is for allocation='learned' (got allocation={allocation!r}); use min_filters otherwise")
        checked(check_lengths, unit, {WARMUP: warmup, SELECTOR: selector, RETRAIN: retrain})
        check(final_retrain == REST or is_int(final_retrain, LEAST[FINAL]),  # the schedule's rule, or "rest"
              f"`final_retrain` must be an int >= {LEAST[FINAL]} ({unit}) or {REST!r}, got {final_retrain!r}")
        check(layers_per_stage is None or is_int(layers_per_stage, 1),
              f"`layers_per_stage` must be None (all groups in one stage) or an int >= 1, got {layers_per_stage!r}")
        self.gate_init_criterion = None if gate_init_criterion is None else checked(
            criteria.get, gate_init_criterion, prefix="`gate_init_criterion`: ")
        check(is_number(gate_lr) and gate_lr >= 0, f"`gate_lr` must be a number >= 0, got {gate_lr!r}")
        check(gate_init_logit is None or (is_number(gate_init_logit) and 0 <= gate_init_logit <= 1),
              f"`gate_init_logit` must be None or in [0, 1], got {gate_init_logit!r}")
        check(gate_init_logit is None or gate_init_criterion is None,
              f"`gate_init_logit` is the start of gates opened alike (gate_init_criterion=None); with "
              f"gate_init_criterion={gate_init_criterion!r} set `gate_init_spread`")
        check(gate_init_spread is None or (is_number(gate_init_spread) and 0 < gate_init_spread <= 1),
              f"`gate_init_spread` must be None or in (0, 1], got {gate_init_spread!r}")
        check(gate_init_spread is None or gate_init_criterion is not None,
              "`gate_init_spread` spreads a criterion's ranking: set gate_init_criterion (e.g. 'l1'), or use "
              "`gate_init_logit` for gates opened alike")
        check(is_number(selector_distill) and selector_distill >= 0,
              f"`selector_distill` must be a number >= 0, got {selector_distill!r}")
        check(is_number(selector_distill_temperature) and selector_distill_temperature > 0,
              f"`selector_distill_temperature` must be a number > 0, got {selector_distill_temperature!r}")
        check(is_number(budget_strength) and budget_strength > 0,
              f"`budget_strength` must be a number > 0, got {budget_strength!r}")
        check(lambda_budget is None or (is_number(lambda_budget) and lambda_budget >= 0),
              f"`lambda_budget` must be None (adaptive) or a number >= 0, got {lambda_budget!r}")
        for label, value in (("retrain_lr", retrain_lr), ("retrain_lr_factor", retrain_lr_factor)):
            check(value is None or (is_number(value) and value > 0), f"`{label}` must be None or > 0, got {value!r}")
        check(retrain_lr is None or retrain_lr_factor is None,
              f"pass `retrain_lr` or `retrain_lr_factor`, not both (got {retrain_lr!r} and {retrain_lr_factor!r})")
        if layers is not None:
            layers = [layers] if isinstance(layers, str) else list(layers)
            check(bool(layers), "`layers` must name at least one group, or be None for all")
        self.layers = layers
        self.allocation = allocation
        self.selector, self.retrain, self.warmup, self.unit = selector, retrain, warmup, unit
        self.layers_per_stage = layers_per_stage
        self.final_retrain = final_retrain
        self.scale_to_fit = scale_to_fit
        self.gate_init_criterion_name = spelled(gate_init_criterion)
        self.gate_lr = float(gate_lr)
        self.gate_init_logit = gate_init_logit
        self.gate_init_spread = gate_init_spread
        self.selector_distill = float(selector_distill)
        self.selector_distill_temperature = float(selector_distill_temperature)
        self.budget_strength = float(budget_strength)
        self.lambda_budget = lambda_budget
        self.retrain_lr = retrain_lr
        self.retrain_lr_factor = retrain_lr_factor
        if layer_floor is None:
            layer_floor = _DEFAULT_LAYER_FLOOR if allocation == "learned" else 0.0
        self.layer_floor = float(layer_floor)

        self.schedule: Optional[StagewiseSchedule] = None
        self.prune_counts: Dict[str, int] = {}
        # state that survives a resume (see state_dict)
        self._phase: Optional[Phase] = None
        self._loaded: Dict[str, Any] = {}
        # run-time state, rebuilt in on_fit_start
        self._gate_optimizer: Optional[torch.optim.Optimizer] = None
        self._params: Optional[PhaseParameters] = None  # what trains in the phase (on_train_start)
        self._wrapper: Optional[StepWrapper] = None
        self._bar_patch: Optional[InstancePatch] = None
        self._rates: Optional[PhaseRates] = None
        self._origin = 0
        self._loss = SelectorLoss(self.selector_distill, self.selector_distill_temperature, self.budget_strength,
                                  lambda_budget)
        self._stage_prune: Dict[int, int] = {}  # learned counts: filters each stage closes (resumed)
        self._goal = 0

    # ------------------------------------------------------------------ set-up
    @override
    def configure_gates(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.schedule is not None:
            return
        names = self._resolve_layers()
        sizes = {name: self.analysis[name].size for name in names}
        learned = self.allocation == "learned"
        # learned: the uniform counts (or the latency plan) are the plan the stages' budgets start from
        if self.target_speedup is not None:
            self.prune_counts = self.latency_counts(pl_module, names, floors={n: self._floor(n) for n in names})
        else:
            self.prune_counts = self.plan_counts(pl_module, names, "uniform" if learned else self.allocation)
        self._goal = sum(self.prune_counts.values())  # round(target_pfr * filters of the pruned groups)
        if learned:
            room = sum(n - self._floor(name) for name, n in sizes.items())
            check(sum(self.prune_counts.values()) <= room,
                  f"target_pfr={self.target_pfr} needs {sum(self.prune_counts.values())} filters pruned, but "
                  f"layer_floor={self.layer_floor} and min_filters={self.min_filters} allow at most {room}")
        per_stage = self.layers_per_stage or len(names)
        final = 0 if self.final_retrain == REST else self.final_retrain  # the rest is known at train start
        self.schedule = StagewiseSchedule.from_groups(names, self.selector, self.retrain, self.warmup, per_stage,
                                                      self.unit, final)

    def _rounded(self, counts: Dict[str, int]) -> Dict[str, int]:
        """Learned counts moved to keep multiples of ``round_to`` (or whole groups), the stage's
        total within :data:`~lightning_bnnprune.pruning.allocation.ROUND_TOLERANCE` of PFR; the
        multiple wins over ``layer_floor``."""
        sizes = {name: self.analysis[name].size for name in counts}
        quanta = {name: self.analysis[name].num_parts for name in counts}
        try:
            return round_counts(sizes, counts, self.round_to, self.min_filters, total_filters=sum(sizes.values()),
                                quanta=quanta)
        except ValueError as err:
            raise MisconfigurationException(f"[{type(self).__name__}] learned counts with round_to: {err}") from None

    def _target_text(self) -> str:
        return f"PFR {self.target_pfr:.4f}" if self.target_pfr is not None else f"LCE speedup {self.target_speedup}"

    def _floor(self, name: str) -> int:
        """The fewest filters group ``name`` keeps under learned counts."""
        n = self.analysis[name].size
        return min(n, max(self.min_filters, math.ceil(self.layer_floor * n)))

    def _resolve_layers(self) -> List[str]:
        """The groups to prune, in forward order; a producer's name stands for its group."""
        groups = self.analysis.groups
        if self.layers is None:
            return [g.name for g in groups]
        owner = {m.module: g.name for g in groups for m in g.members if m.role == OUT}
        owner.update({g.name: g.name for g in groups})
        unknown = [n for n in self.layers if n not in owner]
        check(not unknown, f"`layers` names unknown prunable layers {unknown}; prunable groups: "
                           f"{', '.join(g.name for g in groups)}")
        chosen = {owner[n] for n in self.layers}
        return [g.name for g in groups if g.name in chosen]

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        check(pl_module.automatic_optimization,
              f"{type(self).__name__} adds its loss terms to the loss Lightning back-propagates: "
              "manual optimisation (automatic_optimization=False) is not supported")
        self._install(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # after the checkpoint's training state is restored: global_step / current_epoch are final
        super().on_train_start(trainer, pl_module)
        if self._loaded.get("schedule"):
            saved = StagewiseSchedule(**self._loaded["schedule"])
            # a checkpoint with recorded settings was checked in load_state_dict: its schedule is
            # this one's, fitted to the first sitting's trainer; an older one may differ: say so
            if (not self._loaded.get("settings_checked") and saved != self.schedule
                    and not (self.scale_to_fit and saved.stages == self.schedule.stages)):
                rank_zero_warn(f"[{type(self).__name__}] resuming with the checkpoint's schedule {saved!r}, "
                               f"not {self.schedule!r}")
            self.schedule = saved
            self.prune_counts = dict(self._loaded["prune_counts"])
            self._origin = int(self._loaded["origin"])
            self._stage_prune = {int(k): int(v) for k, v in (self._loaded.get("stage_prune") or {}).items()}
        else:
            # a fit resumed from a checkpoint of plain training starts the schedule where it is
            self._origin = trainer.global_step if self.unit == "steps" else trainer.current_epoch
        self._fit_schedule(trainer)
        rank_zero_info(f"[{type(self).__name__}] target {self._target_text()} "
                       f"({self.allocation}: prune {self.prune_counts})\n{self.schedule}")
        self._rates = PhaseRates(trainer.optimizers)  # retrain and final rates, one step at a time
        self._params = PhaseParameters(trainer, pl_module, own=[g.logits for g in self.gates.values()])
        if not self._params.toggle:
            rank_zero_info(f"[{type(self).__name__}] DDP without find_unused_parameters: frozen weights still get "
                           "(discarded) gradients; DDPStrategy(find_unused_parameters=True) makes selector steps cheaper")
        if self._phase is not None:  # resumed: rebuild the phase we were in, without re-initialising
            self._enter(trainer, pl_module, self._phase, fresh=False)

    def _fit_schedule(self, trainer: "pl.Trainer") -> None:
        """Check the trainer can hold the schedule from where it starts; scale it if asked."""
        s = self.schedule
        wanted = {"warmup": s.warmup, "selector": s.selector, "retrain": s.retrain}
        repeats = {"warmup": 1, "selector": s.num_stages, "retrain": s.num_stages}
        if s.final:  # the final retrain scales with the rest (at least one unit)
            wanted["final"], repeats["final"] = s.final, 1
        lengths = self.fit_schedule(trainer, self.unit, wanted, repeats,
                                    scale_to_fit=self.scale_to_fit and self._phase is None, origin=self._origin)
        fitted = StagewiseSchedule(s.stages, lengths["selector"], lengths["retrain"], lengths["warmup"], s.unit,
                                   final=lengths.get("final", 0))
        if self.final_retrain == REST and self._phase is None and not self._loaded.get("schedule"):
            available = trainer_budget(trainer, self.unit, self._origin)[0]
            check(math.isfinite(available), f"final_retrain={REST!r} needs a trainer of finite length: set "
                                            "max_steps or max_epochs, or give final_retrain a length")
            fitted = StagewiseSchedule(s.stages, fitted.selector, fitted.retrain, fitted.warmup, s.unit,
                                       final=max(0, int(available) - fitted.total))
        if fitted != s:
            self.schedule = fitted

    def _install(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Add the selector's loss terms to ``training_step`` and put the phase on the progress bar."""
        self._wrapper = StepWrapper(
            pl_module, self.network_of(pl_module),
            active=lambda: self._phase is not None and self._phase.name == SELECTOR,
            extra=lambda loss, captured: self._selector_loss(pl_module, loss, captured),
        )
        bar = trainer.progress_bar_callback
        if bar is not None:
            get_metrics = bar.get_metrics

            @functools.wraps(get_metrics)
            def with_phase(trainer, pl_module):
                items = get_metrics(trainer, pl_module)
                if self._phase is not None:
                    items["msf"] = self._short(self._phase)
                return items

            self._bar_patch = InstancePatch(bar, "get_metrics", with_phase)

    def _uninstall(self, pl_module: "pl.LightningModule") -> None:
        """Undo :meth:`_install` and every phase setting: the module leaves the fit as it came."""
        if self._wrapper is not None:
            self._wrapper.remove()
            self._wrapper = None
        if self._bar_patch is not None:
            self._bar_patch.undo()
            self._bar_patch = None
        if self._rates is not None:
            self._rates.remove()
            self._rates = None
        if self._params is not None:
            self._params.restore(pl_module)
            self._params = None
        self._gate_optimizer = None

    # ------------------------------------------------------------------ phases
    def _position(self, trainer: "pl.Trainer") -> int:
        now = trainer.global_step if self.unit == "steps" else trainer.current_epoch
        return now - self._origin

    def _steps(self, trainer: "pl.Trainer", length: int) -> int:
        """``length`` in the schedule's unit, in optimizer steps."""
        if self.unit == "steps":
            return length
        per_epoch = trainer.num_training_batches / trainer.accumulate_grad_batches
        return length * (max(1, math.ceil(per_epoch)) if math.isfinite(per_epoch) else 1)

    def _selector_steps(self, trainer: "pl.Trainer") -> int:
        return self._steps(trainer, self.schedule.selector)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        phase = self.schedule.phase_at(self._position(trainer))
        if phase == self._phase:
            return
        # enter every phase between the last one run and this one, in order (normally just one)
        order = self.schedule.phases + [phase] if phase.name == DONE else self.schedule.phases
        first = 0 if self._phase is None else order.index(self._phase) + 1
        for step in order[first : order.index(phase) + 1]:
            self._leave(trainer, pl_module)
            self._enter(trainer, pl_module, step, fresh=True)

    def _leave(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        old = self._phase
        if old is None:
            return
        if old.name == SELECTOR:
            if self.target_speedup is not None:  # the learned counts re-allocated under the latency budget
                logits = {name: self.gates[name].logits for name in old.groups}
                fixed = {n: self.analysis[n].size - c for n, c in self.prune_counts.items() if n not in logits}
                counts = self.latency_counts(pl_module, old.groups, {n: torch.sigmoid(t) for n, t in logits.items()},
                                             floors={n: self._floor(n) for n in old.groups}, fixed=fixed)
                masks = {name: self.analysis[name].keep_top(logits[name], logits[name].numel() - counts[name])
                         for name in old.groups}
                self.prune_counts.update(counts)
            elif self.allocation == "learned":
                logits = {name: self.gates[name].logits for name in old.groups}
                keep = sum(t.numel() for t in logits.values()) - self._stage_prune[old.stage]
                masks = keep_top_across(logits, keep, {name: self._floor(name) for name in old.groups})
                counts = {name: int((~mask).sum()) for name, mask in masks.items()}
                if self.round_to != 1:  # the learned counts to the engine's multiples, then each group's best
                    counts = self._rounded(counts)
                    masks = {name: self.analysis[name].keep_top(logits[name], logits[name].numel() - counts[name])
                             for name in old.groups}
                self.prune_counts.update(counts)
            else:
                masks = {name: self.analysis[name].keep_top(self.gates[name].logits,  # per cell for grouped convs
                                                            self.gates[name].logits.numel() - self.prune_counts[name])
                         for name in old.groups}
            for name, mask in masks.items():
                self.gates[name].set_mask(mask)
            self._gate_optimizer = None
        self._check_ranks(trainer, f"end of {old.describe(self.schedule.num_stages)}")

    def _enter(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", phase: Phase, fresh: bool) -> None:
        self._phase = phase
        if phase.name == SELECTOR:
            logits = [self.gates[name].logits for name in phase.groups]
            if fresh:
                self._loss.spread = {}
                if self.allocation == "learned":
                    self._stage_prune[phase.stage] = self._stage_budget(phase)
                # by default the gates start as far from 0 as Adam moves them in a quarter of the phase
                self._init_gates(pl_module, phase, default=min(0.5, self.gate_lr * self._selector_steps(trainer) / 4))
            self._gate_optimizer = torch.optim.Adam(logits, lr=self.gate_lr)
            if not fresh and self._loaded.get("gate_optimizer") is not None:
                self._gate_optimizer.load_state_dict(self._loaded["gate_optimizer"])
            self._params.train_only(pl_module, logits)
        else:
            self._gate_optimizer = None
            self._params.train_only(pl_module, self._params.main)
        self._loaded.pop("gate_optimizer", None)
        if fresh:
            rank_zero_info(f"[{type(self).__name__}] {self._position(trainer)} {self.unit}: "
                           f"{phase.describe(self.schedule.num_stages)}, PFR now {self.pfr():.3f}")

    def _stage_budget(self, phase: Phase) -> int:
        """Learned counts: the filters this stage closes, so that the global target is met: the
        total minus what earlier stages closed and later stages are planned to close (clamped
        to what this stage's floors allow)."""
        stages = self.schedule.stages
        goal = self._goal
        earlier = sum(self.prune_counts[n] for s in stages[: phase.stage] for n in s)
        later = sum(self.prune_counts[n] for s in stages[phase.stage + 1 :] for n in s)
        room = sum(self.analysis[n].size - self._floor(n) for n in phase.groups)
        return max(0, min(room, goal - earlier - later))

    @torch.no_grad()
    def _init_gates(self, pl_module: "pl.LightningModule", phase: Phase, default: float) -> None:
        """Open alike at ``+gate_init_logit`` (the paper), or ranked by ``gate_init_criterion``
        around each group's cut, ``gate_init_spread`` apart (all groups scored before any gate
        moves, as the greedy rule does); ``default`` stands for a None."""
        if self.gate_init_criterion is None:
            for name in phase.groups:
                self.gates[name].logits.fill_(default if self.gate_init_logit is None else self.gate_init_logit)
            return
        net = self.network_of(pl_module)
        scores = {name: scores_for(self.gate_init_criterion, net, self.analysis[name]) for name in phase.groups}
        spread = max(default, 0.01) if self.gate_init_spread is None else self.gate_init_spread
        for name in phase.groups:
            logits = self.gates[name].logits
            logits.copy_(rank_logits(scores[name], self.prune_counts[name], spread).to(logits))

    def _check_ranks(self, trainer: "pl.Trainer", when: str) -> None:
        """Gates must agree on every rank (DDP averages their gradients, so they should)."""
        if trainer.world_size <= 1:
            return
        masks = torch.cat([g.mask() for g in self.gates.values()])
        gathered = trainer.strategy.all_gather(masks)
        if not bool((gathered == gathered[0]).all()):
            diff = (gathered != gathered[0]).any(0).sum().item()
            raise RuntimeError(f"[{type(self).__name__}] gates differ across ranks at the {when} ({diff} filters)")

    @property
    def phase(self) -> Optional[Phase]:
        """The phase of the schedule the fit is in (None before the first training batch)."""
        return self._phase

    @staticmethod
    def _short(phase: Phase) -> str:
        return phase.name if phase.stage < 0 or phase.name in (DONE, FINAL) else f"{phase.name} {phase.stage + 1}"

    @override
    def distilling(self) -> bool:
        # the selector distils with its own teacher (selector_distill); retraining phases from the warm start
        return self._phase is not None and self._phase.name in (RETRAIN, FINAL, DONE) and super().distilling()

    # ------------------------------------------------------------------ selector loss
    def _selector_loss(self, pl_module: "pl.LightningModule", loss: Tensor, captured: Optional[Captured]) -> Tensor:
        """The user's loss plus the selector's terms (:class:`~lightning_bnnprune.pruning.selector.SelectorLoss`)."""
        student = (student_output(captured, type(self).__name__, self.network_path, "selector_distill")
                   if self.selector_distill > 0 else None)
        kd, budget = self._loss.terms(self.network_of(pl_module), self.gates, self._phase.groups, self._budget_units(),
                                      loss, student)
        pl_module.log("msf/kd", kd.detach(), on_step=True, on_epoch=False)
        pl_module.log("msf/budget", budget.detach(), on_step=True, on_epoch=False)
        return loss + self.selector_distill * kd + budget

    def _budget_units(self) -> List[BudgetUnit]:
        """The selector's budget units: one per group, or one per stage with learned counts (its
        groups share the budget)."""
        phase = self._phase
        units = ([(f"stage{phase.stage}", tuple(phase.groups), self._stage_prune[phase.stage])]
                 if self.allocation == "learned" else [(n, (n,), self.prune_counts[n]) for n in phase.groups])
        return [BudgetUnit(key, names, close, sum(self.gates[n].logits.numel() for n in names))
                for key, names, close in units]

    # ------------------------------------------------------------------ optimisation
    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._phase is None:
            return
        if self._gate_optimizer is not None:
            self._loss.observe(self.gates, self._budget_units())  # the budget's scale, averaged
            if self.gate_lr > 0:
                self._gate_optimizer.step()  # gradients already averaged over ranks by DDP
            self._gate_optimizer.zero_grad(set_to_none=True)
        self._params.drop_frozen_grads()  # nothing outside the phase may move
        if self._phase.name == RETRAIN:
            self._rates.set(optimizer, lambda group: (
                group["lr"] * self.retrain_lr_factor if self.retrain_lr_factor is not None
                else self.retrain_lr if self.retrain_lr is not None else _DEFAULT_RETRAIN_LR))
        elif self._phase.name == FINAL:  # a cosine restarted from the initial rate, to 0 over the phase
            start = self._steps(trainer, self._origin + self._phase.start)
            length = max(1, self._steps(trainer, self.schedule.final))
            factor = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (trainer.global_step - start) / length)))
            self._rates.set(optimizer, lambda group: self._rates.base(group) * factor)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._rates is not None:
            self._rates.restore()
        if self._phase is None:
            return
        pl_module.log("msf/stage", float(self._phase.stage), on_step=True, on_epoch=False)
        pl_module.log("msf/phase", float(self._phase.code), on_step=True, on_epoch=False)
        pl_module.log("msf/pfr", self.pfr(), on_step=True, on_epoch=False)
        for name, kept in self.kept_filters().items():
            pl_module.log(f"msf/kept/{name}", float(kept), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ end
    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._uninstall(pl_module)
        if self.schedule is not None:
            position = self._position(trainer)
            if self._phase is not None and self._phase.name == SELECTOR:
                self._leave(trainer, pl_module)  # an interrupted selector still leaves its share
            if position < self.schedule.total:
                rank_zero_warn(
                    f"[{type(self).__name__}] fit ended at {position} of {self.schedule.total} {self.unit}: "
                    "the stages after "
                    f"{self._phase.describe(self.schedule.num_stages) if self._phase else 'the start'} did not run"
                )
            kept = self.kept_filters()
            chosen = sum(self.gates[name].logits.numel() for name in self.prune_counts)
            pruned = sum(self.gates[name].logits.numel() - kept[name] for name in self.prune_counts)
            rank_zero_info(f"[{type(self).__name__}] final PFR {pruned / max(chosen, 1):.4f} of the pruned layers "
                           f"(target {self._target_text()}), {self.pfr():.4f} overall; kept filters {kept}")
        super().on_fit_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._uninstall(pl_module)
        super().on_exception(trainer, pl_module, exception)

    # ------------------------------------------------------------------ resume
    @override
    def pruning_settings(self) -> Dict[str, Any]:
        return {
            **super().pruning_settings(), "layers": self.layers, "allocation": self.allocation,
            "layer_floor": self.layer_floor, "unit": self.unit, "warmup": self.warmup, "selector": self.selector,
            "retrain": self.retrain, "layers_per_stage": self.layers_per_stage, "final_retrain": self.final_retrain,
            "gate_init_criterion": self.gate_init_criterion_name, "gate_lr": self.gate_lr,
            "gate_init_logit": self.gate_init_logit, "gate_init_spread": self.gate_init_spread,
            "selector_distill": self.selector_distill, "selector_distill_temperature": self.selector_distill_temperature,
            "budget_strength": self.budget_strength, "lambda_budget": self.lambda_budget,
        }

    @override
    def state_dict(self) -> Dict[str, Any]:
        state = dict(super().state_dict())
        phase = self._phase
        state["msf"] = {
            "origin": self._origin,
            "schedule": self.schedule.state() if self.schedule is not None else None,
            "prune_counts": dict(self.prune_counts),
            "phase": None if phase is None else {"stage": phase.stage, "name": phase.name, "start": phase.start},
            "gate_optimizer": self._gate_optimizer.state_dict() if self._gate_optimizer is not None else None,
            "grad_spread": dict(self._loss.spread),
            "stage_prune": dict(self._stage_prune),
        }
        return state

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        state = state_dict.get("msf")
        if not state:
            return
        self._loaded = {k: state[k] for k in ("origin", "schedule", "prune_counts", "gate_optimizer")}
        self._loaded["stage_prune"] = state.get("stage_prune")
        self._loaded["settings_checked"] = "settings" in state_dict
        self._loss.spread = dict(state.get("grad_spread", {}))
        if state["phase"] is not None and state["schedule"] is not None:
            schedule = StagewiseSchedule(**state["schedule"])
            self._phase = schedule.phase_at(int(state["phase"]["start"]))
