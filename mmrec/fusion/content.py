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
- a *feature filtration* (``gate``: behavior-guided purification using the item ID
  embedding; ``modality-gate``: one learned weight per modality) may rewrite the
  projected modalities;
- a *fusion* (``sum``, ``concat``, ``attention``, ``gated``, ...) combines them into one
  vector per item. Masked modalities never contribute;
- an optional *feature enhancement* (``ENHANCEMENTS``: ``mdr``, ``ghmfc``;
  :mod:`mmrec.fusion.enhancement`) rewrites the fused vector and adds a self-supervised
  loss over the step's items (:meth:`ItemContentEncoder.enhancement_loss`).

With ``modality_dropout = p > 0`` the encoder hides, in training only, each modality an
item has with probability p from the filtration and the fusion
(:func:`~mmrec.fusion.modality_gate.drop_modalities`).

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
from mmrec.registry import ENHANCEMENTS, FILTRATIONS, FUSIONS

Parts = dict[str, Tensor]

#: Modules whose import registers fusions / filtrations (absent ones are skipped).
FUSION_MODULES = ("mmrec.fusion.simple", "mmrec.fusion.attention", "mmrec.fusion.nova",
                  "mmrec.fusion.filtration", "mmrec.fusion.edge_filtration",
                  "mmrec.fusion.modality_gate", "mmrec.fusion.enhancement")


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
    modality_dropout: float = 0.0       # training only: hide each of an item's modalities with this probability
    # end-to-end mode (--mode end2end): encoders fine-tuned with the recommendation loss
    mode: str = "two-step"
    encoders: dict[str, Any] | None = None  # modality -> encoder name or {name: ..., kwargs}; default: small CPU ones
    encoders_run: str | None = None         # a `mmrec pretrain` run whose encoders start the fine-tuning
    encoder_dim: int = 64                   # projection size of the default encoders
    encode_active: int = 64                 # items re-encoded with gradient per step (the rest: memory bank)
    align_weight: float = 0.1               # weight of the content <-> item-ID alignment loss
    # feature enhancement after the fusion (mmrec/fusion/enhancement.py): mdr | ghmfc | None
    enhancement: str | None = None
    enhance_weight: float = 0.1             # weight of the enhancement's loss (added by auxiliary_loss)
    enhance_temperature: float = 0.2        # InfoNCE temperature of the enhancement's contrastive terms
    enhance_items: int = 512                # at most this many of the step's items enter the enhancement loss


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

    def projection_rms(self, modality: str, weight: Tensor) -> Tensor:
        """``sqrt(mean_i ‖W x_i‖²)`` over the items that have ``modality``, for a projection ``W``
        [dim, d_m], differentiable in ``W``, without projecting the catalogue.

        ``mean_i ‖W x_i‖² = ‖F Wᵀ‖²_F`` for any ``F`` with ``FᵀF = XᵀX / n`` (X: present rows);
        ``F`` (at most ``d_m × d_m``: ``Λ^½ Qᵀ`` of the Gram's eigendecomposition when n > d_m) is
        computed once and cached,
        so a step costs ``d_m² · dim`` whatever the catalogue size.
        """
        cache = self.__dict__.setdefault("_rms_factors", {})
        key = (modality, weight.device)
        if key not in cache:
            x = getattr(self, f"feat_{modality}")[getattr(self, f"mask_{modality}")]
            n, d = max(int(x.shape[0]), 1), int(x.shape[1])
            if x.shape[0] <= d:
                f = x.double() / n ** 0.5
            else:  # F = Λ^½ Qᵀ of XᵀX / n = Q Λ Qᵀ (Gram accumulated in float64 by blocks: d² memory)
                gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
                for start in range(0, x.shape[0], 65536):
                    block = x[start:start + 65536].double()
                    gram += block.T @ block
                evals, evecs = torch.linalg.eigh(gram / n)
                f = evals.clamp_min(0).sqrt().unsqueeze(1) * evecs.T
            cache[key] = f.float().to(weight.device)
        return (cache[key] @ weight.T).pow(2).sum().sqrt()

    def forward(self) -> tuple[Parts, Parts]:
        """(features [n, d_m] per modality, presence masks [n] per modality)."""
        return {m: getattr(self, f"feat_{m}") for m in self.modalities}, self.masks()


