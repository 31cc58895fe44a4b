"""Run directories: writable before work starts, one writer at a time, and a record of what made them.

* :func:`prepare_run_dir` creates ``RUN`` and proves it writable (a temporary file), so a
  read-only ``--out`` fails before data loading and training, not after the first epoch.
* :func:`run_lock` holds ``fcntl.flock`` on ``RUN/.lock`` for the command's lifetime: a second
  ``mmrec train`` / ``pretrain`` / ``evaluate`` on the same directory fails at once with the
  holder's pid and command instead of interleaving checkpoints and logs. The OS drops the lock
  when the holder exits or crashes (even ``kill -9``), so no stale lock is ever left to clean
  up; the file itself stays (deleting it would let two processes lock different inodes).
* :func:`check_free_space` refuses a run whose file system cannot hold what it will write
  (an estimate: :func:`training_bytes`, or the caller's) before the work starts; an output
  write that still runs out of space is an :class:`mmrec.io.OutOfSpaceError` naming the file.
* :func:`output_lock` / :func:`holds_output` do for an output *file* (``mmrec extract``) what
  the run lock does for a directory, with ``OUT.lock`` beside it.
* :func:`write_provenance` stores ``RUN/provenance.json``: package versions and a fingerprint
  of the data (:func:`mmrec.pipeline.data_fingerprint`, the one the pipeline reuses stages
  by); :func:`check_provenance` warns when ``evaluate`` / ``recommend`` read changed data.

See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from mmrec.errors import MMRecError

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"
PROVENANCE = "provenance.json"
#: Per-file hashes are kept in provenance.json up to this many files (then only their digest),
#: so a changed-data warning can name the files.
MAX_LISTED_FILES = 2000
#: Packages whose versions decide the numbers a run produces.
VERSIONED = ("torch", "numpy", "scipy", "torch_geometric", "safetensors")

F = TypeVar("F", bound=Callable[..., Any])

#: Free space every writing command needs, whatever it writes (logs, config, metrics, file-system slack);
#: checked when the output directory is prepared, before any data is read.
MIN_FREE_BYTES = 16 << 20
#: An estimate is multiplied by this before it is compared with the free space (the estimates leave out
#: logs, metrics and the file system's own overhead, and models grow buffers while training).
SPACE_MARGIN = 1.25


class RunLockedError(MMRecError):
    """Another process holds the run directory's lock."""


class ProvenanceWarning(UserWarning):
    """The data (or the packages) a run reads now are not those it was trained with."""


