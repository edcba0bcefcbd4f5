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

    Several wrappers on one module (a pruning callback's distillation, its selector's terms,
    ``Binarize``'s teacher) share one patch of ``training_step`` (a :class:`_StepTerms` kept on the
    instance): the terms are added in the order the wrappers were made, and each wrapper can be
    removed in any order, so callbacks that end their fit in Lightning's order never restore one
    another's wrapper.

    Args:
        pl_module: the user's LightningModule.
        network: the module whose output the extra terms need (hooked once, for the first call
            in each step: the student's forward).
        active: asked at every step; when False the user's step runs without this term (with no
            term active, the user's step runs alone, untouched).
        extra: ``(loss, captured) -> new loss``; ``captured`` is None when ``training_step`` did
            not call ``network`` (see :func:`student_output`).
    """

    def __init__(self, pl_module: nn.Module, network: nn.Module, active: Callable[[], bool],
                 extra: Callable[[Tensor, Optional[Captured]], Tensor]) -> None:
        self.active, self.extra = active, extra
        self.captured: Optional[Captured] = None
        self.capturing = False
        self._terms: Optional[_StepTerms] = _StepTerms.of(pl_module)
        self._terms.add(self)
        self._hook = network.register_forward_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.capturing and self.captured is None:
            self.captured = (args, kwargs, output)

    def remove(self) -> None:
        """Take this term out (the user's ``training_step`` comes back with the last one) and
        remove the hook (idempotent)."""
        if self._terms is not None:
            self._terms.discard(self)
            self._terms = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class _StepTerms:
    """The one patch of ``pl_module.training_step`` that every :class:`StepWrapper` on it shares."""

    ATTR = "_bnnprune_step_terms"

    @classmethod
    def of(cls, pl_module: nn.Module) -> "_StepTerms":
        terms = pl_module.__dict__.get(cls.ATTR)
        if terms is None:
            terms = cls(pl_module)
            pl_module.__dict__[cls.ATTR] = terms
        return terms

    def __init__(self, pl_module: nn.Module) -> None:
        self.pl_module = pl_module
        self.wrappers: List[StepWrapper] = []
        step = pl_module.training_step

        @functools.wraps(step)
        def training_step(*args: Any, **kwargs: Any):
            active = [w for w in self.wrappers if w.active()]
            if not active:
                return step(*args, **kwargs)
            for w in active:
                w.captured, w.capturing = None, True
            try:
                out = step(*args, **kwargs)
            finally:
                for w in active:
                    w.capturing = False
            loss = out.get("loss") if isinstance(out, dict) else out
            total = loss
            for w in active:
                captured, w.captured = w.captured, None
                if isinstance(loss, Tensor):  # else the user skipped this batch
                    total = w.extra(total, captured)
            if not isinstance(loss, Tensor):
                return out
            return {**out, "loss": total} if isinstance(out, dict) else total

        self.patch = InstancePatch(pl_module, "training_step", training_step)

    def add(self, wrapper: StepWrapper) -> None:
        self.wrappers.append(wrapper)

    def discard(self, wrapper: StepWrapper) -> None:
        self.wrappers = [w for w in self.wrappers if w is not wrapper]
        if not self.wrappers:
            self.patch.undo()
            self.pl_module.__dict__.pop(self.ATTR, None)


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
