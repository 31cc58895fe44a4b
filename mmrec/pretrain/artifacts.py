"""What a pre-training run leaves for ``extract`` and end-to-end training.

``RUN/encoders.json`` lists each modality's :func:`~mmrec.encoders.create_encoder`
arguments (its ``spec``) and ``RUN/encoders.safetensors`` holds every encoder's
weights under ``<modality>.<parameter name>``. Rebuilding = ``create_encoder(**spec,
pretrained=None)`` then loading the tensors, so a run is portable to a machine
without the original weight files. Both files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmrec.encoders.base import Encoder, create_encoder
from mmrec.errors import MMRecError
from mmrec.io import atomic_path, write_json

SPECS = "encoders.json"
_OLD_POOLER = "backbone.pooler."
WEIGHTS = "encoders.safetensors"


def save_encoders(run_dir: str | Path, encoders: dict[str, Encoder], extra: dict[str, Any] | None = None) -> None:
    """Write every encoder's spec and weights (shared tensors are cloned: safetensors forbids aliasing)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for modality, enc in encoders.items():
        for name, t in enc.state_dict().items():
            tensors[f"{modality}.{name}"] = t.detach().cpu().clone().contiguous()
    with atomic_path(run_dir / WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    specs = {m: {k: v for k, v in enc.spec.items()} for m, enc in encoders.items()}
    write_json(run_dir / SPECS, {"encoders": specs, **(extra or {})})


def load_encoder_specs(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SPECS
    if not path.exists():
        raise MMRecError(f"{run_dir} is not a pre-training run (no {SPECS}); run `mmrec pretrain` first")
    return json.loads(path.read_text())


def load_encoders(run_dir: str | Path, device: str | torch.device = "cpu",
                  modalities: list[str] | None = None) -> dict[str, Encoder]:
    """Rebuild the run's encoders with their trained weights (eval mode)."""
    run_dir = Path(run_dir)
    specs = load_encoder_specs(run_dir)["encoders"]
    weights = run_dir / WEIGHTS
    if not weights.exists():
        raise MMRecError(f"{weights} is missing: the pre-training run did not finish")
    out: dict[str, Encoder] = {}
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
        for modality, spec in specs.items():
            if modalities is not None and modality not in modalities:
                continue
            spec = dict(spec)
            spec.pop("pretrained", None)
            enc = create_encoder(spec.pop("modality", modality), spec.pop("name", None), pretrained=None, **spec)
            prefix = f"{modality}."
            state = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
            own = enc.state_dict()
            # runs saved before text encoders dropped BERT's (unused) pooler still hold it
            state = {k: v for k, v in state.items() if k in own or not k.startswith(_OLD_POOLER)}
            missing, unexpected = enc.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise MMRecError(f"{weights}: weights for '{modality}' do not fit its encoder "
                                 f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
            out[modality] = enc.to(device).eval()
    return out


__all__ = ["save_encoders", "load_encoders", "load_encoder_specs", "SPECS", "WEIGHTS"]