# -- the directory ------------------------------------------------------------------------------
def prepare_run_dir(path: str | Path, kind: str = "run directory") -> Path:
    """Create ``path`` (and parents), prove it writable and not full, or raise an error naming it.

    ``kind`` names the directory in messages ("output directory" for ``export`` / ``extract``).
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a directory" if blocker is not None else (e.strerror or str(e))
        raise MMRecError(f"cannot create {kind} {path}: {why}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmrec-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MMRecError(f"{kind} {path} is not writable ({e.strerror or e}); "
                         f"choose another --out or fix its permissions") from None
    check_free_space(path, 0, "any mmrec output")
    return path


# -- free space ---------------------------------------------------------------------------------
def _size(n: int, exact: bool = True) -> str:
    """``512 bytes``, ``1.5 MiB (1,572,864 bytes)`` (``exact=False``: without the byte count)."""
    if abs(n) < 1024:
        return f"{n} bytes"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        x /= 1024
        if abs(x) < 1024 or unit == "PiB":
            break
    return f"{x:.1f} {unit} ({n:,} bytes)" if exact else f"{x:.1f} {unit}"


def check_free_space(directory: str | Path, estimate: int, what: str) -> int:
    """Refuse (:class:`mmrec.io.OutOfSpaceError`) when ``directory``'s file system has too little room.

    Needed: ``estimate * SPACE_MARGIN + MIN_FREE_BYTES``. ``what`` says what the estimate is
    of, for the message. Returns the free bytes. A file system that cannot report its usage
    is not checked (a write that then fails is still reported by :func:`mmrec.io.atomic_path`).
    """
    from mmrec.io import OutOfSpaceError
    try:
        free = int(shutil.disk_usage(directory).free)
    except OSError:
        return -1
    need = int(max(estimate, 0) * SPACE_MARGIN) + MIN_FREE_BYTES
    if free < need:
        detail = (f"{what} is estimated at {_size(estimate)}, plus {round((SPACE_MARGIN - 1) * 100)}% "
                  f"and {_size(MIN_FREE_BYTES, exact=False)} of headroom"
                  if estimate > 0 else f"{_size(MIN_FREE_BYTES, exact=False)} is the least {what} needs")
        raise OutOfSpaceError(f"not enough free space in {directory}: {_size(free)} free, "
                              f"{_size(need, exact=False)} needed ({detail}); free some space or choose another --out")
    return free


def state_bytes(model: Any, trainable_copies: int = 0) -> int:
    """Bytes of ``model``'s state dict plus ``trainable_copies`` more of its trainable parameters.

    Adam / AdamW keep two tensors per trainable parameter (``exp_avg``, ``exp_avg_sq``), so an
    optimizer checkpoint is ``state_bytes(model, 2)``.
    """
    saved = sum(_tensor_bytes(t) for t in model.state_dict().values() if hasattr(t, "element_size"))
    trainable = sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    return saved + trainable_copies * trainable


def _tensor_bytes(t: Any) -> int:
    """Stored bytes: a sparse tensor (a graph buffer) by its indices and values, not its dense shape."""
    import torch
    if t.layout == torch.sparse_coo:
        return _tensor_bytes(t._indices()) + _tensor_bytes(t._values())
    if t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        compressed, plain = ((t.crow_indices(), t.col_indices()) if t.layout in (torch.sparse_csr, torch.sparse_bsr)
                             else (t.ccol_indices(), t.row_indices()))
        return _tensor_bytes(compressed) + _tensor_bytes(plain) + _tensor_bytes(t.values())
    return int(t.numel()) * int(t.element_size())


def training_bytes(model: Any, run_dir: str | Path, files: Iterable[str] = ("checkpoint.pt", "best.safetensors"),
                   best_copies: int = 1) -> int:
    """What a training run will add to ``run_dir`` at its peak (the estimate of :func:`check_free_space`).

    Every epoch rewrites ``checkpoint.pt`` (weights + Adam's two moments: about 3x the parameter
    bytes) through a temporary file, so for a moment the old and the new one coexist; beside
    them lie ``best_copies`` copies of the weights (``best.safetensors``). Files of those names
    already in ``run_dir`` (a resumed or repeated run) are replaced, so they count as written.
    """
    checkpoint = state_bytes(model, trainable_copies=2)
    peak = 2 * checkpoint + best_copies * state_bytes(model)
    existing = sum((Path(run_dir) / f).stat().st_size for f in files if (Path(run_dir) / f).is_file())
    return max(peak - existing, 0)


@contextlib.contextmanager
def run_lock(run_dir: str | Path, command: str = "run", kind: str = "run directory") -> Iterator[Path]:
    """Hold ``RUN/.lock`` (exclusive, non-blocking flock) for the block; :class:`RunLockedError` if taken."""
    run_dir = Path(run_dir)
    with _flock(run_dir / LOCK, command, f"{kind} {run_dir} is in use by another mmrec process",
                f"is {run_dir} writable?") as path:
        yield path


def lock_path(out: str | Path) -> Path:
    """``OUT.lock``: the lock of an output file (beside it, so that the file itself can be replaced)."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


@contextlib.contextmanager
def output_lock(out: str | Path, command: str) -> Iterator[Path]:
    """Hold ``OUT.lock`` for the block: one writer per output file; :class:`RunLockedError` if taken.

    The lock file stays after the call, as ``RUN/.lock`` does (deleting it would let two writers
    lock different inodes).
    """
    out = Path(out)
    with _flock(lock_path(out), command, f"output {out} is being written by another mmrec process",
                f"is {out.parent} writable?") as path:
        yield path


