"""One registry idea for everything mergebench looks up by name: methods, suites, leaderboard formats.

A :class:`Registry` maps names to entries of one kind. It records the module that defined each entry, keeps
aliases for renamed entries (records store names, so an old name must keep resolving), holds lazy
``"module:attr"`` entries that are imported on first use, discovers external entries through an entry-point
group, lists names with shell-style wildcards and answers an unknown name with its close matches::

    SUITES = Registry("suite", group="mergebench.suites", builtins="mergebench.suites.builtin")

    @SUITES.register                          # the name defaults to the function's name
    def micro(build: bool = True, verbose: bool = True): ...

    SUITES.register_lazy("real", "mergebench.suites.real:real_suite")
    SUITES.alias("mini-8", "mini8")           # an old name keeps resolving
    SUITES.get("mcro")                        # UnknownNameError: unknown suite 'mcro'; did you mean: micro?
    SUITES.names("mini*")                     # ['mini8', 'mini8-lora']

``builtins`` is a module imported before the first lookup (its definitions register on import); ``group`` is
the entry-point group of external packages (a module, whose registrations run on import, or a
``module:object``; an object that did not register itself is passed to ``on_entry_point``). A plugin that
fails to load is reported (``plugin_errors``), never fatal.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, Iterator, TypeVar

from mergebench.errors import NotFoundError

T = TypeVar("T")


class UnknownNameError(NotFoundError):
    """A name no registry entry has (the message lists close matches and how to list them all)."""


def close_matches(name: str, candidates) -> str:
    """'; did you mean: a, b?' for error messages (empty if nothing is close)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    if not found:
        found = [c for c in candidates if name.lower() in c.lower()][:3]
    return f"; did you mean: {', '.join(found)}?" if found else ""


def qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T | None            # None until a lazy entry is imported
    module: str              # the module that defines it
    target: str = ""         # "module:attr" of a lazy entry


