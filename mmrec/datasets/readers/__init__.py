"""Dataset readers: one small module per on-disk format, each registered in ``READERS``.

A reader is a :class:`Reader` record (how to read, how to recognise the format,
and what it looks for, so an undetectable directory gets a useful error). Modules
register on import; :func:`import_all_readers` imports them all, in detection
priority order (lowest first).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from mmrec.registry import READERS

# Modules that register readers (canonical first: its file names are the most specific).
READER_MODULES = (
    "mmrec.datasets.canonical",
    "mmrec.datasets.readers.csv_format",
    "mmrec.datasets.readers.mmrec_format",
    "mmrec.datasets.readers.recbole",
    "mmrec.datasets.readers.mbgmn",
)

# Known behavior names by cascade stage: browsing < collecting < carting < buying.
# Used to order behaviors when nothing else says (no dataset.yaml, or formats with
# one file per behavior and so no row order to go by).
CASCADE_RANK = {"view": 0, "pv": 0, "click": 0, "fav": 1, "collect": 1,
                "cart": 2, "buy": 3, "purchase": 3}

ON_UNSEEN = ("drop", "error")


@dataclass(frozen=True)
class Reader:
    """A registered format: ``read(path, *, on_unseen, **opts)`` and ``detect(path)``."""

    name: str
    read: Callable
    detect: Callable[[Path], bool]
    looks_for: str
    priority: int


def register_reader(name: str, *, detect: Callable[[Path], bool], looks_for: str,
                    priority: int) -> Callable[[Callable], Callable]:
    """Decorator registering a read function under ``name`` in ``READERS``."""

    def add(read: Callable) -> Callable:
        READERS.register(name, Reader(name, read, detect, looks_for, priority))
        return read

    return add


def import_all_readers() -> None:
    for module in READER_MODULES:
        importlib.import_module(module)


def all_readers() -> list[Reader]:
    """Every registered reader, in detection priority order."""
    import_all_readers()
    return sorted((READERS.get(n) for n in READERS), key=lambda r: (r.priority, r.name))


def cascade_order(names: Iterable[str]) -> list[str] | None:
    """Names sorted by known cascade stage (stable), or None if any name is unknown."""
    names = list(names)
    if not names or any(n.lower() not in CASCADE_RANK for n in names):
        return None
    return sorted(names, key=lambda n: CASCADE_RANK[n.lower()])


def check_on_unseen(on_unseen: str) -> None:
    from mmrec.errors import ConfigError
    if on_unseen not in ON_UNSEEN:
        raise ConfigError(f"on_unseen must be one of {', '.join(ON_UNSEEN)}, not '{on_unseen}'")
