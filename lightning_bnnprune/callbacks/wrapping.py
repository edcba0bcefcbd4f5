"""The only place the library touches a user's methods: ``training_step``, wrapped for one ``fit``.

A pruning callback adds loss terms (the selector's distillation and budget, a retrain's
distillation) to the loss that the user's own ``training_step`` returns, and needs the network's
output, the student's logits, to compute them. Users should not have to change their module for
that, so :class:`StepWrapper` sets a wrapper on the *instance* (``pl_module.training_step``; the
class is untouched) for the duration of the fit and reads the network's output with a forward
hook. :meth:`StepWrapper.remove` puts both back, so the module leaves the fit as it came, after an
exception too. The same instance-level patch, :class:`InstancePatch`, is what puts a strategy's
phase on Lightning's progress bar.

The user's ``training_step`` may return a loss tensor, a dict with ``"loss"``, or ``None`` (a
skipped batch, passed through as it is).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

__all__ = ["Captured", "InstancePatch", "StepWrapper", "student_output"]

#: The network's ``(args, kwargs, output)`` in the current training step.
Captured = Tuple[tuple, dict, Any]


class InstancePatch:
    """``setattr(obj, attr, value)`` on the instance; :meth:`undo` restores what the instance had
    (or removes the attribute, so the class's method shows through again)."""

    def __init__(self, obj: Any, attr: str, value: Any) -> None:
        self.obj, self.attr = obj, attr
        self.had, self.old = attr in obj.__dict__, obj.__dict__.get(attr)
        setattr(obj, attr, value)

    def undo(self) -> None:
        if self.had:
            setattr(self.obj, self.attr, self.old)
        else:
            self.obj.__dict__.pop(self.attr, None)


class StepWrapper:
    """Add ``extra(loss, captured)`` to ``pl_module.training_step``'s loss while ``active()``.

    Args:
        pl_module: the user's LightningModule.
        network: the module whose output the extra terms need (hooked once, for the first call
            in each step: the student's forward).
        active: asked at every step; when False the user's step runs alone, untouched.
        extra: ``(loss, captured) -> new loss``; ``captured`` is None when ``training_step`` did
            not call ``network`` (see :func:`student_output`).
    """

    def __init__(self, pl_module: nn.Module, network: nn.Module, active: Callable[[], bool],
                 extra: Callable[[Tensor, Optional[Captured]], Tensor]) -> None:
        self._captured: Optional[Captured] = None
        self._capturing = False
        step = pl_module.training_step

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any):
            if not active():
                return step(*args, **kwargs)
            self._captured, self._capturing = None, True
            try:
                out = step(*args, **kwargs)
            finally:
                self._capturing = False
            captured, self._captured = self._captured, None
            loss = out.get("loss") if isinstance(out, dict) else out
            if not isinstance(loss, Tensor):
                return out  # the user skipped this batch
            total = extra(loss, captured)
            return {**out, "loss": total} if isinstance(out, dict) else total

        self._patches: List[InstancePatch] = [InstancePatch(pl_module, "training_step", training_step)]
        self._hook = network.register_forward_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._capturing and self._captured is None:
            self._captured = (args, kwargs, output)

    def remove(self) -> None:
        """Put the user's ``training_step`` back and remove the hook (idempotent)."""
        for patch in reversed(self._patches):
            patch.undo()
        self._patches = []
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def student_output(captured: Optional[Captured], owner: str, network_path: str, knob: str) -> Captured:
    """``captured`` if it holds the network's output as a tensor, else the one-line error that
    says what to change (``knob=0`` turns the distillation off)."""
    if captured is None or not isinstance(captured[2], Tensor):
        raise MisconfigurationException(
            f"{owner}: distillation needs the network's output as a tensor, but `training_step` did not "
            f"call `{network_path or 'forward'}` or it returned "
            f"{type(captured[2]).__name__ if captured else 'nothing'}; pass {knob}=0 or `network=` the "
            "module that returns logits"
        )
    return captured