class Registry(Generic[T]):
    """Named entries of one kind (see the module docstring)."""

    def __init__(self, kind: str, group: str | None = None, builtins: str | None = None, listing: str = "",
                 on_entry_point: Callable[[str, Any], None] | None = None, identity: Callable[[T], Any] | None = None,
                 error: type[UnknownNameError] = UnknownNameError):
        self.kind = kind
        self.group = group
        self.builtins = builtins
        self.listing = listing                      # how a user lists them, for error messages
        self.on_entry_point = on_entry_point
        self.error = error                          # raised for an unknown name (a subclass of UnknownNameError)
        self._identity = identity or (lambda obj: qualname(obj))  # the same definition registered again
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}
        self.plugin_errors: dict[str, str] = {}
        self._discovered = False

    # ------------------------------------------------------------ registration
    def register(self, name_or_obj: str | T | None = None, *, aliases: tuple | list = (),
                 module: str | None = None):
        """``@registry.register`` / ``@registry.register("name")`` / ``registry.register("name")(obj)``.

        The name defaults to the object's ``__name__``. Registering another definition under a taken name is an
        error; the same definition again (a module imported twice, reloaded) replaces it."""
        if name_or_obj is not None and not isinstance(name_or_obj, str):
            return self.register(None, aliases=aliases, module=module)(name_or_obj)

        def decorator(obj: T) -> T:
            self.add(name_or_obj or obj.__name__, obj, aliases=aliases, module=module)
            return obj

        return decorator

    def add(self, name: str, obj: T, *, aliases: tuple | list = (), module: str | None = None) -> T:
        """Register ``obj`` under ``name`` (the non-decorator form)."""
        previous = self._entries.get(name)
        if previous is not None and previous.obj is not None and previous.obj is not obj \
                and self._identity(previous.obj) != self._identity(obj):
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._identity(previous.obj)}")
        if name in self._aliases:
            raise ValueError(f"{self.kind} name {name!r} is an alias of {self._aliases[name]!r}")
        self._entries[name] = Entry(name, obj, module or getattr(obj, "__module__", "") or "")
        for old in aliases:
            self.alias(old, name)
        return obj

    def register_lazy(self, name: str, target: str, *, aliases: tuple | list = ()) -> None:
        """An entry imported on first use: ``target`` is ``"package.module:attribute"``."""
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"lazy {self.kind} {name!r}: target {target!r} is not 'module:attribute'")
        if name in self._entries and self._entries[name].obj is not None:
            raise ValueError(f"{self.kind} {name!r} is already registered by {self._entries[name].module}")
        self._entries[name] = Entry(name, None, module, target)
        for old in aliases:
            self.alias(old, name)

    def alias(self, old: str, new: str) -> None:
        """``old`` resolves to ``new`` from now on (an entry renamed; records and scripts keep the old name)."""
        if old in self._entries:
            raise ValueError(f"cannot alias {old!r} to {new!r}: {old!r} is a registered {self.kind}")
        self._aliases[old] = new

    def unregister(self, name: str) -> None:
        """Remove an entry and the aliases pointing at it (tests and plugin development)."""
        self._entries.pop(name, None)
        for old in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[old]

    # ------------------------------------------------------------ lookup
    def discover(self, force: bool = False) -> dict[str, str]:
        """Import the built-ins and every entry point of the group; returns the plugins that failed to load."""
        if self._discovered and not force:
            return dict(self.plugin_errors)
        self._discovered = True
        if self.builtins:
            importlib.import_module(self.builtins)
        if self.group:
            for ep in entry_points(group=self.group):
                try:
                    obj = ep.load()
                    if self.on_entry_point is not None and not inspect.ismodule(obj):
                        self.on_entry_point(ep.name, obj)
                # a broken plugin must not take the harness down: an import error, a name a built-in has, a
                # function the registry refuses, a module that ends the process at import (argparse: SystemExit)
                except (Exception, SystemExit) as e:
                    reason = f"exited with status {e.code}" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
                    self.plugin_errors[ep.name] = reason
                    warnings.warn(f"mergebench {self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {reason}",
                                  stacklevel=2)
        return dict(self.plugin_errors)

    def canonical(self, name: str) -> str:
        """``name`` with aliases followed (unknown names are returned as they are)."""
        self.discover()
        seen = set()
        while name in self._aliases and name not in seen:
            seen.add(name)
            name = self._aliases[name]
        return name

    def __contains__(self, name: str) -> bool:
        return self.canonical(name) in self._entries

    def get(self, name: str) -> T:
        """The entry named ``name`` (or an alias of it); :class:`UnknownNameError` with close matches."""
        key = self.canonical(name)
        entry = self._entries.get(key)
        if entry is None:
            known = list(self._entries) + list(self._aliases)
            hint = f" ({self.listing})" if self.listing else f" ({self.kind}s: {', '.join(self.names())})"
            raise self.error(f"unknown {self.kind} {name!r}{close_matches(name, known)}{hint}")
        if entry.obj is None:
            module, _, attr = entry.target.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            if self._entries.get(key) is entry and entry.obj is None:  # importing may have registered it already
                entry.obj = obj
        return self._entries[key].obj

    def module_of(self, name: str) -> str:
        """The module that defines the entry (for a lazy one, without importing it)."""
        return self._entries[self.canonical(name)].module

    def names(self, pattern: str | list[str] = "*", sort: bool = False) -> list[str]:
        """Registered names matching shell-style wildcards (registration order, or sorted)."""
        self.discover()
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        out = [n for n in self._entries if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        return sorted(out) if sort else out

    def items(self) -> Iterator[tuple[str, T]]:
        for name in self.names():
            yield name, self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


def parse_bool(text: str) -> bool | None:
    """True or False for the words a command line spells them with (1/true/yes/on, 0/false/no/off, any case); None
    for anything else."""
    word = text.lower()
    return True if word in ("1", "true", "yes", "on") else False if word in ("0", "false", "no", "off") else None
