"""One entry point for every dataset: a directory in any readable format, or ``synthetic:<preset>``.

The format is auto-detected from the files present (readers registered in
``mmrec.registry.READERS`` each say what they look for), or forced with ``format=``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from mmrec.datasets.readers import all_readers, check_on_unseen, import_all_readers
from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError, DataError
from mmrec.registry import READERS

SYNTHETIC_PREFIX = "synthetic:"


def load_dataset(spec: str | Path, format: str | None = None, *, seed: int = 0, on_unseen: str = "drop",
                 **opts: Any) -> Dataset:
    """Load ``spec``: a directory (format auto-detected unless ``format`` names one) or ``synthetic:<preset>``.

    ``on_unseen`` says what to do with held-out rows whose user or item never
    appears in training ("drop": count in ``report["unseen"]`` and skip; "error").
    Other keyword options go to the reader (e.g. ``verify_media=True`` for the
    canonical reader) or to the synthetic world; an option the reader does not
    take is an error.
    """
    if isinstance(spec, str) and spec.startswith(SYNTHETIC_PREFIX):
        if format not in (None, "synthetic"):
            raise ConfigError(f"format='{format}' does not apply to '{spec}'")
        from mmrec.datasets.synthetic import make_world  # written separately; imported only when used
        return make_world(spec[len(SYNTHETIC_PREFIX):], seed=seed, **opts)
    check_on_unseen(on_unseen)
    path = _directory(spec)
    import_all_readers()
    reader = READERS.get(format if format is not None else detect_format(path))
    _check_options(reader.name, reader.read, opts)
    return reader.read(path, on_unseen=on_unseen, **opts)


def detect_format(path: str | Path) -> str:
    """The name of the first registered reader (by priority) that recognises ``path``."""
    path = _directory(path)
    readers = all_readers()
    for reader in readers:
        if reader.detect(path):
            return reader.name
    looked = "; ".join(f"{r.name}: {r.looks_for}" for r in readers)
    raise DataError(f"cannot tell the data format of this directory. Looked for: {looked}. "
                    f"Use format=... (--format) to force one", file=path)


def _directory(spec: str | Path) -> Path:
    path = Path(spec)
    if not path.exists():
        raise DataError("no such file or directory (expected a dataset directory or synthetic:<preset>)",
                        file=path)
    return path if path.is_dir() else path.parent


def _check_options(name: str, read: Any, opts: dict[str, Any]) -> None:
    params = inspect.signature(read).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and p != "on_unseen"]
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise ConfigError(f"the '{name}' reader does not take option(s) {', '.join(unknown)}; "
                          f"it takes: {', '.join(accepted) or 'none'}")
