"""Checkpoints: best weights as safetensors, the full resumable state as a torch file.

Resume is exact on CPU: model, optimizer, epoch, selection state and both RNGs
(numpy's sampling generator and torch's) are restored.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from mmrec.errors import MMRecError
from mmrec.io import atomic_path

BEST = "best.safetensors"
STATE = "checkpoint.pt"


def save_weights(model: nn.Module, run_dir: str | Path, name: str = BEST) -> Path:
    path = Path(run_dir) / name
    with atomic_path(path) as tmp:
        save_model(model, str(tmp))
    return path


def load_weights(model: nn.Module, run_dir: str | Path, name: str = BEST) -> None:
    path = Path(run_dir) / name
    if not path.exists():
        raise MMRecError(f"no weights at {path}: was the run trained to completion?")
    from safetensors import SafetensorError
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=str(model_device(model)))
    except SafetensorError as e:  # cut short, overwritten, not a safetensors file: its header does not parse
        raise damaged(path, e, "retrain the run, or put back an intact copy of the file") from None
    if missing or unexpected:
        raise MMRecError(f"{path} does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def save_state(run_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
               epoch: int, scheduler: Any = None, rng: np.random.Generator, selection: dict[str, Any],
               history: list[dict[str, Any]]) -> Path:
    """Everything needed to continue exactly after ``epoch`` (written atomically)."""
    path = Path(run_dir) / STATE
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "selection": _plain(selection),  # EvalResult -> dict: weights_only loading takes plain dicts only
        "history": _plain(history),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _plain(obj: Any) -> Any:
    """Dict subclasses as dicts, numpy scalars as Python numbers, recursively."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if type(obj) in (list, tuple) else [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def load_state(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATE
    if not path.exists():
        return None
    return safe_torch_load(path, keys=("model", "optimizer", "epoch", "numpy_rng", "torch_rng", "selection"))


def _safe_globals() -> list[Any]:
    """Classes a resumable state may hold besides tensors and plain containers: data, never code.

    The legacy numpy RNG state (``np.random.get_state()``, pre-training) is an ndarray.
    """
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64, np.bool_)]
    return [np.ndarray, np.dtype, _reconstruct, *dtypes]


#: what to do about a damaged resumable state (``train --resume``, ``pretrain --resume``)
RESUME_ADVICE = ("delete it to start the run fresh (the rest of the run directory can stay), "
                 "or put back an intact copy to resume from it")


def damaged(path: str | Path, e: BaseException, advice: str = RESUME_ADVICE) -> MMRecError:
    """One error for a file that is cut short, overwritten or not what its name says.

    torch's own messages for this ("failed finding central directory", "Invalid argument",
    "Unsupported operand 95", a bare ``EOFError``) neither name the file nor say it is damaged.
    """
    why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    why = why.split(". This is an internal miniz error")[0]  # torch's zip reader adds a paragraph
    why = why[len("Error while deserializing header: "):] if why.startswith("Error while deserializing") else why
    why = f"{type(e).__name__}: {why}" if why and why != type(e).__name__ else type(e).__name__
    why = why if len(why) <= 200 else why[:200] + "..."
    return MMRecError(f"{path} is damaged or incomplete and cannot be loaded ({why}); it was probably cut "
                      f"short (a full disk, an interrupted copy) or overwritten; {advice}")


#: the weights-only unpickler's words for a *refused* global or class (a payload), as opposed to
#: bytes that are not a pickle at all ("Unsupported operand 80", "String is too long": damage)
_REFUSED = re.compile(r"GLOBAL ([\w.]+)|allowlisted|unrecognized function")

#: what torch raises reading a file that is not a whole checkpoint: its zip reader (RuntimeError:
#: "failed finding central directory", "failed locating file data/0"; OSError EINVAL from a seek past
#: the end), its legacy-format reader (EOFError, KeyError, struct / unicode errors) and the unpickler
_DAMAGE = (RuntimeError, EOFError, KeyError, IndexError, ValueError, TypeError, ArithmeticError, struct.error)


def safe_torch_load(path: str | Path, keys: Sequence[str] = ()) -> Any:
    """``torch.load`` with ``weights_only=True``: a checkpoint is a pickle, and a pickle from elsewhere
    could run code when loaded. Anything but tensors, plain data and :func:`_safe_globals` is refused.

    A file that is not a whole checkpoint (truncated, zero bytes, random bytes, a zip without its
    records) is one :class:`MMRecError` naming it (:func:`damaged`); so is a loaded object that is
    not a dict holding ``keys``.
    """
    import errno
    import pickle
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _REFUSED.search(str(e))
        if found is None:  # not a refused payload: bytes the unpickler cannot even parse
            raise damaged(path, pickle.UnpicklingError(_unpickler_reason(e))) from None
        why = f"it would load {found.group(1)}" if found.group(1) else _unpickler_reason(e)
        raise MMRecError(f"{path}: refusing to load: it holds more than tensors and plain data ({why}); "
                         f"only load checkpoints you trust") from None
    except OSError as e:
        if e.errno != errno.EINVAL:  # permissions, I/O errors: not the file's content
            raise
        raise damaged(path, e) from None
    except _DAMAGE as e:
        raise damaged(path, e) from None
    if keys:
        lacking = [k for k in keys if not isinstance(state, dict) or k not in state]
        if lacking:
            raise damaged(path, ValueError(f"it holds no {', '.join(lacking)}"))
    return state


def _unpickler_reason(e: BaseException) -> str:
    """The line of torch's long weights-only message that says what went wrong."""
    text = str(e)
    tail = text.split("WeightsUnpickler error:", 1)[-1].strip()
    return (tail.splitlines() or [text])[0].strip() or type(e).__name__
