"""The stage-wise, bottom-up schedule of Xu et al., "Main/Subsidiary Network" (CVPR 2019).

An optional *warm-up* of the main binary network, then for each stage (one prunable layer in the
paper, a few, or all of them in one stage: ``MainSubsidiaryPruning``'s default; from the input
side) a *selector* phase, in which only that stage's gates learn, and a
*retrain* phase, in which the main network adapts to the closed filters. Training one layer's
selector at a time is the paper's answer to the gradient mismatch of the straight-through gate.
An optional *final* retrain of the whole network closes the schedule (this project's addition: the
greedy rules retrain for a whole schedule after their one cut, the last stages here otherwise get
only one short retrain phase).

The schedule is a plain value: it knows nothing of Lightning, can be printed, compared, scaled to
a budget and asked which phase a step (or an epoch) falls in, so it is tested on its own. The
rule for the phases' lengths (:func:`check_lengths`) is this module's too: the strategies check
their arguments with it.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..checks import is_int

__all__ = [
    "Phase", "StagewiseSchedule", "WARMUP", "SELECTOR", "RETRAIN", "FINAL", "DONE", "PHASE_CODES",
    "UNITS", "LEAST", "check_lengths", "ScheduleTooLong", "trainer_budget", "fit_lengths",
]

WARMUP, SELECTOR, RETRAIN, DONE = "warmup", "selector", "retrain", "done"
FINAL = "final"
#: Numbers for loggers and progress bars, which take numbers only (``final`` came later: 4).
PHASE_CODES = {WARMUP: 0, SELECTOR: 1, RETRAIN: 2, DONE: 3, FINAL: 4}
UNITS = ("steps", "epochs")
#: The fewest units each phase lasts: a stage must select and retrain; warm-up and final may be absent.
LEAST = {WARMUP: 0, SELECTOR: 1, RETRAIN: 1, FINAL: 0}


def check_lengths(unit: str, lengths: Mapping[str, Any], name: Callable[[str], str] = lambda key: key) -> None:
    """The one check of a schedule's unit and phase lengths: each an ``int`` (not a ``bool``) of at
    least :data:`LEAST` of its phase (``lengths`` is keyed by phase: ``warmup``, ``selector``,
    ``retrain``, ``final``); ``name(key)`` is how the caller spells the argument.

    Raises:
        ValueError: the first bad value, in one line naming it, the rule and the value.

    Example::

        >>> check_lengths("steps", {"selector": 0})
        Traceback (most recent call last):
        ...
        ValueError: `selector` must be an int >= 1 (steps), got 0
    """
    if unit not in UNITS:
        raise ValueError(f"`{name('unit')}` must be one of {', '.join(UNITS)}; got {unit!r}")
    for key, value in lengths.items():
        if not is_int(value, least=LEAST[key]):
            raise ValueError(f"`{name(key)}` must be an int >= {LEAST[key]} ({unit}), got {value!r}")


@dataclass(frozen=True)
class Phase:
    """One phase: ``[start, end)`` in the schedule's unit; ``stage`` is -1 for the warm-up and
    ``num_stages`` once the schedule is over."""

    stage: int
    name: str
    groups: Tuple[str, ...]
    start: int
    end: float  # math.inf for DONE

    @property
    def code(self) -> int:
        return PHASE_CODES[self.name]

    def describe(self, num_stages: int) -> str:
        if self.name == WARMUP:
            return "warm-up of the main network"
        if self.name == DONE:
            return "schedule done, gates fixed"
        if self.name == FINAL:
            return "final retrain of the whole network, gates fixed"
        return f"stage {self.stage + 1}/{num_stages} {self.name}: {', '.join(self.groups)}"


class StagewiseSchedule:
    """Warm-up, then (selector, retrain) per stage of prunable groups, bottom-up, then a final retrain.

    A stage is one or more groups whose selectors train together (``from_groups``'s
    ``layers_per_stage``): one group per stage is the paper's layer-by-layer schedule, all groups
    in one stage ``MainSubsidiaryPruning``'s default. (Called ``LayerwiseSchedule`` before 0.2.0;
    that name is a deprecated alias until 0.3.0.)

    Args:
        stages: the groups trained together in each stage, in schedule order (input side first).
        selector: length of every selector phase.
        retrain: length of every retrain phase.
        warmup: length of the warm-up of the main network (0: none).
        unit: ``"steps"`` (optimizer steps, ``trainer.global_step``) or ``"epochs"``.
        final: length of the final retrain after the last stage (0: none); its phase has
            ``stage = num_stages`` like ``DONE``.

    Raises:
        ValueError: no stage, an empty or repeated group, or a length or unit that
            :func:`check_lengths` refuses.

    Example::

        >>> s = StagewiseSchedule.from_groups(["a", "b", "c"], selector=2, retrain=3, warmup=1)
        >>> s.total
        16
        >>> s.phase_at(4)
        Phase(stage=0, name='retrain', groups=('a',), start=3, end=6)
    """

    def __init__(
        self,
        stages: Sequence[Sequence[str]],
        selector: int,
        retrain: int,
        warmup: int = 0,
        unit: str = "steps",
        final: int = 0,
    ) -> None:
        check_lengths(unit, {WARMUP: warmup, SELECTOR: selector, RETRAIN: retrain, FINAL: final})
        self.stages: Tuple[Tuple[str, ...], ...] = tuple(tuple(s) for s in stages)
        if not self.stages or any(not s for s in self.stages):
            raise ValueError(f"every stage needs at least one group, got {self.stages!r}")
        flat = [g for s in self.stages for g in s]
        if len(set(flat)) != len(flat):
            raise ValueError(f"a group appears in two stages: {flat}")
        self.selector, self.retrain, self.warmup, self.unit = selector, retrain, warmup, unit
        self.final = final
        self.phases: List[Phase] = []
        t = 0
        if warmup:
            self.phases.append(Phase(-1, WARMUP, (), 0, warmup))
            t = warmup
        for i, groups in enumerate(self.stages):
            self.phases.append(Phase(i, SELECTOR, groups, t, t + selector))
            self.phases.append(Phase(i, RETRAIN, groups, t + selector, t + selector + retrain))
            t += selector + retrain
        if final:
            self.phases.append(Phase(len(self.stages), FINAL, (), t, t + final))
            t += final
        self._done = Phase(len(self.stages), DONE, (), t, math.inf)

    @classmethod
    def from_groups(
        cls,
        groups: Sequence[str],
        selector: int,
        retrain: int,
        warmup: int = 0,
        layers_per_stage: int = 1,
        unit: str = "steps",
        final: int = 0,
    ) -> "StagewiseSchedule":
        """``groups`` (in forward order) cut into stages of ``layers_per_stage`` consecutive groups."""
        if not isinstance(layers_per_stage, int) or layers_per_stage < 1:
            raise ValueError(f"layers_per_stage must be an int >= 1, got {layers_per_stage!r}")
        groups = list(groups)
        stages = [groups[i : i + layers_per_stage] for i in range(0, len(groups), layers_per_stage)]
        return cls(stages, selector, retrain, warmup, unit, final)

    @property
    def total(self) -> int:
        """Length of the whole schedule, in its unit."""
        return int(self._done.start)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def phase_at(self, t: int) -> Phase:
        """The phase that step (or epoch) ``t`` falls in; ``DONE`` from :attr:`total` on."""
        if t < 0:
            raise ValueError(f"t must be >= 0, got {t}")
        for phase in self.phases:
            if t < phase.end:
                return phase
        return self._done

    def scaled(self, available: int) -> "StagewiseSchedule":
        """The same schedule with every length scaled down (floor, at least 1; the warm-up may
        vanish) so that it fits in ``available`` units.

        Raises:
            ValueError: if even one unit per selector and retrain phase does not fit.
        """
        if available >= self.total:
            return self
        least = 2 * self.num_stages
        if available < least:
            raise ValueError(
                f"{available} {self.unit} cannot hold {self.num_stages} stages even at 1 {self.unit[:-1]} "
                f"per phase: at least {least} needed"
            )
        factor = available / self.total
        selector = max(1, int(self.selector * factor))
        retrain = max(1, int(self.retrain * factor))
        spare = available - self.num_stages * (selector + retrain)
        warmup = max(0, min(int(self.warmup * factor), spare))
        final = max(0, min(int(self.final * factor), spare - warmup))
        return StagewiseSchedule(self.stages, selector, retrain, warmup, self.unit, final)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StagewiseSchedule) and self.state() == other.state()

    def state(self) -> dict:
        """Plain description (for checkpoints and comparisons)."""
        return {
            "stages": [list(s) for s in self.stages],
            "selector": self.selector,
            "retrain": self.retrain,
            "warmup": self.warmup,
            "unit": self.unit,
            "final": self.final,
        }

    def __repr__(self) -> str:
        return (
            f"StagewiseSchedule({self.num_stages} stages, warmup={self.warmup}, selector={self.selector}, "
            f"retrain={self.retrain}, {f'final={self.final}, ' if self.final else ''}unit={self.unit!r}, "
            f"total={self.total})"
        )

    def __str__(self) -> str:
        unit = self.unit
        width = len(str(self.total))
        lines = [f"{repr(self)}:"]
        for phase in self.phases:
            span = f"{phase.start:>{width}}-{int(phase.end) - 1:<{width}}"
            lines.append(f"  {unit} {span}  {phase.describe(self.num_stages)}")
        lines.append(f"  {unit} {self.total:>{width}}+{'':<{width}}  {self._done.describe(self.num_stages)}")
        return "\n".join(lines)


def __getattr__(name: str) -> Any:
    """``LayerwiseSchedule``: the schedule's name before 0.2.0, a deprecated alias until 0.3.0."""
    if name == "LayerwiseSchedule":
        warnings.warn("LayerwiseSchedule is deprecated and will be removed in 0.3.0; use StagewiseSchedule "
                      "(the same class: one stage of all layers is MainSubsidiaryPruning's default)",
                      FutureWarning, stacklevel=2)
        return StagewiseSchedule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ the short-run rule
