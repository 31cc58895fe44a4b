"""Name -> builder registries (timm style) instead of if/else chains over names."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from mmrec.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A case-insensitive map from a public name to a class or factory.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("bprmf")
    ... class BPRMF: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        key = name.lower()

        def add(o: T) -> T:
            if key in self._items and self._items[key] is not o:
                raise ConfigError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise ConfigError(self.unknown_message(name))
        return self._items[key]

    def unknown_message(self, name: str) -> str:
        """``unknown model 'lightgnc'; did you mean 'lightgcn'? known: ...`` (typos are the usual cause)."""
        known = sorted(self._items)
        close = difflib.get_close_matches(str(name).lower(), known, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}? " if close else "; "
        return f"unknown {self.kind} '{name}'{hint}known: {', '.join(known) or '(none)'}"

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)


# The registries the CLI exposes (names are a DESIGN.md contract).
MODELS: Registry = Registry("model")
FUSIONS: Registry = Registry("fusion")
FILTRATIONS: Registry = Registry("filtration")
ENHANCEMENTS: Registry = Registry("enhancement")
HEADS: Registry = Registry("head")
ENCODERS: Registry = Registry("encoder")
READERS: Registry = Registry("data format")
SPLITS: Registry = Registry("split")
