"""Checkpoints: best weights as safetensors, the full resumable state as a torch file.

Resume is exact on CPU: model, optimizer, epoch, selection state and both RNGs
(numpy's sampling generator and torch's) are restored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    missing, unexpected = load_model(model, str(path), strict=False, device=str(model_device(model)))
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
    return safe_torch_load(path)


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


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True``: a checkpoint is a pickle, and a pickle from elsewhere
    could run code when loaded. Anything but tensors, plain data and :func:`_safe_globals` is refused."""
    import pickle
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import re
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the global it blocked
        why = f"it would load {found.group(1)}" if found else str(e).strip().splitlines()[0]
        raise MMRecError(f"{path}: refusing to load: it holds more than tensors and plain data ({why}); "
                         f"only load checkpoints you trust") from None