class ScheduleTooLong(ValueError):
    """A pruning schedule that the trainer's length cannot hold (the message says what fits).

    It keeps its figures as fields, so that an app can say the same in its own keys
    (:meth:`message`, e.g. ``trainer.max_steps`` and ``schedule.warmup``) without parsing text.
    ``fits`` is None when even the shortest schedule does not fit.
    """

    def __init__(self, owner: str, unit: str, lengths: Mapping[str, int], repeats: Mapping[str, int], extra: int,
                 available: float, knob: str, knob_value: int, per_epoch: int, shortest: int,
                 fits: Optional[Mapping[str, int]] = None) -> None:
        self.owner, self.unit, self.lengths, self.repeats, self.extra = owner, unit, dict(lengths), dict(repeats), extra
        self.available, self.knob, self.knob_value, self.per_epoch = available, knob, knob_value, per_epoch
        self.shortest, self.fits = shortest, None if fits is None else dict(fits)
        super().__init__(self.message())

    @property
    def needed(self) -> int:
        return sum(self.repeats[k] * v for k, v in self.lengths.items()) + self.extra

    def message(self, name: Callable[[str], str] = lambda key: key) -> str:
        """The one-line message, with every length and the trainer argument spelt ``name(key)``."""
        formula = " + ".join(f"{self.repeats[k]} x {name(k)}={v}" if self.repeats[k] != 1 else f"{name(k)}={v}"
                             for k, v in self.lengths.items() if self.repeats[k]) + (f" + {self.extra}" if self.extra else "")
        wanted = f"{name(self.knob)} >= {self.knob_value}"
        if self.knob == "max_epochs" and self.unit == "steps":
            wanted += f" ({self.per_epoch} steps per epoch)"
        head = (f"{self.owner}'s schedule needs {self.needed} {self.unit} ({formula}) "
                f"but the trainer runs {int(self.available)}")
        if self.fits is None:
            return f"{head}, and even the shortest schedule needs {self.shortest}: set {wanted}"
        fits = ", ".join(f"{name(k)}={v}" for k, v in self.fits.items())
        return f"{head}: set {wanted}, or shorten the schedule to fit, e.g. {fits} (scale_to_fit=True does this)"


