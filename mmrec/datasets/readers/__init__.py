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


#: Index spaces (users or items numbered 0..n-1 by the file) larger than this, and far larger
#: than the rows that use them, are refused: building 10^12 ids would exhaust memory (a hang).
MAX_SPARSE_INDEX = 1_000_000


def check_index_space(n: int, n_used: int, file: object, what: str, line: int | None = None,
                      field: str | None = None) -> None:
    """A DataError when a format that numbers ids by index claims ``n`` ids for ``n_used`` rows.

    MMRec and MB-GMN files size the id space by the largest index (or the matrix shape),
    so one corrupt number would allocate that many ids. Up to ``MAX_SPARSE_INDEX`` ids, or
    100 per row, are always accepted (cold items are legitimate).
    """
    from mmrec.errors import DataError
    if n > index_space_limit(n_used):
        raise DataError(f"{n} {what} for only {n_used} rows: ids are 0-based indices, so the largest one "
                        f"sizes the index; this looks like a corrupt or mistyped id", file=file, line=line, field=field)


def index_space_limit(n_used: int) -> int:
    """The most ids :func:`check_index_space` accepts for ``n_used`` rows."""
    return max(MAX_SPARSE_INDEX, 100 * max(n_used, 1))
