"""Errors that point the user at the exact place in their data."""

from __future__ import annotations

from pathlib import Path


class MMRecError(Exception):
    """Base class of every error mmrec raises on purpose."""


class DataError(MMRecError, ValueError):
    """Bad input data: names the file, the line (1-based, header = line 1) and the field.

    Users fix data in editors, so the location is the useful part of the message.
    """

    def __init__(self, message: str, file: str | Path | None = None,
                 line: int | None = None, field: str | None = None) -> None:
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        where = []
        if self.file:
            where.append(self.file)
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class ConfigError(MMRecError, ValueError):
    """A bad configuration value or an unknown registry name."""
