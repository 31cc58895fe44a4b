"""Features on demand: a content model on raw content without stored features just works.

When a model needs item features (``use_features``, ``--fusion``/``--filtration``,
or a content-aware model) and the dataset has raw text, images or audio but no
feature table for a modality, the default frozen encoder of that modality
(all-MiniLM-L6-v2 for text, EfficientNet-Lite0 for images, logmel-cnn for audio)
runs once and its features are cached:

* ``<data root>/.mmrec-cache/features/`` beside a writable dataset directory, else
* ``~/.cache/mmrec/<dataset fingerprint>/features/`` (synthetic worlds, read-only
  data; ``$XDG_CACHE_HOME`` is honoured, ``$MMREC_CACHE_DIR`` overrides both).

A cache file is keyed by a fingerprint of the dataset (name, root, item ids, the
synthetic world's config or the stat of ``items.tsv``) and the encoder spec, so
a second run loads it instead of recomputing. ``--features`` files given by the
user override all of this (nothing is extracted then). Extraction itself is
:func:`mmrec.pretrain.extract.extract_features` (resumable, bad media masked).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from mmrec.datasets.features import load_feature_file
from mmrec.datasets.schema import Dataset
from mmrec.encoders.base import DEFAULT_NAME
from mmrec.pretrain.extract import (CONTENT_MODALITIES, FORMAT_VERSION, available_modalities, extract_features,
                                    frozen_encoders, resolve_device)

CACHE_ENV = "MMREC_CACHE_DIR"
#: Random-init backbones (logmel-cnn) are built from this seed, whatever the run's seed,
#: so that every run shares one cache entry.
ENCODER_SEED = 0


def _get(cfg_like: Any, key: str, default: Any = None) -> Any:
    if cfg_like is None:
        return default
    if isinstance(cfg_like, dict):
        return cfg_like.get(key, default)
    return getattr(cfg_like, key, default)


def dataset_fingerprint(data: Dataset) -> str:
    """What identifies the items' content: name, root, item ids, and how the content was made."""
    ident: dict[str, Any] = {"name": data.name,
                             "item_ids": hashlib.sha256("\n".join(map(str, data.item_ids)).encode()).hexdigest()}
    if data.root:
        root = Path(data.root).resolve()
        ident["root"] = str(root)
        items = root / "items.tsv"
        if items.is_file():
            st = items.stat()
            ident["items.tsv"] = [st.st_size, st.st_mtime_ns]
    truth = data.ground_truth or {}
    if "config" in truth:  # the synthetic world: its config and seed decide every rendered byte
        ident["world"] = json.loads(json.dumps({"config": truth["config"], "seed": truth.get("seed")}, default=str))
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir(data: Dataset) -> Path:
    """Where on-demand features of this dataset live (see the module docstring)."""
    fp = dataset_fingerprint(data)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / fp / "features"
    if data.root and Path(data.root).is_dir() and os.access(data.root, os.W_OK):
        return Path(data.root) / ".mmrec-cache" / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mmrec" / fp / "features"


def cache_file(data: Dataset, modality: str, encoder: str, cache_dir: str | Path) -> Path:
    key = {"dataset": dataset_fingerprint(data), "modality": modality, "encoder": encoder,
           "pretrained": "auto", "seed": ENCODER_SEED, "version": FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in encoder)
    return Path(cache_dir) / f"{modality}-{safe}-{digest}.safetensors"


def uses_content(cfg_like: Any) -> bool:
    """Whether the configured model reads item features (two-step mode only)."""
    if cfg_like is None:
        return True
    if _get(cfg_like, "mode", "two-step") == "end2end":  # encoders are trained inside the model
        return False
    args = dict(_get(cfg_like, "model_args", None) or {})
    if (args.get("use_features") or args.get("enhancement") or _get(cfg_like, "fusion")
            or _get(cfg_like, "filtration") or _get(cfg_like, "enhancement")):
        return True
    name = _get(cfg_like, "model")
    if not name:
        return False
    from mmrec.models.base import import_all_models
    from mmrec.registry import MODELS

    import_all_models()
    if name not in MODELS:
        return False  # model creation reports the unknown name
    cls = MODELS.get(name)
    if getattr(cls, "content_aware", False):
        return True
    try:
        from mmrec.config import from_dict
        return bool(getattr(from_dict(cls.config_class, args, path="model"), "use_features", False))
    except Exception:  # noqa: BLE001 - a bad model config is reported when the model is built
        return False


def needed_modalities(data: Dataset, cfg_like: Any = None) -> list[str]:
    """Content modalities the model will read: ``model.features`` if given, else all with raw content."""
    if not uses_content(cfg_like):
        return []
    asked = (dict(_get(cfg_like, "model_args", None) or {})).get("features")
    wanted = list(asked) if asked else available_modalities(data)
    return [m for m in wanted if m in CONTENT_MODALITIES]


def ensure_features(data: Dataset, cfg_like: Any = None, cache_dir: str | Path | None = None, *,
                    modalities: list[str] | None = None, encoders: dict[str, str] | None = None,
                    batch_size: int = 64, progress: bool | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Attach frozen features for every needed modality the dataset lacks; extract each once.

    ``cfg_like``: a RunConfig (or dict, or None = every modality with raw content):
    its ``features`` (user files: then nothing is done), ``mode``, ``model``,
    ``model_args``, ``fusion``/``filtration`` and ``device`` are read.
    ``modalities`` overrides what the model needs; ``encoders`` the default encoder
    names. Tables land in ``data.items.features[<modality>]``. Returns what was done:
    ``{"needed", "present", "cached": {m: path}, "extracted": {m: {...}},
    "unavailable", "skipped"}``.
    """
    result: dict[str, Any] = {"needed": [], "present": [], "cached": {}, "extracted": {}, "unavailable": [],
                              "skipped": None}
    if _get(cfg_like, "features"):
        result["skipped"] = "--features files given"
        return result
    needed = list(modalities) if modalities is not None else needed_modalities(data, cfg_like)
    result["needed"] = needed
    have = data.items.features
    result["present"] = [m for m in needed if m in have]
    raw = set(available_modalities(data))
    result["unavailable"] = [m for m in needed if m not in have and m not in raw]
    todo = [m for m in needed if m not in have and m in raw]
    if not todo:
        return result
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(data)
    device = resolve_device(_get(cfg_like, "device", "cpu") or "cpu")
    if progress is None:
        progress = bool(_get(_get(cfg_like, "train"), "progress", True))
    names = dict(encoders or {})
    item_ids = [str(x) for x in data.item_ids]
    for m in todo:
        name = names.get(m) or DEFAULT_NAME[m]
        path = cache_file(data, m, name, cache_dir)
        if path.is_file():
            log(f"using cached {m} features ({name}) from {path}")
            result["cached"][m] = str(path)
        else:
            log(f"extracting {m} features with {name} into {path} (once)")
            enc = frozen_encoders([m], {m: name}, device=device, seed=ENCODER_SEED, log=log)
            report = extract_features(data, enc, path, batch_size=batch_size, fuse="none", progress=progress,
                                      meta={"on_demand": "true"}, log=log)
            if report.bad_media:
                log(f"  {m}: masked items without usable content: {report.bad_media}")
            result["extracted"][m] = {"path": str(path), "encoder": name, "seconds": report.seconds,
                                      "items_per_second": round(report.items_per_second, 2),
                                      "bad_media": report.bad_media}
        have[m] = load_feature_file(path, item_ids)[m]
    return result


__all__ = ["CACHE_ENV", "cache_file", "dataset_fingerprint", "default_cache_dir", "ensure_features",
           "needed_modalities", "uses_content"]
