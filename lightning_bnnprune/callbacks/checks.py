"""Argument checks of the callbacks: one style, one exception.

Every callback validates its arguments in ``__init__`` (the Lightning way) and refuses a bad one
with a :class:`MisconfigurationException` naming the argument, the rule and the value given; the
app prints that message as its one-line error.

    >>> is_int(3, least=1), is_int(True), is_number(float("nan"))
    (True, False, False)
    >>> check_pfr("target_pfr", 1.0)
    Traceback (most recent call last):
    ...
    lightning.fabric.utilities.exceptions.MisconfigurationException: `target_pfr` must be in [0, 1), got 1.0
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bnnprune.checks import is_int, is_number  # re-exported: the callbacks' checks in one place

__all__ = ["ResumeMismatch", "ScheduleMisconfiguration", "check", "check_pfr", "checked", "is_int", "is_number",
           "spelled"]


class ScheduleMisconfiguration(MisconfigurationException):
    """A strategy's schedule that the trainer cannot hold; ``schedule`` keeps the figures
    (:class:`~lightning_bnnprune.pruning.schedule.ScheduleTooLong`) for an app to restate."""

    def __init__(self, schedule: Exception) -> None:
        super().__init__(str(schedule))
        self.schedule = schedule


class ResumeMismatch(MisconfigurationException):
    """A fit resumed from a checkpoint made with another value of a setting that decides what is
    pruned (:meth:`~lightning_bnnprune.callbacks.base.FilterPruning.pruning_settings`): going on
    would keep the checkpoint's pruning while the run says the new value. ``setting``,
    ``recorded`` (the checkpoint's value) and ``given`` (this fit's) keep the figures.

        >>> for part in str(ResumeMismatch("MSF", "target_pfr", 0.4, 0.6)).split("; "):
        ...     print(part)
        MSF cannot resume from this checkpoint with target_pfr=0.6: it was made with target_pfr=0.4
        restore target_pfr=0.4 to resume it, or start a new run (no ckpt_path)
    """

    def __init__(self, owner: str, setting: str, recorded: Any, given: Any, why: str = "") -> None:
        self.owner, self.setting, self.recorded, self.given = owner, setting, recorded, given
        super().__init__(
            f"{owner} cannot resume from this checkpoint with {setting}={given!r}: it was made with "
            f"{setting}={recorded!r}{', ' + why if why else ''}; restore {setting}={recorded!r} to resume it, "
            "or start a new run (no ckpt_path)"
        )


def check(ok: bool, message: str) -> None:
    """Raise ``MisconfigurationException(message)`` unless ``ok``."""
    if not ok:
        raise MisconfigurationException(message)


T = TypeVar("T")


def checked(call: Callable[..., T], *args: Any, prefix: str = "", **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, a ``ValueError`` or ``TypeError`` it raises turned into a
    ``MisconfigurationException`` (``prefix`` + its message): the pruning core checks with plain
    Python exceptions, the callbacks answer in Lightning's."""
    try:
        return call(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise MisconfigurationException(f"{prefix}{err}") from None


def check_pfr(label: str, value: Any) -> float:
    """A pruned filter ratio in ``[0, 1)``, as a float."""
    check(is_number(value) and 0.0 <= float(value) < 1.0, f"`{label}` must be in [0, 1), got {value!r}")
    return float(value)


def spelled(value: Any) -> Any:
    """An argument's value as messages and recorded settings name it: a string (or None) as it
    is, a callable (a user's criterion) by its ``__name__``, else its type's name."""
    if value is None or isinstance(value, str):
        return value
    return getattr(value, "__name__", type(value).__name__)
