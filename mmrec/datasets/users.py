"""Optional ``users.tsv`` of a canonical directory: user side columns (age, gender, ...).

The main loader does not read it (no model needs user attributes for ranking); the
joint-task / multi-scenario heads do (scenarios from a user column, side features), so
they read it on demand with :func:`read_users`. Columns are kept as strings aligned to
the dataset's user index; users missing from the file get ``""``.
"""

from __future__ import annotations

import csv
import io
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
    lines: np.ndarray | None = None         # [n_users] the file line of each user's row (0: no row)

    def column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise DataError(f"no column '{name}'; the file has: {', '.join(self.columns) or '(none)'}",
                            file=self.path, field=name)
        return self.columns[name]

    def error(self, user: int, name: str, message: str) -> DataError:
        """A :class:`DataError` at the file line of user index ``user``'s row, field ``name``."""
        line = int(self.lines[user]) if self.lines is not None and self.lines[user] > 0 else None
        return DataError(message, file=self.path, line=line, field=name)


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
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is not part of the header
    except UnicodeDecodeError as e:  # the line and byte, as the interaction readers say it
        start = raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"not valid UTF-8 (byte {e.start - start + 1} of the line)", file=path,
                        line=raw.count(b"\n", 0, e.start) + 1) from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    try:
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
        lines = np.zeros(len(index), dtype=np.int64)
        unknown = 0
        for row in reader:
            line = reader.line_num  # the row's last physical line (a quoted field may span lines)
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"expected {len(header)} fields, got {len(row)}", file=path, line=line)
            u = index.get(row[ucol])
            if u is None:
                unknown += 1
                continue
            if lines[u]:
                raise DataError(f"user '{row[ucol]}' appears twice (first on line {lines[u]})", file=path,
                                line=line, field="user")
            lines[u] = line
            for j, h in enumerate(header):
                if j != ucol:
                    cols[h][u] = row[j].strip()
    except csv.Error as e:  # e.g. a field over csv's size limit (a lost closing quote)
        raise DataError(f"cannot parse the row: {e}", file=path, line=reader.line_num or None) from None
    seen = lines > 0
    return UserTable(path, cols, missing_users=int((~seen).sum()), unknown_users=unknown, lines=lines)


__all__ = ["UserTable", "read_users", "USERS_FILE"]
