"""How item content enters any recommender: features -> projection -> filtration -> fusion.

Every content-aware model (VBPR, LATTICE, MICRO, FREEDOM, and the graph models with
``use_features``) builds one :class:`ItemContentEncoder` and calls it for an
``[n_items, dim]`` content representation::

    source  = FrozenFeatures(data.items.features)          # two-step: stored features
    content = ItemContentEncoder(source, dim=64, fusion="attention", filtration="gate")
    c = content(id_emb=model.item_emb.weight)              # [n_items, 64]

The three stages are registries (``FUSIONS``, ``FILTRATIONS``), so
``--fusion`` / ``--filtration`` pick them by name:

- a *source* yields per-modality features and presence masks (:class:`FrozenFeatures`
  from the feature store, or encoders fine-tuned end to end);
- each modality is projected to ``dim`` (one linear map per modality);
- a *feature filtration* (``gate``: behavior-guided purification) may rewrite the
  projected modalities using the item ID embedding;
- a *fusion* (``sum``, ``concat``, ``attention``, ``gated``, ...) combines them into one
  vector per item. Masked modalities never contribute.

Fusion modules: ``cls(modalities: list[str], dim: int)`` and
``forward(parts, masks, id_emb) -> Tensor``. Feature filtrations: ``kind = "features"``,
``cls(modalities, dim)``, ``forward(parts, id_emb) -> parts``. Edge filtrations
(``kind = "edges"``) act on item-item or user-item graphs and are used by the models
that own such graphs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset, FeatureTable
from mmrec.errors import ConfigError, DataError
from mmrec.registry import FILTRATIONS, FUSIONS

Parts = dict[str, Tensor]

#: Modules whose import registers fusions / filtrations (absent ones are skipped).
FUSION_MODULES = ("mmrec.fusion.simple", "mmrec.fusion.attention", "mmrec.fusion.nova",
                  "mmrec.fusion.filtration", "mmrec.fusion.edge_filtration")


def import_all_fusions() -> None:
    for name in FUSION_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise


@dataclass
class ContentFields:
    """Config fields every content-aware model shares (mix into its config dataclass)."""

    use_features: bool = False
    features: list[str] | None = None   # modalities to use (default: every feature table)
    fusion: str = "sum"
    filtration: str | None = None
    feature_norm: str = "standard"      # standard | l2 | none: how stored features are scaled before projection
    # end-to-end mode (--mode end2end): encoders fine-tuned with the recommendation loss
    mode: str = "two-step"
    encoders: dict[str, Any] | None = None  # modality -> encoder name or {name: ..., kwargs}; default: small CPU ones
    encoders_run: str | None = None         # a `mmrec pretrain` run whose encoders start the fine-tuning
    encoder_dim: int = 64                   # projection size of the default encoders
    encode_active: int = 64                 # items re-encoded with gradient per step (the rest: memory bank)
    align_weight: float = 0.1               # weight of the content <-> item-ID alignment loss


FEATURE_NORMS = ("standard", "l2", "none")


def normalize_features(x: Tensor, mask: Tensor, norm: str) -> Tensor:
    """Put modalities on one scale before projection (statistics over present rows only).

    ``standard``: per-dimension z-score (EfficientNet's non-negative activations and
    MiniLM's unit vectors differ in scale by ~30x; without it the larger one dominates
    the sum and swamps the ID embedding); ``l2``: unit rows; ``none``: as stored.
    """
    if norm == "none" or not bool(mask.any()):
        return x
    if norm == "l2":
        return torch.nn.functional.normalize(x, dim=1)
    present = x[mask]
    mean = present.mean(0)
    std = present.std(0, unbiased=False).clamp_min(1e-6)
    return (x - mean) / std


class FrozenFeatures(nn.Module):
    """Stored per-modality features as non-persistent buffers (the two-step source).

    Rows of absent items are zeroed once here, so a NaN placeholder can never leak
    into a product or its gradient.
    """

    trainable: ClassVar[bool] = False

    def __init__(self, tables: dict[str, FeatureTable], norm: str = "standard") -> None:
        super().__init__()
        if not tables:
            raise ConfigError("no feature tables given")
        if norm not in FEATURE_NORMS:
            raise ConfigError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}, not '{norm}'")
        self.modalities = sorted(tables)
        self.dims = {m: tables[m].dim for m in self.modalities}
        for m in self.modalities:
            t = tables[m]
            feats = normalize_features(t.features.float(), t.mask, norm)
            feats = torch.where(t.mask.unsqueeze(1), feats, torch.zeros((), dtype=torch.float32))
            self.register_buffer(f"feat_{m}", feats, persistent=False)
            self.register_buffer(f"mask_{m}", t.mask.clone().bool(), persistent=False)

    @property
    def n_items(self) -> int:
        return getattr(self, f"feat_{self.modalities[0]}").shape[0]

    def masks(self) -> Parts:
        return {m: getattr(self, f"mask_{m}") for m in self.modalities}

    def forward(self) -> tuple[Parts, Parts]:
        """(features [n, d_m] per modality, presence masks [n] per modality)."""
        return {m: getattr(self, f"feat_{m}") for m in self.modalities}, self.masks()


class ItemContentEncoder(nn.Module):
    """Source -> per-modality linear projection -> optional filtration -> fusion."""

    def __init__(self, source: nn.Module, dim: int, fusion: str = "sum", filtration: str | None = None,
                 init_std: float = 0.1) -> None:
        super().__init__()
        import_all_fusions()
        self.init_std = init_std
        self.source = source
        self.modalities: list[str] = list(source.modalities)
        self.dim = dim
        self.proj = nn.ModuleDict({m: nn.Linear(source.dims[m], dim, bias=False) for m in self.modalities})
        self.filtration: nn.Module | None = None
        if filtration:
            cls = FILTRATIONS.get(filtration)
            if getattr(cls, "kind", "features") != "features":
                raise ConfigError(f"filtration '{filtration}' acts on graph edges, not on features; "
                                  f"use it with a model that builds an item-item graph (freedom, lattice, micro)")
            self.filtration = cls(self.modalities, dim)
        self.fusion_name = fusion
        self.fusion = FUSIONS.get(fusion)(self.modalities, dim)
        self.align: nn.Module | None = None
        if getattr(source, "trainable", False):  # end to end: content <-> item-ID alignment
            from mmrec.pretrain.losses import ContrastiveAlignmentLoss

            self.align = ContrastiveAlignmentLoss(gather=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # N(0, init_std²/d_in): standardised inputs then give projections of the ID
        # embeddings' scale (std ~ init_std per dimension), so neither swamps the other.
        for lin in self.proj.values():
            nn.init.normal_(lin.weight, std=self.init_std / lin.in_features ** 0.5)
        for module in (self.fusion, self.filtration):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def modality_embeddings(self, id_emb: Tensor | None = None) -> tuple[Parts, Parts]:
        """Projected (and filtered) modality embeddings [n, dim] with their masks."""
        feats, masks = self.source()
        return self._project(feats, masks, id_emb), masks

    def encode_rows(self, rows: Tensor, id_rows: Tensor | None = None, fuse: bool = True) -> Tensor | Parts:
        """``self(id_emb)[rows]`` (or the rows of ``modality_embeddings``), computed for ``rows`` only.

        Projection, mask, filtration and fusion act on each item separately, so a BPR step
        that needs a batch's items projects those, not the whole catalogue: same values,
        same gradients. ``id_rows``: the ID embeddings of ``rows`` (what a filtration reads).
        """
        feats, masks = self.source()
        feats = {m: feats[m][rows] for m in self.modalities}
        masks = {m: masks[m][rows] for m in self.modalities}
        parts = self._project(feats, masks, id_rows)
        return self.fusion(parts, masks, id_rows) if fuse else parts

    def _project(self, feats: Parts, masks: Parts, id_emb: Tensor | None) -> Parts:
        """Per-modality projection, masked; then the feature filtration, masked again."""
        parts = {m: self.proj[m](feats[m]) * masks[m].unsqueeze(1).to(feats[m].dtype) for m in self.modalities}
        if self.filtration is not None:
            parts = self.filtration(parts, id_emb, masks)
            parts = {m: p * masks[m].unsqueeze(1).to(p.dtype) for m, p in parts.items()}
        return parts

    def forward(self, id_emb: Tensor | None = None) -> Tensor:
        parts, masks = self.modality_embeddings(id_emb)
        out = self.fusion(parts, masks, id_emb)
        self.last_output = out if out.requires_grad else None  # for the end-to-end alignment loss
        return out

    def alignment_loss(self, id_emb: Tensor) -> Tensor | None:
        """Content ⇄ item-ID InfoNCE over the items re-encoded this step (end-to-end mode)."""
        active = getattr(self.source, "active", None)
        out = getattr(self, "last_output", None)
        if self.align is None or active is None or out is None or len(active) < 2:
            return None
        items = active.to(out.device)
        present = torch.zeros(len(items), dtype=torch.bool, device=out.device)
        for m in self.source.masks().values():
            present |= m.to(out.device)[items]
        return self.align({"content": out[items], "behavior": id_emb[items]}, {"content": present}, item_ids=items)


def feature_tables(data: Dataset, modalities: list[str] | None = None,
                   what: str = "use_features: true") -> dict[str, FeatureTable]:
    """The dataset's feature tables a model asked for, checked against the item count."""
    tables = data.items.features
    if modalities:
        missing = [m for m in modalities if m not in tables]
        if missing:
            raise ConfigError(f"model.features asks for {missing}, but dataset '{data.name}' has feature "
                              f"tables for {sorted(tables) or 'no modality'}")
        tables = {m: tables[m] for m in modalities}
    elif "fused" in tables and len(tables) > 1:  # an extract file: modalities + their fusion
        tables = {m: t for m, t in tables.items() if m != "fused"}
    if not tables:
        raise ConfigError(f"{what}, but dataset '{data.name}' has no precomputed item features "
                          f"(pass --features FILE)")
    for m, t in tables.items():
        if t.features.shape[0] != data.n_items:
            raise DataError(f"feature table has {t.features.shape[0]} rows, the dataset {data.n_items} items",
                            file=t.meta.get("path"), field=m)
    return tables


def build_item_content(data: Dataset, dim: int, config: Any, source: nn.Module | None = None,
                       what: str = "use_features: true") -> ItemContentEncoder:
    """The content encoder a model's config asks for (``features``/``fusion``/``filtration``).

    ``source`` replaces the stored features (end-to-end mode passes encoders here).
    """
    mode = getattr(config, "mode", "two-step")
    if mode not in ("two-step", "end2end"):
        raise ConfigError(f"mode must be 'two-step' or 'end2end', not '{mode}'")
    if source is None and mode == "end2end":
        from mmrec.fusion.end2end import build_encoder_source

        source = build_encoder_source(data, config)
    if source is None:
        source = FrozenFeatures(feature_tables(data, getattr(config, "features", None), what),
                                getattr(config, "feature_norm", "standard"))
    return ItemContentEncoder(source, dim, getattr(config, "fusion", "sum") or "sum",
                              getattr(config, "filtration", None))


__all__ = ["ContentFields", "FrozenFeatures", "ItemContentEncoder", "build_item_content", "feature_tables",
           "import_all_fusions"]
