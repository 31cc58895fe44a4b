"""The contract between a recommender, the trainer and the evaluator.

A model is a plain ``nn.Module``: it can be built from a dataset, trained by any
loop that calls :meth:`Recommender.training_batches` and :meth:`Recommender.loss`,
and scored by :meth:`Recommender.score_all` / :meth:`Recommender.score`. The
trainer imports models, never the reverse.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from mmrec.config import from_dict
from mmrec.datasets.sampling import bpr_batches
from mmrec.datasets.schema import Dataset
from mmrec.registry import MODELS

# Modules whose import registers models; each may be absent while issues are open.
MODEL_MODULES = (
    "mmrec.graph.baselines",
    "mmrec.graph.lightgcn",
    "mmrec.graph.cigf",
    "mmrec.graph.mbgmn",
    "mmrec.graph.history",
    "mmrec.fusion.models",
    "mmrec.sequential",
)


def import_all_models() -> None:
    """Import every module that registers models (missing optional ones are skipped)."""
    for name in MODEL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module
                raise


#: Batch keys that hold item indices (what end-to-end sources re-encode).
ITEM_KEYS = ("pos", "neg", "item", "items", "target", "seq")


@dataclasses.dataclass
class ModelConfig:
    """Hyper-parameters shared by most models; subclasses add their own fields."""

    dim: int = 64
    reg: float = 1e-4


class Recommender(nn.Module):
    """Base class of every recommender.

    Subclasses set ``config_class`` (a dataclass), implement :meth:`from_dataset`,
    :meth:`loss` and :meth:`score_all`; override :meth:`training_batches` when they
    need more than BPR triples of the target behavior.
    """

    config_class: ClassVar[type] = ModelConfig
    #: False for models fitted in closed form (popularity): the trainer calls fit() only.
    trainable: ClassVar[bool] = True
    #: Models that can score items without training interactions (content models).
    content_aware: ClassVar[bool] = False

    @classmethod
    def from_dataset(cls, data: Dataset, config: Any) -> "Recommender":
        raise NotImplementedError

    # -- training ---------------------------------------------------------------
    def fit(self, data: Dataset) -> None:
        """Closed-form fitting (called once before training); default: nothing."""

    def training_batches(self, data: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Tensor]]:
        """One epoch of mini-batches; default: BPR (user, pos, neg) on the target behavior."""
        yield from bpr_batches(data.matrix(), batch_size, rng)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    # -- end-to-end hooks (called by the trainer around ``loss``) ----------------------
    def on_batch(self, batch: dict[str, Tensor]) -> None:
        """Tell trainable content sources which items this step touches (end-to-end mode)."""
        items = [v for k, v in batch.items() if k in ITEM_KEYS and torch.is_tensor(v)]
        if not items:
            return
        touched = torch.cat([t.reshape(-1) for t in items])
        for module in self.modules():
            if module is not self and hasattr(module, "set_active"):
                module.set_active(touched)

    def auxiliary_loss(self) -> Tensor | None:
        """Losses besides the model's own, after ``loss``: the end-to-end alignment term and the
        feature-enhancement term.

        Content encoders that were fine-tuned this step are aligned with the item ID
        embeddings (``item_emb``) by InfoNCE, weighted by the config's ``align_weight``;
        a content encoder with a feature enhancement (``model.enhancement``) adds its loss
        over the step's items, weighted by ``enhance_weight``.
        """
        config = getattr(self, "config", None)
        total = None
        item_emb = getattr(self, "item_emb", None)
        weight = float(getattr(config, "align_weight", 0.0) or 0.0)
        if isinstance(item_emb, nn.Embedding) and weight != 0.0:
            for module in self.modules():
                if module is not self and hasattr(module, "alignment_loss"):
                    term = module.alignment_loss(item_emb.weight)
                    if term is not None:
                        total = weight * term if total is None else total + weight * term
        weight = float(getattr(config, "enhance_weight", 0.0) or 0.0)
        for module in self.modules():
            if module is not self and hasattr(module, "enhancement_loss"):
                term = module.enhancement_loss()   # called even at weight 0: releases the step's parts
                if term is not None and weight != 0.0:
                    total = weight * term if total is None else total + weight * term
        return total

    # -- scoring ----------------------------------------------------------------
    def prepare_eval(self) -> None:
        """Called under no_grad before scoring (e.g. propagate graph embeddings once)."""

    def score_all(self, users: Tensor) -> Tensor:
        """Scores [len(users), n_items] of every item for a batch of users."""
        raise NotImplementedError

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores of chosen items: ``users`` [B], ``items`` [B, k] -> [B, k]."""
        return self.score_all(users).gather(1, items)

    def item_embeddings(self) -> Tensor | None:
        """Final item representations, if the model has them (used as alignment targets)."""
        return None

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


