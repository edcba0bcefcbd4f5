"""What kind of number an argument is: the predicates every layer of the package checks with.

At the bottom of the import order (no torch, no Lightning), so that the data modules, the
samplers and ``pruning/`` use the same rule as the callbacks, which re-export these from
:mod:`~lightning_bnnprune.callbacks.checks` beside their Lightning-style refusals. A ``bool`` is
an ``int`` to Python, never to an argument check: ``batch_size=True`` is a mistake.

    >>> is_int(3, least=1), is_int(True), is_int(0, least=1), is_number(float("nan"))
    (True, False, False, False)
"""
from __future__ import annotations

import math
from typing import Any, Optional

__all__ = ["is_int", "is_number"]


def is_int(value: Any, least: Optional[int] = None) -> bool:
    """An ``int`` (not a ``bool``), at least ``least`` if given."""
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` (not a ``bool``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
