r"""A history-aware multi-behavior recommender: a graph model plus a learned evidence term.

The non-learned ``behavior-prior`` ("buy what you carted or viewed") beats every graph
model under full ranking because most test buys were viewed or carted in training (the
*repeat* part of the test set), and a graph model's inner product cannot memorise a
single user-item edge. On the *discovery* part (the item is new to the user) the rule is
blind and the graph model is all there is. This model owns both regimes:

.. math::
    s_{ui} = a \cdot s^{\text{backbone}}_{ui} + w^\top \psi_i + [\,(u,i) \in H\,]\; g_\theta(\phi_{ui})

``H`` is the set of (user, item) pairs with at least one *auxiliary* behavior in the
training rows, :math:`\phi_{ui}` the pair's evidence (per behavior: did it, log-count,
and how recent where the data has times; the user's history size; the item's target
popularity and its conversion rate from auxiliary to target behavior), and
:math:`g_\theta` a small MLP. :math:`w^\top \psi_i` is a linear item prior on every
item (target and auxiliary popularity, conversion rate): on discovery pairs, where g is
silent, a merged-behavior backbone ranks what users *view*, not what they buy. Both parts are trained with BPR on the target behavior;
negatives are partly *hard* (items in the user's history that were not bought), so
``g`` learns to rank *within* the history, which the rule does by a fixed cascade
order, and a ``discovery_share`` of the stacker's positives are simulated discoveries
(their views and carts are held out of the backbone and the evidence too), so ``g`` also
learns how far above never-seen items a history item belongs (in cascaded data every
training buy was viewed first: without them the bonus would grow without bound, crowding
discovery items out of every top list).

The backbone (any registered model; default ``lightgcn-mb``) trains with its own loss
and batches. ``a`` and ``g`` are a *stacked* re-scorer and must learn from backbone
scores of pairs the backbone did not train on: a graph model scores its own training
edges far above unseen ones, and a stacker fitted on them learns to trust the backbone
far too much (measured on beibei-mini: test Recall@20 0.39 with ``g`` fitted on the
backbone's own edges, 0.57 for ``g`` alone). So a seeded ``stack_share`` of the
training target pairs is held out of the backbone (its graph and its loss) and is the
stacker's positives, the way a test buy is absent from the graph while its views and
carts are present. Evidence and item statistics come from the backbone's training rows
only (:class:`PairEvidence`), never from a held-out row.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.datasets.sampling import is_positive, positive_keys, sample_negatives
from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.fusion.content import ContentFields
from mmrec.models.base import ModelConfig, Recommender, create_model, model_config
from mmrec.registry import MODELS


@dataclass
class HistoryConfig(ContentFields, ModelConfig):
    """``backbone`` and its ``backbone_args``; the evidence MLP and how it is trained."""

    backbone: str = "lightgcn-mb"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    hidden: int = 32                 # width of g's hidden layer
    evidence_batch: int = 1024       # stack positives per step for the evidence loss
    history_negatives: int = 8       # negatives per positive from the user's history (not bought)
    top_negatives: int = 8           # ... from the backbone's top ``top_pool`` items for the user
    random_negatives: int = 8        # ... uniform among items the user did not buy
    top_pool: int = 50
    evidence_dropout: float = 0.2    # share of stack positives whose evidence is hidden (simulated discoveries)
    evidence_weight: float = 1.0     # weight of the evidence BPR loss next to the backbone's loss
    stack_share: float = 0.2         # share of training target pairs held out of the backbone for the stacker
    discovery_share: float = 0.0     # share of those whose views and carts are held out too (measured: hurts, see docs)
    item_prior: bool = False         # add the linear item prior w·ψ_i on every item (option; see docs)
    discovery_weight: float = 0.0    # weight of a softmax without g / history negatives (option; see docs)
    reg: float = 1e-4                # L2 on g's weights


class PairEvidence:
    r"""Evidence features :math:`\phi_{ui}` of every training pair with an auxiliary behavior.

    Built from ``data.split_rows("train")`` only. Rows are the non-zeros of the user×item
    history matrix in row-major order (``keys`` sorted), so a user's pairs are a slice
    ``indptr[u]:indptr[u+1]``. Features (all scaled to about [0, 1]):

    * per auxiliary behavior b: ``[u did b on i]`` and ``log1p(count) / log1p(max count)``;
      with timestamps also recency: 1 for the user's latest event, 0 for the oldest;
    * ``log1p(|H_u|) / log1p(max |H_u|)``: a viewer of everything says less per view;
    * the item's target popularity (log, scaled) and its conversion rate
      ``(n_target(i) + 1) / (n_aux(i) + 2)`` from training rows.
    """

    def __init__(self, data: Dataset) -> None:
        if data.n_behaviors < 2:
            raise ConfigError(f"model 'history' needs auxiliary behaviors; dataset '{data.name}' has only "
                              f"{data.behaviors}")
        rows = data.split_rows("train")
        n_users, n_items, target = data.n_users, data.n_items, data.target_index
        self.n_items = n_items
        aux = [b for b in range(data.n_behaviors) if b != target]
        self.behaviors = [data.behaviors[b] for b in aux]
        is_aux = rows.behavior != target
        keys_all = rows.user[is_aux].astype(np.int64) * n_items + rows.item[is_aux]
        self.keys = np.unique(keys_all)
        users = self.keys // n_items
        self.indptr = np.searchsorted(users, np.arange(n_users + 1)).astype(np.int64)
        has_time = rows.timestamp is not None
        cols: list[np.ndarray] = []
        for b in aux:
            sel = rows.behavior == b
            k = rows.user[sel].astype(np.int64) * n_items + rows.item[sel]
            uk, counts = np.unique(k, return_counts=True)
            pos = np.searchsorted(self.keys, uk)
            did = np.zeros(len(self.keys), np.float32)
            cnt = np.zeros(len(self.keys), np.float32)
            did[pos] = 1.0
            cnt[pos] = np.log1p(counts)
            cols += [did, cnt / max(float(cnt.max()), 1e-6)]
        if has_time:
            cols.append(self._recency(rows, is_aux, n_items))
        size = np.diff(self.indptr).astype(np.float32)
        cols.append((np.log1p(size) / max(np.log1p(size.max()), 1e-6))[users])
        item = self.keys % n_items
        n_target = np.bincount(rows.item[~is_aux], minlength=n_items).astype(np.float32)
        n_aux = np.bincount(rows.item[is_aux], minlength=n_items).astype(np.float32)
        target_pop = np.log1p(n_target) / max(np.log1p(n_target.max()), 1e-6)
        conversion = (n_target + 1.0) / (n_aux + 2.0)
        cols.append(target_pop[item])
        cols.append(conversion[item])
        self.features = torch.from_numpy(np.stack(cols, axis=1).astype(np.float32))
        #: per item, for every item (history or not): target popularity, auxiliary popularity, conversion
        aux_pop = np.log1p(n_aux) / max(np.log1p(n_aux.max()), 1e-6)
        self.item_features = torch.from_numpy(np.stack([target_pop, aux_pop, conversion], axis=1).astype(np.float32))
        self.item_names = ["item_popularity", "item_aux_popularity", "item_conversion"]
        self.names = [f"{b}/{f}" for b in self.behaviors for f in ("did", "count")]
        self.names += (["recency"] if has_time else []) + ["history_size", "item_popularity", "item_conversion"]

    def _recency(self, rows, is_aux: np.ndarray, n_items: int) -> np.ndarray:
        """Per pair: its latest event's rank among the user's pairs, scaled to [0, 1] (1 = latest)."""
        k = rows.user[is_aux].astype(np.int64) * n_items + rows.item[is_aux]
        t = rows.timestamp[is_aux].astype(np.float64)
        order = np.lexsort((t, k))
        last = np.r_[k[order][1:] != k[order][:-1], True]
        latest = np.empty(len(self.keys))
        latest[np.searchsorted(self.keys, k[order][last])] = t[order][last]
        users = self.keys // n_items
        rank = np.lexsort((latest, users))  # by user, then time
        pos = np.empty(len(rank), np.float64)
        pos[rank] = np.arange(len(rank)) - self.indptr[users[rank]]
        size = np.diff(self.indptr)[users]
        return (pos / np.maximum(size - 1, 1)).astype(np.float32)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def lookup(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Row of each (user, item) pair in :attr:`features`, or -1 where the pair has no evidence."""
        q = users.astype(np.int64) * self.n_items + items.astype(np.int64)
        if len(self.keys) == 0:
            return np.full(len(q), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)  # one search, not two
        return np.where(self.keys[pos] == q, pos, -1)

    def history_items(self, user: int) -> np.ndarray:
        return self.keys[self.indptr[user]:self.indptr[user + 1]] % self.n_items


