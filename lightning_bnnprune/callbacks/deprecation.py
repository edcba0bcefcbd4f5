"""0.1's spellings of the strategies' arguments, still accepted until 0.3.0, with a warning.

0.2.0 made the constructors read alike (the target first, every other argument keyword-only, one
name per concept). A call written for 0.1 keeps running for one release and says what to write
instead, as Torch-Pruning keeps a renamed argument for a release: a ``FutureWarning`` (which
Python shows to users by default, unlike ``DeprecationWarning``) naming the new spelling. What is
accepted, per constructor (:func:`accepts_old_spellings`):

- positional arguments in 0.1's order (``MainSubsidiaryPruning(0.4, 200, 400)``,
  ``GreedyFilterPruning("l1", 0.4)``), passed on by keyword;
- a renamed keyword (``lambda_kd`` -> ``selector_distill``), passed on under its new name;
- a target that had a default in 0.1 and is required now (``GreedyFilterPruning()``).

Everything here goes in 0.3.0: delete the decorators and this module.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["REMOVED_IN", "accepts_old_spellings", "gate_init_rename"]

#: The release that drops 0.1's spellings.
REMOVED_IN = "0.3.0"

#: A renamed keyword: the new name, or ``(value, arguments) -> (new name, new value)`` where the
#: new spelling depends on the other arguments (``arguments``: the call's, over the defaults).
Rename = Union[str, Callable[[Any, Mapping[str, Any]], Tuple[str, Any]]]


def _warn(message: str) -> None:
    # stacklevel 3: the user's call (this helper, then the wrapper)
    warnings.warn(f"{message}; 0.1's spelling is deprecated and fails from {REMOVED_IN}", FutureWarning, stacklevel=3)


def accepts_old_spellings(
    old_order: Sequence[str],
    *,
    positional: int = 1,
    first_is_old: Optional[Callable[[Any], bool]] = None,
    renamed: Optional[Mapping[str, Rename]] = None,
    old_defaults: Optional[Mapping[str, Any]] = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate a callback's ``__init__`` so that 0.1's calls still run, each with a ``FutureWarning``.

    Args:
        old_order: the parameters in 0.1's positional order.
        positional: how many leading arguments the new signature takes positionally (1: the
            target; 0: keyword-only). More than that are read in ``old_order``.
        first_is_old: whether a lone first positional argument belongs to 0.1's order although
            its count is allowed (``GreedyFilterPruning("l1")``: a criterion where the target now is).
        renamed: 0.1's keyword names, with their new spelling (:data:`Rename`).
        old_defaults: required parameters that had a default in 0.1, with that default.

    Raises:
        TypeError: as Python's own for a call that neither spelling accepts (too many positional
            arguments, one argument given twice, both an old and a new name).
    """
    renamed = dict(renamed or {})
    old_defaults = dict(old_defaults or {})

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        owner = init.__qualname__.split(".")[0]
        params = [p for name, p in inspect.signature(init).parameters.items() if name != "self"]
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        leading = [p.name for p in params[:positional]]
        keyword_only = f"{owner}'s arguments after {leading[-1]} are" if leading else f"{owner}'s arguments are"

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            old = len(args) > positional or (bool(args) and first_is_old is not None and first_is_old(args[0]))
            if old:
                if len(args) > len(old_order):
                    raise TypeError(f"{owner}() takes at most {len(old_order)} positional arguments in 0.1's order "
                                    f"({positional} now), got {len(args)}")
                named = dict(zip(old_order, args))
                twice = sorted(set(named) & set(kwargs))
                if twice:
                    raise TypeError(f"{owner}() got multiple values for argument {twice[0]!r}")
                _warn(f"{keyword_only} keyword-only: pass {', '.join(n for n in named if n not in leading)} by keyword")
                kwargs, args = {**named, **kwargs}, ()
            for name, rename in renamed.items():
                if name not in kwargs:
                    continue
                value = kwargs.pop(name)
                new, value = (rename, value) if isinstance(rename, str) else rename(value, {**defaults, **kwargs})
                if new in kwargs:
                    raise TypeError(f"{owner}() got both {name!r} (0.1's name) and {new!r}: pass {new!r} only")
                _warn(f"{owner}({name}=...) is now {owner}({new}=...)")
                kwargs[new] = value
            for name, value in old_defaults.items():
                if name not in kwargs and not args and "target_speedup" not in kwargs:  # the other target
                    _warn(f"{owner}() without {name} used {name}={value!r}; pass it: {owner}({name}={value!r}, ...)")
                    kwargs[name] = value
            init(self, *args, **kwargs)

        return __init__

    return decorate


def gate_init_rename(value: Any, arguments: Mapping[str, Any]) -> Tuple[str, Any]:
    """0.1's ``gate_init`` of ``MainSubsidiaryPruning`` was two things: the starting logit of gates
    started open (``gate_init_criterion=None``) and, with a criterion, the spread of the ranked
    logits, where 0 meant the least spread, 0.01."""
    if arguments.get("gate_init_criterion") is None:
        return "gate_init_logit", value
    return "gate_init_spread", (value or 0.01) if value is not None else None

