"""Progress output: a tqdm bar on a terminal, plain lines in a log file.

A tqdm bar redraws itself with carriage returns; redirected to a file that is
thousands of ``\\r`` updates per epoch. Every progress bar in mmrec therefore goes
through :func:`progress_bar`, which shows a bar only when it is wanted *and*
stderr is a terminal; code that reports per-epoch state asks :func:`log_lines`
whether to print one plain line instead.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

__all__ = ["stderr_is_tty", "show_bar", "log_lines", "progress_bar", "log"]


def stderr_is_tty() -> bool:
    """Whether ``sys.stderr`` (where tqdm draws) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def show_bar(enabled: bool = True) -> bool:
    """Draw a bar: progress is wanted and stderr is a terminal."""
    return bool(enabled) and stderr_is_tty()


def log_lines(enabled: bool = True) -> bool:
    """Print plain progress lines instead: progress is wanted but stderr is not a terminal."""
    return bool(enabled) and not stderr_is_tty()


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled unless :func:`show_bar` (``enabled`` and a TTY)."""
    kwargs.pop("disable", None)
    return tqdm(iterable, disable=not show_bar(enabled), **kwargs)


def log(message: str) -> None:
    """One progress line on stderr (flushed, so a tailed log file follows along)."""
    print(message, file=sys.stderr, flush=True)