class EvidenceMLP(nn.Module):
    r""":math:`g_\theta(\phi) = w_2^\top \mathrm{ReLU}(W_1 \phi + b_1) + b_2`: the bonus of a history pair."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, phi: Tensor) -> Tensor:
        return self.net(phi).squeeze(-1)


def split_stack_pairs(data: Dataset, share: float, discovery_share: float = 0.0
                      ) -> tuple[Dataset, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """Hold a ``share`` of the training target rows out of the backbone's data.

    A ``discovery_share`` of those pairs loses *every* training row of its (user, item),
    auxiliary ones too: buys of items the backbone and the evidence never saw the user
    touch, the way a discovery buy in the test set looks. Seeded by torch's global
    generator (the run seeds it before building the model). Users keep at least one
    target row in the backbone's data. Returns the reduced dataset and the held-out
    (users, items, is_discovery); ``share = 0``: the data and ``None``.
    """
    if share <= 0:
        return data, None
    rows = data.split_rows("train")
    target = np.flatnonzero(rows.behavior == data.target_index)
    draw = torch.rand(len(target), dtype=torch.float64).numpy()
    held = target[draw < share]
    # keep each user's first target row with the backbone (no user loses every buy edge)
    first = np.unique(rows.user[target], return_index=True)[1]
    held = np.setdiff1d(held, target[first])
    disc = (torch.rand(len(held), dtype=torch.float64).numpy() < discovery_share if discovery_share > 0
            else np.zeros(len(held), dtype=bool))  # no draw when off: the RNG stream stays as before
    keep = np.ones(len(rows), dtype=bool)
    keep[held] = False
    if disc.any():
        keys = rows.pair_keys(data.n_items)
        keep &= ~np.isin(keys, keys[held[disc]])
    reduced = data.replace(train=rows.select(keep))
    users, items = rows.user[held].astype(np.int64), rows.item[held].astype(np.int64)
    return reduced, (users, items, disc)


def _backbone_args(config: HistoryConfig) -> dict[str, Any]:
    """``backbone_args`` plus the content fields set on this model (so ``--fusion`` reaches the backbone)."""
    args = dict(config.backbone_args)
    backbone_fields = {f.name for f in dataclasses.fields(model_config(config.backbone, {}))}
    for f in dataclasses.fields(ContentFields):
        value = getattr(config, f.name)
        if value != f.default and f.name in backbone_fields:
            args.setdefault(f.name, value)
    return args


@MODELS.register("history")
class HistoryAware(Recommender):
    """A backbone's score plus a learned bonus for pairs in the user's auxiliary history."""

    config_class: ClassVar[type] = HistoryConfig

    def __init__(self, backbone: Recommender, evidence: PairEvidence, target_keys: np.ndarray,
                 config: HistoryConfig, backbone_data: Dataset | None = None,
                 stack_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        super().__init__()
        counts = (config.history_negatives, config.top_negatives, config.random_negatives)
        if min(counts) < 0 or sum(counts) == 0 or config.top_negatives > config.top_pool:
            raise ConfigError("model.history_negatives / top_negatives / random_negatives must be >= 0 with a "
                              f"positive sum and top_negatives <= top_pool, got {counts} and {config.top_pool}")
        for name in ("evidence_dropout", "stack_share", "discovery_share"):
            value = getattr(config, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1], got {value}")
        self.config = config
        self.backbone = backbone
        self.evidence = evidence
        self.target_keys = target_keys
        self.backbone_data = backbone_data  # the training rows the backbone sees (stack pairs removed)
        self.stack_pairs = stack_pairs      # (users, items, is_discovery): the stacker's positives
        self.g = EvidenceMLP(evidence.dim, config.hidden)
        self.scale = nn.Parameter(torch.ones(()))
        self.prior = nn.Linear(evidence.item_features.shape[1], 1, bias=False) if config.item_prior else None
        if self.prior is not None:
            nn.init.zeros_(self.prior.weight)
        self.register_buffer("phi", evidence.features, persistent=False)
        self.register_buffer("psi", evidence.item_features, persistent=False)
        self.register_buffer("indptr", torch.from_numpy(evidence.indptr), persistent=False)
        self.register_buffer("hist_items", torch.from_numpy(evidence.keys % evidence.n_items), persistent=False)
        self._bonus: Tensor | None = None  # g over every history pair, cached for scoring

    @classmethod
    def from_dataset(cls, data: Dataset, config: HistoryConfig) -> "HistoryAware":
        if config.backbone == "history":
            raise ConfigError("model.backbone cannot be 'history' itself")
        backbone_data, stack = split_stack_pairs(data, config.stack_share, config.discovery_share)
        backbone = create_model(config.backbone, backbone_data, _backbone_args(config))
        return cls(backbone, PairEvidence(backbone_data), positive_keys(data.matrix()), config,
                   backbone_data, stack)

    # -- training -------------------------------------------------------------------
    def _data_for_backbone(self, data: Dataset) -> Dataset:
        return self.backbone_data if self.backbone_data is not None else data

    def fit(self, data: Dataset) -> None:
        self.backbone.fit(self._data_for_backbone(data))

    def training_batches(self, data: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Tensor]]:
        """The backbone's batches (stack pairs removed), each with ``ev_*`` triples of the stack pairs."""
        if self.stack_pairs is not None:
            users, items, disc = self.stack_pairs
        else:
            matrix = data.matrix().tocoo()
            users, items = matrix.row.astype(np.int64), matrix.col.astype(np.int64)
            disc = np.zeros(len(users), dtype=bool)
        for batch in self.backbone.training_batches(self._data_for_backbone(data), batch_size, rng):
            if len(users):
                batch.update(self._evidence_triples(users, items, disc, rng))
            yield batch

    def _evidence_triples(self, users: np.ndarray, items: np.ndarray, disc: np.ndarray,
                          rng: np.random.Generator) -> dict[str, Tensor]:
        """Positives from the stack pairs with history and random negatives (top ones come in ``loss``)."""
        cfg, ev = self.config, self.evidence
        idx = rng.integers(0, len(users), size=min(cfg.evidence_batch, len(users)))
        u, i = users[idx], items[idx]
        n_rand = cfg.random_negatives
        rand = sample_negatives(self.target_keys, u, ev.n_items, rng, max(n_rand, 1))[:, :n_rand]
        # history negatives: random items of the user's history that are not target positives;
        # a user without one gets random negatives in their place
        n_hist = cfg.history_negatives
        start, size = ev.indptr[u][:, None], np.diff(ev.indptr)[u][:, None]
        pick = start + (rng.random((len(u), n_hist)) * np.maximum(size, 1)).astype(np.int64)
        hist = ev.keys[np.minimum(pick, max(len(ev.keys) - 1, 0))] % ev.n_items if len(ev.keys) else \
            np.zeros((len(u), n_hist), np.int64)
        uu = np.repeat(u, n_hist)
        bad = (size == 0) | is_positive(self.target_keys, uu, hist.ravel(), ev.n_items).reshape(hist.shape)
        if bad.any():
            fill = sample_negatives(self.target_keys, uu, ev.n_items, rng)[:, 0].reshape(hist.shape)
            hist = np.where(bad, fill, hist)
        drop = rng.random(len(u)) < cfg.evidence_dropout
        return {"ev_user": torch.from_numpy(u), "ev_pos": torch.from_numpy(i),
                "ev_neg": torch.from_numpy(np.concatenate([hist, rand], axis=1)),
                "ev_drop": torch.from_numpy(drop), "ev_disc": torch.from_numpy(disc[idx])}

    @torch.no_grad()
    def _top_negatives(self, users: Tensor, pos: Tensor) -> Tensor:
        """``top_negatives`` random picks among the backbone's ``top_pool`` items per user (pos excluded)."""
        cfg = self.config
        scores = self.backbone.score_all(users).clone()
        scores[torch.arange(len(users), device=scores.device), pos] = float("-inf")
        pool = scores.topk(min(cfg.top_pool, scores.shape[1] - 1), dim=1).indices
        pick = torch.rand(pool.shape, device=pool.device).argsort(dim=1)[:, :cfg.top_negatives]
        return pool.gather(1, pick)

    def _item_prior(self, items: Tensor | None = None) -> Tensor | float:
        """w·ψ_i for ``items`` (any shape), or for every item when ``items`` is None; 0 without the prior."""
        if self.prior is None:
            return 0.0
        psi = self.psi if items is None else self.psi[items]
        return self.prior(psi).squeeze(-1)

    def _pair_bonus(self, users: Tensor, items: Tensor) -> Tensor:
        """g(φ_ui) for pairs in the history, 0 elsewhere (any shape)."""
        rows = self.evidence.lookup(users.reshape(-1).cpu().numpy(), items.reshape(-1).cpu().numpy())
        rows_t = torch.from_numpy(rows).to(self.phi.device)
        found = rows_t >= 0
        out = torch.zeros(len(rows_t), device=self.phi.device)
        if found.any():
            out = out.masked_scatter(found, self.g(self.phi[rows_t[found]]))
        return out.reshape(items.shape)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        loss = self.backbone.loss(batch)
        if "ev_user" not in batch:
            return loss
        u, i = batch["ev_user"], batch["ev_pos"]
        with self._backbone_step_scores():
            parts = [i.unsqueeze(1), batch["ev_neg"]]
            if self.config.top_negatives:
                parts.append(self._top_negatives(u, i))
            cand = torch.cat(parts, dim=1)  # column 0: the positive
            with torch.no_grad():  # a stacked re-scorer: the backbone learns from its own loss only
                base = self.backbone.score(u, cand)
        bonus = self._pair_bonus(u.unsqueeze(1).expand_as(cand), cand)
        bonus = torch.cat([bonus[:, :1].masked_fill(batch["ev_drop"].unsqueeze(1), 0.0), bonus[:, 1:]], dim=1)
        s = self.scale * base + self._item_prior(cand) + bonus
        # sampled softmax over the positive and its negatives: the top of a full ranking, not one pair
        zeros = torch.zeros(len(s), dtype=torch.long, device=s.device)
        listwise = F.cross_entropy(s, zeros)
        loss = loss + self.config.evidence_weight * listwise
        disc = batch.get("ev_disc")
        if self.config.discovery_weight and disc is not None and bool(disc.any()):
            # the ranking among items new to the user (a·s + w·ψ alone, no history negatives), on the
            # simulated discoveries: what fills a top list's remaining slots, all a discovery buy has
            n_hist = self.config.history_negatives
            keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + n_hist, cand.shape[1])])
            s_new = (self.scale * base + self._item_prior(cand))[disc][:, keep.to(s.device)]
            loss = loss + self.config.discovery_weight * F.cross_entropy(s_new, zeros[disc])
        l2 = sum(p.pow(2).sum() for n, p in self.g.named_parameters() if n.endswith("weight"))
        return loss + self.config.reg * l2

    @contextlib.contextmanager
    def _backbone_step_scores(self) -> Iterator[None]:
        """Score with the representations the backbone's loss just computed (no second propagation)."""
        step = getattr(self.backbone, "step_representations", None)
        if step is None:
            yield
            return
        self.backbone._cache = step
        try:
            yield
        finally:
            self.backbone._cache = None
            self.backbone.step_representations = None

    def on_batch(self, batch: dict[str, Tensor]) -> None:
        self.backbone.on_batch(batch)

    def auxiliary_loss(self) -> Tensor | None:
        return self.backbone.auxiliary_loss()

    def train(self, mode: bool = True) -> "HistoryAware":
        self._bonus = None
        return super().train(mode)

    # -- scoring --------------------------------------------------------------------
    @torch.no_grad()
    def prepare_eval(self) -> None:
        self.backbone.prepare_eval()
        self._bonus = self.g(self.phi)

    def score_all(self, users: Tensor) -> Tensor:
        scores = self.scale * self.backbone.score_all(users) + self._item_prior()
        bonus = self._bonus if self._bonus is not None else self.g(self.phi)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        if int(lengths.sum()) == 0:
            return scores
        row = torch.repeat_interleave(torch.arange(len(users), device=scores.device), lengths)
        offset = torch.arange(int(lengths.sum()), device=scores.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths)
        flat = torch.repeat_interleave(starts, lengths) + offset
        scores[row, self.hist_items[flat]] += bonus[flat]
        return scores

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        return self.scale * self.backbone.score(users, items) + self._item_prior(items) + self._pair_bonus(
            users.unsqueeze(1).expand_as(items), items)

    def item_embeddings(self) -> Tensor | None:
        return self.backbone.item_embeddings()

    def evidence_importance(self) -> dict[str, float]:
        """|∂g/∂φ| averaged over history pairs, per feature: what the bonus listens to."""
        phi = self.phi.detach().clone().requires_grad_(True)
        self.g(phi).sum().backward()
        grad = phi.grad.abs().mean(0)
        self.g.zero_grad(set_to_none=True)
        return {name: round(float(v), 4) for name, v in zip(self.evidence.names, grad)}
