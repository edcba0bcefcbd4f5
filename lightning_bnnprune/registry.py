"""Name -> class (or function) registries: what a config or a callback argument picks by name.

One helper for the kinds the library resolves by name: quantizers (``"xnor"``), greedy criteria
(``"l1"``), datamodules (``"digits"``) and export targets (``"packed"``, functions). In the manner
of larq's ``quantizers.get``, a class registers itself under an alias with a decorator, and an
unknown name fails loudly, listing the registered ones::

    >>> criteria = Registry("criterion", "criteria")
    >>> @criteria.register("ones")
    ... class Ones:
    ...     pass
    >>> criteria.available(), Ones.alias
    (('ones',), 'ones')
    >>> criteria.create("twos")
    Traceback (most recent call last):
    ...
    ValueError: Unknown criterion 'twos'; registered criteria: ones
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Optional, Tuple, TypeVar

__all__ = ["Registry"]

T = TypeVar("T", bound=Callable[..., Any])  # a class, or a function (export targets)


class Registry(Generic[T]):
    """Classes (or functions) registered under aliases.

    Args:
        kind: what one entry is, for messages (``"quantizer"``).
        plural: the plural, for messages (``"quantizers"``).
        unknown: the message for an unknown name, a format string with ``{kind}``, ``{plural}``,
            ``{name}`` (the name's ``repr``), ``{choices}`` (comma-separated) and ``{choice_list}``
            (a list's ``repr``); default ``"Unknown {kind} {name}; registered {plural}: {choices}"``.
    """

    def __init__(self, kind: str, plural: str, unknown: Optional[str] = None) -> None:
        self.kind, self.plural = kind, plural
        self.unknown = unknown or "Unknown {kind} {name}; registered {plural}: {choices}"
        self._classes: Dict[str, T] = {}

    def register(self, alias: str) -> Callable[[T], T]:
        """Class (or function) decorator: make it resolvable as ``alias`` (and set its ``alias``).

        Raises:
            ValueError: if ``alias`` is taken by another class (re-importing the same class is fine).
        """

        def wrap(cls: T) -> T:
            old = self._classes.get(alias)
            if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"{self.kind} {alias!r} is already registered as {old.__name__}")
            self._classes[alias] = cls
            cls.alias = alias
            return cls

        return wrap

    def available(self) -> Tuple[str, ...]:
        """The registered aliases, sorted."""
        return tuple(sorted(self._classes))

    def __contains__(self, alias: object) -> bool:
        return alias in self._classes

    def __getitem__(self, alias: str) -> T:
        """The class registered as ``alias``.

        Raises:
            ValueError: for an unknown alias, naming the registered ones.
        """
        if alias not in self._classes:
            choices = self.available()
            raise ValueError(self.unknown.format(kind=self.kind, plural=self.plural, name=repr(alias),
                                                 choices=", ".join(choices), choice_list=list(choices)))
        return self._classes[alias]

    def create(self, alias: str, **kwargs: Any) -> Any:
        """An instance of the class registered as ``alias``, built with ``kwargs`` (a keyword the
        class does not take is a ``TypeError``)."""
        return self[alias](**kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.plural}: {', '.join(self.available()) or '(none)'})"