class ItemContentEncoder(nn.Module):
    """Source -> per-modality linear projection -> (modality dropout) -> optional filtration -> fusion
    -> optional enhancement.

    With an ``enhancement``, every training forward that builds a graph (:meth:`forward` over
    the catalogue, :meth:`encode_rows` over a batch's items) keeps its parts for
    :meth:`enhancement_loss`, which the model's ``auxiliary_loss`` reads once per step.
    """

    def __init__(self, source: nn.Module, dim: int, fusion: str = "sum", filtration: str | None = None,
                 init_std: float = 0.1, modality_dropout: float = 0.0, enhancement: str | None = None,
                 enhance_temperature: float = 0.2, enhance_items: int = 512) -> None:
        super().__init__()
        import_all_fusions()
        if not 0.0 <= modality_dropout < 1.0:
            raise ConfigError(f"model.modality_dropout must be in [0, 1), got {modality_dropout}")
        if enhance_items < 2:
            raise ConfigError(f"model.enhance_items must be >= 2 (items contrasted per step), got {enhance_items}")
        self.modality_dropout = float(modality_dropout)
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
        self.enhancement: nn.Module | None = None
        if enhancement:
            self.enhancement = ENHANCEMENTS.get(enhancement)(self.modalities, dim, temperature=enhance_temperature)
        self.enhancement_name = enhancement or None
        self.enhance_items = int(enhance_items)
        self._enhance_step: tuple[Parts, Parts, Tensor | None] | None = None  # this step's parts (training)
        self.active_items: Tensor | None = None   # the step's items (Recommender.on_batch -> set_active)
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
        for module in (self.fusion, self.filtration, self.enhancement):
            if module is not None and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def modality_embeddings(self, id_emb: Tensor | None = None) -> tuple[Parts, Parts]:
        """Projected (and filtered) modality embeddings [n, dim] with their masks.

        In training with ``modality_dropout`` the masks are those after the dropout. A model
        that fuses these itself bypasses the enhancement, so with one this is refused.
        """
        if self.enhancement is not None:
            raise ConfigError(f"model.enhancement '{self.enhancement_name}' acts on the fused vector of the content "
                              "encoder, but this model fuses the modality embeddings itself; use the enhancement "
                              "with vbpr, freedom, or lightgcn / lightgcn-mb / cigf / mbgmn with use_features")
        return self._modality_embeddings(id_emb)

    def _modality_embeddings(self, id_emb: Tensor | None = None) -> tuple[Parts, Parts]:
        feats, masks = self.source()
        return self._project(feats, masks, id_emb)

    def encode_rows(self, rows: Tensor, id_rows: Tensor | None = None, fuse: bool = True) -> Tensor | Parts:
        """``self(id_emb)[rows]`` (or the rows of ``modality_embeddings``), computed for ``rows`` only.

        Projection, mask, filtration and fusion act on each item separately, so a BPR step
        that needs a batch's items projects those, not the whole catalogue: same values,
        same gradients. ``id_rows``: the ID embeddings of ``rows`` (what a filtration reads).
        """
        feats, masks = self.source()
        feats = {m: feats[m][rows] for m in self.modalities}
        masks = {m: masks[m][rows] for m in self.modalities}
        parts, masks = self._project(feats, masks, id_rows)
        self._keep_for_enhancement(parts, masks, rows)
        if not fuse:
            return parts
        return self._enhance(self.fusion(parts, masks, id_rows), parts, masks)

    def encode_rows_weights_only(self, rows: Tensor) -> Tensor:
        """``self()[rows]`` as in evaluation, with a gradient for the filtration's parameters only.

        The projections (and their catalogue norms) are computed without gradient: a model
        that learns its modality weights on held-out items (VBPR's ``gate_holdout``) uses this,
        so those items' interactions never fit the projections (they stay unseen, like cold
        items, to everything but the weights). The fusion's parameters, if any, are shared
        by all items and learn here too.
        """
        feats, masks = self.source()
        feats = {m: feats[m][rows] for m in self.modalities}
        masks = {m: masks[m][rows] for m in self.modalities}
        with torch.no_grad():
            parts = {m: self.proj[m](feats[m]) * masks[m].unsqueeze(1).to(feats[m].dtype) for m in self.modalities}
            wants = getattr(self.filtration, "wants_scale", False)
            extra = {"scales": self.projection_rms(parts, masks)} if wants else {}
        if self.filtration is not None:
            parts = self.filtration(parts, None, masks, **extra)
            parts = {m: p * masks[m].unsqueeze(1).to(p.dtype) for m, p in parts.items()}
        return self.fusion(parts, masks, None)

    def _project(self, feats: Parts, masks: Parts, id_emb: Tensor | None) -> tuple[Parts, Parts]:
        """Per-modality projection, masked; modality dropout (training); the feature filtration,
        masked again. Returns the parts and the masks the fusion must use."""
        if self.training and self.modality_dropout > 0:
            from mmrec.fusion.modality_gate import drop_modalities

            kept = drop_modalities(masks, self.modality_dropout)
            if not getattr(self.fusion, "renormalises", False):  # inverted dropout: |M_i| / |kept_i|
                n_present = sum(masks[m].to(torch.float32) for m in self.modalities)
                n_kept = sum(kept[m].to(torch.float32) for m in self.modalities)
                factor = (n_present / n_kept.clamp_min(1)).unsqueeze(1)
                feats = {m: feats[m] * factor.to(feats[m].dtype) for m in self.modalities}
            masks = kept
        parts = {m: self.proj[m](feats[m]) * masks[m].unsqueeze(1).to(feats[m].dtype) for m in self.modalities}
        if self.filtration is not None:
            if getattr(self.filtration, "wants_scale", False):
                parts = self.filtration(parts, id_emb, masks, scales=self.projection_rms(parts, masks))
            else:
                parts = self.filtration(parts, id_emb, masks)
            parts = {m: p * masks[m].unsqueeze(1).to(p.dtype) for m, p in parts.items()}
        return parts, masks

    def projection_rms(self, parts: Parts | None = None, masks: Parts | None = None) -> Parts:
        """Per modality, the RMS norm of its projection over the catalogue's items that have it.

        Exact and cheap for stored features (:meth:`FrozenFeatures.projection_rms`); for
        other sources (encoders fine-tuned end to end) estimated from the rows of ``parts``.
        """
        exact = getattr(self.source, "projection_rms", None)
        if exact is not None:
            return {m: exact(m, self.proj[m].weight) for m in self.modalities}
        if parts is None or masks is None:
            raise ConfigError("projection_rms: this content source needs the current parts and masks")
        out = {}
        for m in self.modalities:
            rows = parts[m][masks[m].bool()]
            out[m] = rows.pow(2).sum(1).mean().sqrt() if rows.shape[0] else parts[m].new_ones(())
        return out

    def modality_weights(self) -> dict[str, dict[str, float | int | None]] | None:
        """Learned per-modality weights (mean / std over the items that have each modality), or
        None when the filtration has no modality weighting; ``metrics.json`` reports them."""
        report = getattr(self.filtration, "modality_weights", None)
        if report is None:
            return None
        return report({m: mask.detach().cpu() for m, mask in self.source.masks().items()})

    def forward(self, id_emb: Tensor | None = None) -> Tensor:
        parts, masks = self._modality_embeddings(id_emb)
        self._keep_for_enhancement(parts, masks, None)
        out = self._enhance(self.fusion(parts, masks, id_emb), parts, masks)
        self.last_output = out if out.requires_grad else None  # for the end-to-end alignment loss
        return out

    # -- feature enhancement ----------------------------------------------------------
    def _enhance(self, fused: Tensor, parts: Parts, masks: Parts) -> Tensor:
        return fused if self.enhancement is None else self.enhancement(fused, parts, masks)

    def _keep_for_enhancement(self, parts: Parts, masks: Parts, rows: Tensor | None) -> None:
        """Keep a training forward's parts (rows None: the whole catalogue) for :meth:`enhancement_loss`."""
        if self.enhancement is None or not self.training or not torch.is_grad_enabled():
            return
        if any(p.requires_grad for p in parts.values()) or any(p.requires_grad for p in self.enhancement.parameters()):
            self._enhance_step = (parts, masks, rows)

    def set_active(self, items: Tensor) -> None:
        """The items of the coming training step (called by ``Recommender.on_batch``)."""
        self.active_items = items.detach()

    def enhancement_loss(self) -> Tensor | None:
        """The enhancement's loss over the items of the last training forward; None without one.

        After :meth:`encode_rows` those are its rows (a batch's items); after a catalogue-wide
        :meth:`forward` (graph models) the step's items given to :meth:`set_active`, or a
        random sample of the catalogue when none were given. At most ``enhance_items`` of them
        (a seeded random subset), so a step costs O(enhance_items² · dim) whatever the
        catalogue size. The kept parts are released: a second call in the same step gives None.
        """
        step, self._enhance_step = self._enhance_step, None
        if self.enhancement is None or step is None:
            return None
        parts, masks, rows = step
        n = next(iter(parts.values())).shape[0]
        device = next(iter(parts.values())).device
        if rows is None and self.active_items is not None:
            pick = torch.unique(self.active_items.to(device))
            pick = pick[(pick >= 0) & (pick < n)]
        else:
            pick = torch.arange(n, device=device)
        if len(pick) > self.enhance_items:
            pick = pick[torch.randperm(len(pick), device=device)[: self.enhance_items]]
        return self.enhancement.loss({m: p[pick] for m, p in parts.items()},
                                     {m: k[pick] for m, k in masks.items()})

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
                              getattr(config, "filtration", None),
                              modality_dropout=getattr(config, "modality_dropout", 0.0),
                              **enhancement_args(config))


def enhancement_args(config: Any) -> dict[str, Any]:
    """The ``ItemContentEncoder`` keywords of a config's enhancement fields (empty without one)."""
    name = getattr(config, "enhancement", None)
    if not name:
        return {}
    return {"enhancement": name, "enhance_temperature": getattr(config, "enhance_temperature", 0.2),
            "enhance_items": getattr(config, "enhance_items", 512)}


__all__ = ["ContentFields", "FrozenFeatures", "ItemContentEncoder", "build_item_content", "enhancement_args",
           "feature_tables", "import_all_fusions"]
