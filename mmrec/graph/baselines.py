"""Reference baselines: popularity, the behavior prior, and BPR-MF on the target behavior."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.models.base import InnerProductScoring, ModelConfig, Recommender
from mmrec.registry import MODELS


@dataclass
class PopConfig:
    """Popularity needs no hyper-parameters; ``behavior`` picks what is counted."""

    behavior: str | None = None  # default: the target behavior


@MODELS.register("pop")
class Popularity(Recommender):
    """Scores every item by its number of training interactions (same list for every user)."""

    config_class: ClassVar[type] = PopConfig
    trainable: ClassVar[bool] = False

    def __init__(self, n_items: int, behavior: str | None = None) -> None:
        super().__init__()
        self.behavior = behavior
        self.register_buffer("popularity", torch.zeros(n_items))

    @classmethod
    def from_dataset(cls, data: Dataset, config: PopConfig) -> "Popularity":
        return cls(data.n_items, config.behavior)

    def fit(self, data: Dataset) -> None:
        counts = np.asarray(data.matrix(self.behavior).sum(axis=0)).ravel()
        self.popularity.copy_(torch.from_numpy(counts.astype(np.float32)))

    def score_all(self, users: Tensor) -> Tensor:
        return self.popularity.unsqueeze(0).expand(len(users), -1)

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        return self.popularity[items]


@dataclass
class BehaviorPriorConfig:
    """Weights of the user's own auxiliary behaviors; null = the cascade position (view 1, cart 2)."""

    weights: dict[str, float] | None = None


@MODELS.register("behavior-prior")
class BehaviorPrior(Popularity):
    """x_ui = Σ_b w_b·[u did b on i in training] + popularity(i) / (max popularity + 1).

    The untrained multi-behavior reference: rank what the user already carted, then
    viewed, then the rest by target popularity (a term below 1, so it only breaks
    ties). In cascaded data most purchases were carted or viewed first, which makes
    this hard to beat; a multi-behavior model should be reported next to it.
    """

    config_class: ClassVar[type] = BehaviorPriorConfig

    def __init__(self, n_items: int, weights: dict[str, float]) -> None:
        super().__init__(n_items)  # popularity of the target behavior
        self.weights = weights
        self.prior: sp.csr_matrix | None = None

    @classmethod
    def from_dataset(cls, data: Dataset, config: BehaviorPriorConfig) -> "BehaviorPrior":
        aux = [b for b in data.behaviors if b != data.target]
        if config.weights is None:
            weights = {b: float(k + 1) for k, b in enumerate(aux)}
        else:
            unknown = sorted(set(config.weights) - set(data.behaviors))
            if unknown:
                raise ConfigError(f"model.weights names unknown behavior(s) {unknown}; the data has {data.behaviors}")
            weights = {b: float(w) for b, w in config.weights.items()}
        return cls(data.n_items, weights)

    def fit(self, data: Dataset) -> None:
        super().fit(data)
        self.popularity.div_(self.popularity.max() + 1.0)  # below 1: only breaks ties
        prior = sp.csr_matrix((data.n_users, data.n_items), dtype=np.float32)
        for b, w in self.weights.items():
            if w:
                prior = prior + w * data.matrix(b).astype(np.float32)
        self.prior = prior.tocsr()

    def _prior_rows(self, users: Tensor) -> Tensor:
        if self.prior is None:
            raise RuntimeError("behavior-prior scores need fit(data) first")
        rows = self.prior[users.cpu().numpy()].toarray()
        return torch.from_numpy(rows).to(self.popularity.device)

    def score_all(self, users: Tensor) -> Tensor:
        return self._prior_rows(users) + super().score_all(users)

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        return self._prior_rows(users).gather(1, items) + super().score(users, items)


@dataclass
class BPRMFConfig(ModelConfig):
    """Matrix factorisation trained with BPR (Rendle et al., UAI 2009)."""

    dim: int = 64
    reg: float = 1e-4
    init_std: float = 0.1


@MODELS.register("bprmf")
class BPRMF(InnerProductScoring, Recommender):
    """x_ui = <p_u, q_i>; loss = -ln σ(x_ui - x_uj) + reg·(|p_u|² + |q_i|² + |q_j|²)/2 per triple."""

    config_class: ClassVar[type] = BPRMFConfig

    def __init__(self, n_users: int, n_items: int, config: BPRMFConfig) -> None:
        super().__init__()
        self.config = config
        self.user_emb = nn.Embedding(n_users, config.dim)
        self.item_emb = nn.Embedding(n_items, config.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_emb.weight, std=self.config.init_std)
        nn.init.normal_(self.item_emb.weight, std=self.config.init_std)

    @classmethod
    def from_dataset(cls, data: Dataset, config: BPRMFConfig) -> "BPRMF":
        return cls(data.n_users, data.n_items, config)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        u = self.user_emb(batch["user"])
        i = self.item_emb(batch["pos"])
        j = self.item_emb(batch["neg"])
        diff = (u * i).sum(-1) - (u * j).sum(-1)
        reg = 0.5 * (u.pow(2).sum(-1) + i.pow(2).sum(-1) + j.pow(2).sum(-1))
        return (-F.logsigmoid(diff) + self.config.reg * reg).mean()

    def representations(self) -> tuple[Tensor, Tensor]:
        """(p, q): the score is a plain inner product of these tables (exportable, see docs/recommend.md)."""
        return self.user_emb.weight, self.item_emb.weight