class InnerProductScoring:
    """Scores as ⟨e_u, e_i⟩ of ``representations()``'s first two tensors (users, items).

    Mixed into models whose final score is a plain inner product (LightGCN, VBPR,
    the multimodal graph backbones), so each defines only how it builds
    representations.
    """

    representations: Callable[[], tuple[Tensor, ...]]  # supplied by the model class
    _cold_standins: tuple[Tensor, Tensor] | None = None
    _patched: tuple[Tensor, int, Tensor] | None = None   # (item table, its version, with the stand-ins)

    def set_cold_standins(self, rows: Tensor | None, vectors: Tensor | None = None) -> None:
        """Score items ``rows`` with ``vectors`` in place of their item rows (cold items with an
        aligned content vector, mmrec/cold_items.py); ``None`` removes them. Not a parameter or
        buffer: the stored weights stay the model's own."""
        self._patched = None
        if rows is None:
            self._cold_standins = None
            return
        if vectors is None or vectors.shape[0] != rows.shape[0]:
            raise ValueError("set_cold_standins needs one vector per row")
        self._cold_standins = (rows.long(), vectors.float())

    def scoring_tables(self) -> tuple[Tensor, Tensor]:
        """(users, items) whose inner products are the scores: ``representations()`` with the
        cold-item stand-ins, if any, in their rows.

        Without gradients the patched table is kept while the item table is the same tensor at
        the same version, so scoring user batch after user batch copies the catalogue once, not
        once per batch."""
        u, i = self.representations()[:2]
        if self._cold_standins is None:
            return u, i
        memo = self._patched
        if memo is not None and memo[0] is i and memo[1] == i._version:
            return u, memo[2]
        rows, vectors = self._cold_standins
        patched = i.index_copy(0, rows.to(i.device), vectors.to(device=i.device, dtype=i.dtype))
        self._patched = (i, i._version, patched) if not torch.is_grad_enabled() else None
        return u, patched

    def score_all(self, users: Tensor) -> Tensor:
        u, i = self.scoring_tables()
        return u[users] @ i.T

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        u, i = self.scoring_tables()
        return (u[users].unsqueeze(1) * i[items]).sum(-1)

    def item_embeddings(self) -> Tensor:
        return self.scoring_tables()[1]


def model_config(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config dataclass of a registered model, with overrides applied."""
    import_all_models()
    cls = MODELS.get(name)
    return from_dict(cls.config_class, overrides or {}, path="model")


def create_model(name: str, data: Dataset, config: dict[str, Any] | Any | None = None) -> Recommender:
    """Build a registered model for a dataset (timm's ``create_model`` for recommenders)."""
    import_all_models()
    cls = MODELS.get(name)
    if config is None or isinstance(config, dict):
        config = from_dict(cls.config_class, config or {}, path="model")
    model = cls.from_dataset(data, config)
    check_enhancement(name, model, config)
    return model


def check_enhancement(name: str, model: nn.Module, config: Any) -> None:
    """Refuse a ``model.enhancement`` that the built model would silently ignore.

    The enhancement lives in the content encoder (``ItemContentEncoder``); a model without
    one (no ``use_features``) or whose encoder was built without it (a model that fuses the
    modalities itself: lattice, micro) cannot apply it.
    """
    from mmrec.errors import ConfigError

    wanted = getattr(config, "enhancement", None)
    if not wanted:
        return
    weight = float(getattr(config, "enhance_weight", 0.0) or 0.0)
    if weight < 0:
        raise ConfigError(f"model.enhance_weight must be >= 0, got {weight}")
    encoders = [m for m in model.modules() if hasattr(m, "enhancement_loss")]
    if not encoders:
        raise ConfigError(f"model.enhancement '{wanted}' enhances item content, but model '{name}' reads none "
                          "(set model.use_features=true, or use a content model: vbpr, freedom)")
    if all(getattr(m, "enhancement", None) is None for m in encoders):
        raise ConfigError(f"model '{name}' fuses its modalities itself, so model.enhancement '{wanted}' (which acts "
                          "on the content encoder's fused vector) cannot apply; use it with vbpr, freedom, or "
                          "lightgcn / lightgcn-mb / cigf / mbgmn with use_features")
