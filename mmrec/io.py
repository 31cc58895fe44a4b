"""Small file helpers: atomic writes so that no partial output looks complete."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mmrec.errors import MMRecError

#: errno values that mean "the file system is full" (disk space, or the user's quota).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: How writers that hide the errno say it: safetensors ("os error 28"), torch's zip writer (nothing
#: but a position mismatch: it is blamed on space only when the file system is then nearly full).
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_OPAQUE_WRITE_FAILURE = ("unexpected pos", "file write failed")
_NEARLY_FULL = 1 << 20


class OutOfSpaceError(MMRecError):
    """An output does not fit on its file system (found before a run, or by a write that failed)."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    A write that fails for want of space (ENOSPC / EDQUOT, however the writer reports it)
    becomes an :class:`OutOfSpaceError` naming ``path``; the previous ``path`` is untouched
    and the temporary file removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in NO_SPACE:
            raise _no_space(path) from None
        raise
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except MMRecError:
        raise
    except Exception as e:
        if _is_no_space(e, path.parent):
            raise _no_space(path) from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _is_no_space(e: BaseException, directory: Path) -> bool:
    if isinstance(e, OSError) and e.errno in NO_SPACE:
        return True
    text = str(e)
    if any(s in text for s in _NO_SPACE_TEXT):
        return True
    if isinstance(e, RuntimeError) and any(s in text for s in _OPAQUE_WRITE_FAILURE):
        try:
            return shutil.disk_usage(directory).free < _NEARLY_FULL
        except OSError:
            return False
    return False


def _no_space(path: Path) -> OutOfSpaceError:
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    return OutOfSpaceError(f"cannot write {path}: no space left on device ({free}); {kept}; "
                           f"free some space (or choose another --out) and run again")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (indent 2, sorted keys stay as given)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