def holds_output(command: str, *, out: Callable[..., Any]) -> Callable[[F], F]:
    """Decorate a library call that writes one output file ``out(*args, **kwargs)``.

    Its directory is created and proven writable and not full, then ``OUT.lock`` is held while
    the call runs. ``out`` giving None leaves the call to report the missing output.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            where = out(*args, **kwargs)
            if not where:
                return fn(*args, **kwargs)
            target = Path(where)
            if target.is_dir():
                raise MMRecError(f"--out {target} is a directory; give the output file's path")
            prepare_run_dir(target.parent, kind="output directory")
            with output_lock(target, command):
                return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


@contextlib.contextmanager
def _flock(path: Path, command: str, busy: str, unwritable: str) -> Iterator[Path]:
    if fcntl is None:  # pragma: no cover
        yield path
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MMRecError(f"cannot create {path} ({e.strerror or e}): {unwritable}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise RunLockedError(f"{busy} ({holder}); wait for it to finish or choose another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"{info.get('command', '?')}, pid {info.get('pid', '?')} on {info.get('host', '?')}, " \
               f"since {info.get('started', '?')}"
    except (OSError, ValueError):
        return "holder unknown"


def holds_run_dir(command: str, *, out: Callable[..., Any] | None = None, create: bool = True,
                  main_only: bool = False) -> Callable[[F], F]:
    """Decorate a command's library call: prepare its run directory and hold the lock while it runs.

    ``out(*args, **kwargs)`` gives the directory (default: the first argument's ``.out``).
    ``create=False``: a directory that does not exist is left to the call to report.
    ``main_only``: under ``torchrun`` only rank 0 prepares and locks (ranks share the directory).
    """

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if main_only and not _is_main_process():
                return fn(*args, **kwargs)
            where = out(*args, **kwargs) if out is not None else getattr(
                next(iter(sig.bind(*args, **kwargs).arguments.values())), "out", None)
            if not where or (not create and not Path(where).is_dir()):
                return fn(*args, **kwargs)
            run_dir = prepare_run_dir(where)
            with run_lock(run_dir, command):
                return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def _is_main_process() -> bool:
    """Rank 0 of an initialised process group, else of ``torchrun``'s environment (``RANK``)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# -- provenance ---------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    """Python, mmrec and the numeric packages (None: not installed)."""
    from importlib import metadata

    import mmrec
    out: dict[str, str | None] = {"python": platform.python_version(), "mmrec": mmrec.__version__}
    for name in VERSIONED:
        mod = sys.modules.get(name)
        version = getattr(mod, "__version__", None) if mod is not None else None
        if version is None:
            try:
                version = metadata.version(name.replace("_", "-"))
            except metadata.PackageNotFoundError:
                version = None
        out[name] = str(version) if version is not None else None
    return out


def data_record(spec: str, exclude: Iterable[Path] = ()) -> dict[str, Any]:
    """The data fingerprint (pipeline's) reduced to a digest, with the file list when it is short."""
    from mmrec.pipeline import data_fingerprint, digest
    fp = data_fingerprint(str(spec), exclude=exclude)
    files = fp.get("files")
    record: dict[str, Any] = {"spec": str(spec)}
    if files is None:  # synthetic:<preset>: a function of the preset and the run's seed / data_args
        record["digest"] = digest({"spec": str(spec)})
        return record
    record.update(digest=digest(files), n_files=len(files), bytes=sum(int(f["size"]) for f in files.values()))
    if len(files) <= MAX_LISTED_FILES:
        record["files"] = files
    return record


def write_provenance(run_dir: str | Path, data_spec: str, command: str,
                     exclude: Iterable[Path] = ()) -> dict[str, Any]:
    """``RUN/provenance.json``: versions, the data's fingerprint, when and by what command."""
    from mmrec.io import write_json
    run_dir = Path(run_dir)
    record = {"command": command, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "data": data_record(data_spec, [run_dir, *exclude])}
    write_json(run_dir / PROVENANCE, record)
    return record


def check_provenance(run_dir: str | Path, data_spec: str, exclude: Iterable[Path] = ()) -> list[str]:
    """Warn (:class:`ProvenanceWarning`) for each way the data or packages differ from training.

    Returns the messages. A run without ``provenance.json`` (older mmrec) is not checked.
    A directory is compared by its files' content, wherever it now lives (``--data`` after a move).
    """
    run_dir = Path(run_dir)
    path = run_dir / PROVENANCE
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
        old = saved["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MMRecError(f"{path}: unreadable provenance record ({e})") from None
    try:
        now = data_record(data_spec, [run_dir, *exclude])
    except MMRecError:
        return []  # the data cannot be read: loading it reports that
    messages: list[str] = []
    if now["digest"] != old.get("digest"):
        detail = _changed_files(old.get("files"), now.get("files"))
        messages.append(f"data {data_spec} differs from the data run {run_dir} was trained on "
                        f"({path}){': ' + detail if detail else ''}; its metrics may not be comparable")
    was, now_v = saved.get("versions", {}), versions()
    moved = [f"{k} {was[k]} -> {now_v.get(k)}" for k in sorted(was) if k in now_v and was[k] != now_v[k]]
    if moved:
        messages.append(f"run {run_dir} was trained with other package versions: {', '.join(moved)}")
    for m in messages:
        warnings.warn(m, ProvenanceWarning, stacklevel=2)
    return messages


def _changed_files(old: dict[str, Any] | None, new: dict[str, Any] | None, limit: int = 5) -> str:
    if old is None or new is None:
        return ""
    parts = []
    for label, names in (("changed", [k for k in old if k in new and old[k] != new[k]]),
                         ("added", [k for k in new if k not in old]), ("removed", [k for k in old if k not in new])):
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            parts.append(f"{label} {', '.join(sorted(names)[:limit])}{more}")
    return "; ".join(parts)


__all__ = ["ProvenanceWarning", "LOCK", "MIN_FREE_BYTES", "PROVENANCE", "RunLockedError", "SPACE_MARGIN",
           "check_free_space", "check_provenance", "data_record", "holds_output", "holds_run_dir", "lock_path",
           "output_lock", "prepare_run_dir", "run_lock", "state_bytes", "training_bytes", "versions",
           "write_provenance"]