def trainer_budget(trainer: Any, unit: str, origin: int = 0) -> Tuple[float, str, int]:
    """``(available, knob, per_epoch)``: the ``unit`` s the trainer runs from ``origin`` on, the
    Trainer argument that sets that length (``"max_steps"`` when given, else ``"max_epochs"``)
    and the optimizer steps per epoch. Duck-typed on a Lightning ``Trainer`` (read in
    ``on_fit_start`` or later, when the dataloaders are known)."""
    knob = "max_steps" if trainer.max_steps not in (None, -1) else "max_epochs"
    batches = trainer.num_training_batches  # known from on_train_start on; inf before
    if math.isfinite(batches):
        per_epoch = max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))
    elif knob == "max_epochs" and trainer.max_epochs not in (None, -1, 0):
        per_epoch = max(1, int(trainer.estimated_stepping_batches) // trainer.max_epochs)
    else:
        per_epoch = 1
    if unit == "steps":
        available = trainer.estimated_stepping_batches
    else:
        available = math.inf if trainer.max_epochs in (None, -1) else trainer.max_epochs
        if trainer.max_steps not in (None, -1):
            available = min(available, trainer.max_steps // per_epoch)
    return available - origin, knob, int(per_epoch)


def fit_lengths(
    owner: str,
    lengths: Mapping[str, int],
    repeats: Mapping[str, int],
    available: float,
    unit: str,
    knob: str = "max_steps",
    per_epoch: int = 1,
    scale_to_fit: bool = False,
    least: Mapping[str, int] = None,
    extra: int = 0,
    origin: int = 0,
) -> Dict[str, int]:
    """The one short-run rule of every pruning strategy: scale the schedule into the trainer's
    length, or refuse with one message that says which lengths would fit.

    The schedule needs ``sum(repeats[k] * lengths[k]) + extra`` units (e.g. msf:
    ``warmup + stages x (selector + retrain)``; greedy: ``warmup + (groups - 1) x retrain + 1``).
    If that exceeds ``available``: with ``scale_to_fit`` every length is scaled by
    ``available / needed`` (floor, at least ``least[k]``; ``warmup`` takes what is left, so it
    may shrink most), else :class:`ScheduleTooLong` names ``knob`` with the value that holds the
    schedule and the scaled lengths that fit the trainer as it is.

    Args:
        owner: the callback's name, for the message.
        lengths: the schedule's lengths by argument name, in ``unit``; ``"warmup"`` is special
            (it absorbs the rounding and may be 0).
        repeats: how often each length occurs in the schedule.
        available: the units the trainer runs (:func:`trainer_budget`).
        knob: the Trainer argument that sets the length (``"max_steps"`` / ``"max_epochs"``).
        per_epoch: optimizer steps per epoch (to convert a step count into ``max_epochs``).
        scale_to_fit: scale instead of refusing.
        least: the smallest value of each length (default 1, ``warmup`` 0).
        extra: units needed beyond the lengths (greedy: one step to retrain after the last cut).
        origin: where the schedule starts (a fit resumed from plain training).

    Returns:
        the lengths to use (``lengths`` itself if the schedule fits).

    Raises:
        ScheduleTooLong: the schedule does not fit (and ``scale_to_fit`` is off, or even the
            shortest lengths do not fit).
    """
    least = {k: (0 if k == "warmup" else 1) for k in lengths} | dict(least or {})
    needed = sum(repeats[k] * v for k, v in lengths.items()) + extra
    if available >= needed:
        return dict(lengths)
    shortest = sum(repeats[k] * least[k] for k in lengths) + extra
    knob_value = math.ceil((origin + needed) / per_epoch) if knob == "max_epochs" and unit == "steps" else origin + needed
    too_long = dict(owner=owner, unit=unit, lengths=lengths, repeats=repeats, extra=extra, available=available,
                    knob=knob, knob_value=knob_value, per_epoch=per_epoch, shortest=shortest)
    if available < shortest:
        raise ScheduleTooLong(**too_long)
    factor = available / needed
    scaled = {k: max(least[k], int(v * factor)) for k, v in lengths.items() if k != "warmup"}
    while sum(repeats[k] * v for k, v in scaled.items()) + extra > available:  # floors at `least` overshoot
        k = max((k for k in scaled if scaled[k] > least[k]), key=lambda k: repeats[k] * scaled[k])
        scaled[k] -= 1
    if "warmup" in lengths:
        spare = int(available) - extra - sum(repeats[k] * v for k, v in scaled.items())
        scaled = {"warmup": max(least["warmup"], min(int(lengths["warmup"] * factor), spare)), **scaled}
    if scale_to_fit:
        return scaled
    raise ScheduleTooLong(**too_long, fits=scaled)
