"""Named implementations of one concept (token mixers, samplers, dataset kinds, objectives, zoo models).

Every extension point of the project is a :class:`Registry`: a new mixer, sampler, dataset kind or objective
is one module with one registration, and the config, the command lines and the code that builds it ask the
registry by name instead of branching on names::

    MIXERS = Registry("mixer")

    @MIXERS.register("attention")
    class Attention(TokenMixer): ...

    MIXERS["attention"]          # the class; an UnknownNameError naming the registered ones otherwise
    "gspn" in MIXERS, list(MIXERS)

:func:`keyword_options` reads the keyword options a registered callable takes from its signature: what the
config accepts for it, checked as it checks its own keys.
"""
from __future__ import annotations

import difflib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

from dit_gspn.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, ValueError):
    """A name that no entry of a registry has; the message lists the registered names."""


class Registry(Generic[T]):
    """Entries of one kind (``what``, e.g. "sampler") by name, in registration order."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """Register ``entry`` as ``name`` (returns it), or used as ``@registry.register(name)``. A name taken by
        another entry is an error: unregister it first to replace it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")

        def add(value: T) -> T:
            if name in self._entries and self._entries[name] is not value:
                raise ValueError(f"{self.what} {name!r} is registered already ({self._entries[name]!r})")
            self._entries[name] = value
            return value

        return add if entry is None else add(entry)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry (tests that register a toy entry put things back so)."""
        return self._entries.pop(self._check(name))

    def _check(self, name) -> str:
        if name in self._entries:
            return name
        close = difflib.get_close_matches(str(name), self._entries, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownNameError(f"unknown {self.what} {name!r}{hint}; choose one of {', '.join(self._entries)}")

    def __getitem__(self, name: str) -> T:
        return self._entries[self._check(name)]

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return list(self._entries.items())

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


@dataclass(frozen=True)
class Option:
    """One keyword option of a registered callable: its name, type hint (``Any`` when the signature has none)
    and default (``inspect.Parameter.empty`` when it is required)."""

    name: str
    type: Any
    default: Any

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def keyword_options(function: Callable, skip: tuple[str, ...] = (), skip_positional: int = 0) -> dict[str, Option]:
    """The keyword options ``function`` (or a class's ``__init__``) takes, by name, leaving out ``self``/``cls``,
    ``*args``/``**kwargs``, the first ``skip_positional`` parameters and the names in ``skip`` (what its caller
    passes itself)."""
    target = function.__init__ if inspect.isclass(function) else function
    hints = typing.get_type_hints(target)
    parameters = [p for name, p in inspect.signature(target).parameters.items() if name not in ("self", "cls")]
    options = {}
    for parameter in parameters[skip_positional:]:
        if parameter.name in skip or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        options[parameter.name] = Option(parameter.name, hints.get(parameter.name, Any), parameter.default)
    return options
