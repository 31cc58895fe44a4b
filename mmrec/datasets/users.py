"""Optional ``users.tsv`` of a canonical directory: user side columns (age, gender, ...).

The main loader does not read it (no model needs user attributes for ranking); the
joint-task / multi-scenario heads do (scenarios from a user column, side features), so
they read it on demand with :func:`read_users`. Columns are kept as strings aligned to
the dataset's user index; users missing from the file get ``""``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mmrec.errors import DataError

USERS_FILE = "users.tsv"


@dataclass
class UserTable:
    """String columns of ``users.tsv``, row u = user index u of the dataset."""

    path: Path
    columns: dict[str, np.ndarray]          # name -> object array [n_users] of str ('' missing)
    missing_users: int = 0                  # dataset users without a row in the file
    unknown_users: int = 0                  # file rows whose user is not in the dataset (ignored)

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise DataError(f"no column '{name}'; the file has: {', '.join(self.columns) or '(none)'}",
                            file=self.path, field=name)
        return self.columns[name]


def read_users(root: str | Path | None, user_ids: Sequence[str]) -> UserTable:
    """Read ``root/users.tsv`` (header row, a ``user`` column, any other columns).

    A duplicated user or a row with the wrong number of fields is a :class:`DataError`
    naming the file and line.
    """
    if root is None:
        raise DataError(f"this dataset has no directory, so no {USERS_FILE} (user columns need one)",
                        field="users")
    path = Path(root) / USERS_FILE
    if not path.is_file():
        raise DataError(f"{USERS_FILE} not found (user columns such as age or gender live there)", file=path)
    index = {str(u): i for i, u in enumerate(user_ids)}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise DataError("empty file", file=path) from None
        if "user" not in header:
            raise DataError(f"missing column 'user' (header has: {', '.join(header)})", file=path, line=1,
                            field="user")
        if len(set(header)) != len(header):
            raise DataError("a column name appears twice in the header", file=path, line=1)
        ucol = header.index("user")
        names = [h for h in header if h != "user"]
        cols = {h: np.full(len(index), "", dtype=object) for h in names}
        seen = np.zeros(len(index), dtype=bool)
        unknown = 0
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"expected {len(header)} fields, got {len(row)}", file=path, line=line)
            u = index.get(row[ucol])
            if u is None:
                unknown += 1
                continue
            if seen[u]:
                raise DataError(f"user '{row[ucol]}' appears twice", file=path, line=line, field="user")
            seen[u] = True
            for j, h in enumerate(header):
                if j != ucol:
                    cols[h][u] = row[j].strip()
    return UserTable(path, cols, missing_users=int((~seen).sum()), unknown_users=unknown)


__all__ = ["UserTable", "read_users", "USERS_FILE"]
