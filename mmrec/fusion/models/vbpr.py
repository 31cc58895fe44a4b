r"""VBPR (He & McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback", AAAI 2016).

Prediction (Eq. 2 of the paper, visual bias term of Sec. 3.3):

.. math::
    \hat x_{ui} = \alpha + \beta_u + \beta_i + \gamma_u^\top \gamma_i + \theta_u^\top (\mathbf{E} f_i)
                  + \beta'^\top f_i

trained with BPR (Eq. 7): :math:`\sum \ln \sigma(\hat x_{uij}) - \lambda_\Theta \lVert\Theta\rVert^2`.
:math:`\alpha` and :math:`\beta_u` cancel in :math:`\hat x_{uij} = \hat x_{ui} - \hat x_{uj}` and
shift every item of a user by the same amount, so they change neither the loss nor any
ranking: they are left out (the paper notes the same for the pairwise objective).

:math:`f_i` is the item's content: every modality in ``data.items.features`` (VBPR's CNN
feature; MMRec concatenates text and image). :math:`\mathbf{E} f_i` is the
:class:`~mmrec.fusion.content.ItemContentEncoder`: one linear map per modality, then the
fusion. With the default ``sum`` fusion, :math:`\sum_m \mathbf{E}_m f^m_i = \mathbf{E}[f^1_i; \dots; f^M_i]`
is exactly VBPR's single embedding matrix applied to the concatenated features; other
fusions (``attention``, ``gated``, ``concat``) and filtrations (``gate``) plug in there.
:math:`\beta'^\top f_i = \sum_m \beta_m'^\top f^m_i` over the modalities the item has.

**Cold items.** An item with no training interaction keeps :math:`\gamma_i = 0` and
:math:`\beta_i = 0` (its ID rows are masked): it is scored by
:math:`\theta_u^\top \mathbf{E} f_i + \beta'^\top f_i`, the content part VBPR was designed for.

**ID dropout** (``id_dropout = p``, DropoutNet: Volkovs et al., NeurIPS 2017). Plain
VBPR lets :math:`\beta_i` and :math:`\gamma_i` absorb what an item's interactions say
(above all its popularity), so the content terms learn only the residual and cold
items, which have nothing else, are under-served. With ``p > 0`` each distinct item of a
training step is, with probability p, scored as a cold item (its ID rows masked), so the
content terms alone must rank it: :math:`\beta'^\top f_i` learns to predict popularity
from content. Scoring is unchanged; ``p = 0`` is the paper's model. (On ml100k-mm's
cold split it changed nothing measurable: docs/results.md.)

**With** ``--filtration modality-gate`` (docs/models/fusion.md) the content bias goes
through the gate too: :math:`\mathbf{E}` gets one more output row, :math:`\beta'_m`, and
the user side a constant 1 for it, so the gate's weight :math:`w_m` scales both
:math:`\theta_u^\top \mathbf{E}_m f^m_i` and :math:`\beta_m'^\top f^m_i`: a switched-off
modality loses its bias as well (on ml100k-mm the image bias is what hurts cold items
most). Same score form; ``content_bias: false`` keeps the bias out.

**Modality weights learned on simulated cold items** (``gate_holdout = q``, with
``modality-gate``). The training loss rewards a modality that lets the model *memorise*
warm items (a 1280-d image embedding is unique per item), not one that generalises to
new items. With ``q > 0`` a share q of the warm items (drawn once, seeded) is held out
as simulated cold items: scored as cold items (no ID embedding), their pairs train only
the gate's logits, through content scores computed without gradient to anything else
(:meth:`~mmrec.fusion.content.ItemContentEncoder.encode_rows_weights_only`), against
negatives drawn among the held-out items; every other pair trains the rest of the model
with the logits frozen. So the weights answer "which modalities rank items the content
part has never fitted", the cold-start question. The held-out items give up their ID
embeddings (they are scored from content, like cold items).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.fusion.content import ContentFields, build_item_content
from mmrec.fusion.models.backbone import bpr, check_positive, edge_filtration, filtration_uses_id, warm_items
from mmrec.graph.propagation import GraphRecommender
from mmrec.models.base import InnerProductScoring, ModelConfig
from mmrec.registry import FILTRATIONS, MODELS


@dataclass
class VBPRConfig(ContentFields, ModelConfig):
    """Sizes of MMRec's VBPR (64-d ID part, 64-d content part); λ as a BPR-MF default."""

    use_features: bool = True
    dim: int = 64             # K: γ_u, γ_i
    content_dim: int = 64     # K': θ_u and the rows of E
    reg: float = 1e-4         # λ_Θ on the batch's γ_u, θ_u, γ_i, γ_j, β_i, β_j (squared L2, / batch)
    reg_content: float = 0.0  # λ_E on E (and β'); the paper regularises E separately
    content_bias: bool = True  # the visual bias β'ᵀ f_i
    id_dropout: float = 0.0    # share of a step's items scored as if cold (γ_i = β_i = 0), see the module doc
    gate_holdout: float = 0.0  # share of warm items whose pairs train only the modality-gate weights (module doc)


