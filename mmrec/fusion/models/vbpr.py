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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.fusion.content import ContentFields, build_item_content
from mmrec.fusion.models.backbone import bpr, check_positive, edge_filtration, warm_items
from mmrec.graph.propagation import GraphRecommender
from mmrec.models.base import InnerProductScoring, ModelConfig
from mmrec.registry import MODELS


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


@MODELS.register("vbpr")
class VBPR(InnerProductScoring, GraphRecommender):
    """VBPR: BPR-MF plus a content factor θ_uᵀ E f_i and a content bias β'ᵀ f_i.

    Subclasses :class:`GraphRecommender` for its scoring cache only: the item side
    (E f_i for every item) is computed once per evaluation, not once per user batch.
    """

    config_class: ClassVar[type] = VBPRConfig
    content_aware: ClassVar[bool] = True

    def __init__(self, n_users: int, n_items: int, warm: Tensor, content: nn.Module, config: VBPRConfig) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = n_users, n_items
        self.gamma_user = nn.Embedding(n_users, config.dim)
        self.gamma_item = nn.Embedding(n_items, config.dim)
        self.theta_user = nn.Embedding(n_users, config.content_dim)
        self.item_bias = nn.Embedding(n_items, 1)
        self.content = content
        source = content.source
        self.feature_bias = nn.ModuleDict({m: nn.Linear(source.dims[m], 1, bias=False) for m in source.modalities}) \
            if config.content_bias else None
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
        if not config.use_features:
            raise ConfigError("vbpr is BPR-MF plus item content: use_features must be true "
                              "(bprmf is the ID-only model)")
        feature_filtration, pruning = edge_filtration(config)
        if pruning is not None:
            raise ConfigError(f"filtration '{config.filtration}' prunes graph edges; vbpr has no graph "
                              "(use it with freedom, lattice or micro)")
        if feature_filtration and config.dim != config.content_dim:
            raise ConfigError(f"filtration '{feature_filtration}' gates content with the item ID embedding: "
                              f"model.dim ({config.dim}) must equal model.content_dim ({config.content_dim})")
        content = build_item_content(data, config.content_dim, config, what="vbpr needs item features")
        return cls(data.n_users, data.n_items, warm_items(data), content, config)

    # -- forward --------------------------------------------------------------------
    def item_biases(self, rows: Tensor | None = None, warm: Tensor | None = None) -> Tensor:
        """β_i (0 for cold items) + β'ᵀ f_i of every item (or of ``rows``, whose ID mask ``warm`` may be given)."""
        if warm is None:
            warm = self.warm if rows is None else self.warm[rows]
        b = ((self.item_bias.weight if rows is None else self.item_bias(rows)) * warm).squeeze(1)
        if self.feature_bias is not None:
            feats, masks = self.content.source()
            for m, lin in self.feature_bias.items():
                f, present = (feats[m], masks[m]) if rows is None else (feats[m][rows], masks[m][rows])
                b = b + lin(f).squeeze(1) * present.to(b.dtype)
        return b

    def user_side(self, users: Tensor | None = None) -> Tensor:
        """[γ_u ‖ θ_u ‖ 1] of every user (or of ``users``)."""
        g = self.gamma_user.weight if users is None else self.gamma_user(users)
        t = self.theta_user.weight if users is None else self.theta_user(users)
        return torch.cat([g, t, g.new_ones(g.shape[0], 1)], dim=1)

    def compute_representations(self) -> tuple[Tensor, Tensor]:
        """([γ_u ‖ θ_u ‖ 1], [γ_i ‖ E f_i ‖ b_i]) of all users and items: their dot product is x̂_ui."""
        gamma_i = self.gamma_item.weight * self.warm
        items = torch.cat([gamma_i, self.content(id_emb=gamma_i), self.item_biases().unsqueeze(1)], dim=1)
        return self.user_side(), items

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """BPR (Eq. 7) on the batch; only the batch's items go through E (same numbers as all items)."""
        self._cache = None
        u, i, j = batch["user"], batch["pos"], batch["neg"]
        rows, inverse = torch.unique(torch.cat([i, j]), return_inverse=True)
        warm = self.warm[rows]
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
        """[γ_i ‖ E f_i] (the bias column left out)."""
        return self.representations()[1][:, :-1]


__all__ = ["VBPR", "VBPRConfig"]