@MODELS.register("vbpr")
class VBPR(InnerProductScoring, GraphRecommender):
    """VBPR: BPR-MF plus a content factor θ_uᵀ E f_i and a content bias β'ᵀ f_i.

    Subclasses :class:`GraphRecommender` for its scoring cache only: the item side
    (E f_i for every item) is computed once per evaluation, not once per user batch.
    """

    config_class: ClassVar[type] = VBPRConfig
    content_aware: ClassVar[bool] = True

    def __init__(self, n_users: int, n_items: int, warm: Tensor, content: nn.Module, config: VBPRConfig,
                 gated_bias: bool = False) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = n_users, n_items
        self.gated_bias = gated_bias   # β' is the content encoder's last output column (modality-gate)
        # bool [n_items]: simulated cold items (gate_holdout); saved with the weights, so a re-evaluation
        # (a fresh draw in from_dataset) scores the same items as cold
        self.register_buffer("holdout", None)
        self.gamma_user = nn.Embedding(n_users, config.dim)
        self.gamma_item = nn.Embedding(n_items, config.dim)
        self.theta_user = nn.Embedding(n_users, config.content_dim)
        self.item_bias = nn.Embedding(n_items, 1)
        self.content = content
        source = content.source
        self.feature_bias = nn.ModuleDict({m: nn.Linear(source.dims[m], 1, bias=False) for m in source.modalities}) \
            if config.content_bias and not gated_bias else None
        self.register_buffer("warm", warm.float().unsqueeze(1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for emb in (self.gamma_user, self.gamma_item, self.theta_user):
            nn.init.xavier_uniform_(emb.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.content.reset_parameters()
        if self.feature_bias is not None:
            for lin in self.feature_bias.values():
                nn.init.zeros_(lin.weight)

    @classmethod
    def from_dataset(cls, data: Dataset, config: VBPRConfig) -> "VBPR":
        for name in ("dim", "content_dim"):
            check_positive(name, getattr(config, name))
        for name in ("reg", "reg_content"):
            check_positive(name, getattr(config, name), allow_zero=True)
        if not 0.0 <= config.id_dropout < 1.0:
            raise ConfigError(f"model.id_dropout must be in [0, 1), got {config.id_dropout}")
        if not 0.0 <= config.gate_holdout < 1.0:
            raise ConfigError(f"model.gate_holdout must be in [0, 1), got {config.gate_holdout}")
        if not config.use_features:
            raise ConfigError("vbpr is BPR-MF plus item content: use_features must be true "
                              "(bprmf is the ID-only model)")
        feature_filtration, pruning = edge_filtration(config)
        if pruning is not None:
            raise ConfigError(f"filtration '{config.filtration}' prunes graph edges; vbpr has no graph "
                              "(use it with freedom, lattice or micro)")
        if filtration_uses_id(feature_filtration) and config.dim != config.content_dim:
            raise ConfigError(f"filtration '{feature_filtration}' gates content with the item ID embedding: "
                              f"model.dim ({config.dim}) must equal model.content_dim ({config.content_dim})")
        weighting = bool(feature_filtration) and hasattr(FILTRATIONS.get(feature_filtration), "weights_frozen")
        if config.gate_holdout > 0 and not weighting:
            raise ConfigError("model.gate_holdout trains the modality weights of --filtration modality-gate; "
                              f"the filtration is {feature_filtration!r}")
        gated_bias = weighting and config.content_bias
        content = build_item_content(data, config.content_dim + int(gated_bias), config,
                                     what="vbpr needs item features")
        warm = warm_items(data)
        model = cls(data.n_users, data.n_items, warm, content, config, gated_bias=gated_bias)
        if config.gate_holdout > 0:  # after the initialisation: defaults draw the same numbers as before
            candidates = warm.nonzero().squeeze(1)
            n = int(round(config.gate_holdout * len(candidates)))
            if n < 2:
                raise ConfigError(f"model.gate_holdout={config.gate_holdout} holds out {n} of {len(candidates)} "
                                  "warm items; at least 2 are needed")
            holdout = torch.zeros(data.n_items, dtype=torch.bool)
            holdout[candidates[torch.randperm(len(candidates))[:n]]] = True
            model.holdout = holdout
        return model

    def id_mask(self) -> Tensor:
        """[n_items, 1]: 1 where the item's ID rows are used (warm and not held out), else 0."""
        if self.holdout is None:
            return self.warm
        return self.warm * (~self.holdout).to(self.warm.dtype).unsqueeze(1)

    # -- forward --------------------------------------------------------------------
    def item_biases(self, rows: Tensor | None = None, warm: Tensor | None = None) -> Tensor:
        """β_i (0 for cold items) + β'ᵀ f_i of every item (or of ``rows``, whose ID mask ``warm`` may be given)."""
        if warm is None:
            warm = self.id_mask() if rows is None else self.id_mask()[rows]
        b = ((self.item_bias.weight if rows is None else self.item_bias(rows)) * warm).squeeze(1)
        if self.feature_bias is not None:
            feats, masks = self.content.source()
            for m, lin in self.feature_bias.items():
                f, present = (feats[m], masks[m]) if rows is None else (feats[m][rows], masks[m][rows])
                b = b + lin(f).squeeze(1) * present.to(b.dtype)
        return b

    def user_side(self, users: Tensor | None = None) -> Tensor:
        """[γ_u ‖ θ_u ‖ 1] of every user (or of ``users``); [γ_u ‖ θ_u ‖ 1 ‖ 1] with the gated bias."""
        g = self.gamma_user.weight if users is None else self.gamma_user(users)
        t = self.theta_user.weight if users is None else self.theta_user(users)
        return torch.cat([g, t, g.new_ones(g.shape[0], 1 + int(self.gated_bias))], dim=1)

    def compute_representations(self) -> tuple[Tensor, Tensor]:
        """([γ_u ‖ θ_u ‖ 1], [γ_i ‖ E f_i ‖ b_i]) of all users and items: their dot product is x̂_ui."""
        gamma_i = self.gamma_item.weight * self.id_mask()
        items = torch.cat([gamma_i, self.content(id_emb=gamma_i), self.item_biases().unsqueeze(1)], dim=1)
        return self.user_side(), items

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """BPR (Eq. 7) on the batch; only the batch's items go through E (same numbers as all items).

        With ``gate_holdout``: the pairs of held-out items train the modality weights only
        (:meth:`holdout_loss`), the others everything else.
        """
        self._cache = None
        u, i, j = batch["user"], batch["pos"], batch["neg"]
        if self.holdout is None or not self.training:
            return self.bpr_loss(u, i, j)
        held = self.holdout[i]
        rest = ~(held | self.holdout[j])
        with self.content.filtration.weights_frozen():
            loss = self.bpr_loss(u[rest], i[rest], j[rest]) if bool(rest.any()) else None
        if bool(held.any()):
            extra = self.holdout_loss(u[held], i[held])
            loss = extra if loss is None else loss + extra
        return loss if loss is not None else self.theta_user.weight.sum() * 0.0

    def holdout_loss(self, users: Tensor, pos: Tensor) -> Tensor:
        """BPR of content-only scores on held-out items, negatives drawn among the held-out items;
        only the modality weights (and a fusion's shared parameters) get a gradient."""
        pool = self.holdout.nonzero().squeeze(1)
        neg = pool[torch.randint(len(pool), pos.shape, device=pool.device)]
        rows, inverse = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        pair = inverse.view(2, -1).T                                   # [B, 2]: rows of (pos, neg)
        c = self.content.encode_rows_weights_only(rows)
        theta = self.theta_user(users).detach()
        if self.gated_bias:
            theta = torch.cat([theta, theta.new_ones(len(users), 1)], 1)
            scores = (theta.unsqueeze(1) * c[pair]).sum(-1)
        else:
            bias = self.item_biases(rows, torch.zeros_like(self.warm[rows])).detach()   # β'ᵀ f only
            scores = (theta.unsqueeze(1) * c[pair]).sum(-1) + bias[pair]
        return bpr(scores[:, 0], scores[:, 1])

    def bpr_loss(self, u: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """The paper's objective on the triples (u, i, j)."""
        rows, inverse = torch.unique(torch.cat([i, j]), return_inverse=True)
        warm = self.id_mask()[rows]
        if self.training and self.config.id_dropout > 0:  # DropoutNet: these rows are scored as cold ones
            warm = warm * (torch.rand(warm.shape, device=warm.device) >= self.config.id_dropout).to(warm.dtype)
        gamma_i = self.gamma_item(rows) * warm
        items = torch.cat([gamma_i, self.content.encode_rows(rows, gamma_i), self.item_biases(rows, warm).unsqueeze(1)], 1)
        ue = self.user_side(u)
        pos, neg = items[inverse[: len(i)]], items[inverse[len(i):]]
        loss = bpr((ue * pos).sum(-1), (ue * neg).sum(-1))
        w = warm.squeeze(1)
        l2_items = (self.gamma_item(rows).pow(2).sum(1) + self.item_bias(rows).squeeze(1).pow(2)) * w
        counts = torch.bincount(inverse, minlength=len(rows)).to(l2_items.dtype)   # each occurrence counts
        l2 = self.gamma_user(u).pow(2).sum() + self.theta_user(u).pow(2).sum() + (l2_items * counts).sum()
        loss = loss + self.config.reg * 0.5 * l2 / len(u)
        if self.config.reg_content > 0:
            e = sum(p.pow(2).sum() for p in self.content.proj.parameters())
            if self.feature_bias is not None:
                e = e + sum(p.pow(2).sum() for p in self.feature_bias.parameters())
            loss = loss + self.config.reg_content * 0.5 * e
        return loss

    # -- scoring ----------------------------------------------------------------------
    def item_embeddings(self) -> Tensor:
        """[γ_i ‖ E f_i] (the bias column(s) left out)."""
        return self.representations()[1][:, : self.config.dim + self.config.content_dim]


__all__ = ["VBPR", "VBPRConfig"]
