"""CIGF: Compressed Interaction Graph based Framework (Guo et al., WWW 2023).

"Compressed Interaction Graph based Framework for Multi-behavior Recommendation",
reference code: github.com/MC-CV/CIGF (TensorFlow; ``base_framework_origin_final.py``,
``defineModel`` / ``sesg_predict``). Two parts:

* **CIGCN** (compressed interaction graph convolution): one branch per behavior t.
  Its first layer propagates on behavior t's graph; every later layer propagates the
  previous layer's message through the graphs of *all* behaviors and mixes them with
  node-specific behavior weights computed from the node's ego embedding, so a
  branch captures instance-level high-order relations across behaviors. Residual
  accumulation across layers, sum over layers (as the reference code).
* **MESI** (multi-expert with separate input): expert k sees only branch k's
  representations (``e_u^k ⊙ e_i^k``); task t's gate reads branch t's pair and mixes
  the experts with a softmax. One BPR loss per behavior, summed.

Where the paper text and the reference code differ, the default follows the paper and
a config switch reproduces the code (see docs/models/graph.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError
from mmrec.graph.propagation import (MultiBehaviorGraphRecommender, SparseGraphs, behavior_adjacencies,
                                     item_content_projection)
from mmrec.fusion.content import ContentFields
from mmrec.models.base import ModelConfig
from mmrec.registry import MODELS

WEIGHT_NORMS = ("softmax", "leakyrelu")


@dataclass
class CIGFConfig(ContentFields, ModelConfig):
    """Defaults: the paper's settings as shipped in MC-CV/CIGF ``Params.py`` (Beibei)."""

    dim: int = 16                 # latdim 32 // 2: embedding size of every node
    layers: int = 2               # gnn_layer (README: 4 for Tmall and IJCAI)
    reg: float = 1e-2             # × Σ‖θ‖² of embedding tables and FC weights (the code's Regularize())
    norm: str = "left"            # graph normalisation D^-1 A (code default); "sym" also available
    weight_norm: str = "softmax"  # node-specific behavior weights: softmax across behaviors | leakyrelu (code)
    leaky: float = 0.1            # LeakyReLU slope of the reference NNLayers
    shared_gate: bool = False     # True: one gate for every task, as the code's reused 'gate111'
    mult: float = 300.0           # score multiplier of the reference code (args.mult)
    loss_weights: list[float] | None = None  # per-behavior BPR weights (cascade order); default all 1
    samples_per_user: int = 40    # sampNum: triples per user and behavior in a batch
    users_per_epoch: int = 0      # trnNum (code: 10000); 0 = every user with an interaction


class CIGConv(nn.Module):
    r"""One compressed interaction graph convolution (CIGCN layers :math:`l \ge 2`).

    .. math::
        \boldsymbol{\alpha}_v = \operatorname{softmax}_k\!\big(\mathbf{W}\mathbf{e}^{(0)}_v + \mathbf{b}\big)
        \in \Delta^{K},\qquad
        \mathbf{m}^{(l)}_v = \sum_{k=1}^{K} \alpha_{v,k} \sum_{j \in \mathcal{N}_k(v)} \hat{A}^{k}_{vj}\,\mathbf{m}^{(l-1)}_j

    ``α_v`` are node-specific behavior weights (softmax across behaviors per node;
    ``weight_norm="leakyrelu"`` gives the reference code's unnormalised LeakyReLU),
    :math:`\hat{A}^k` the normalised graph of behavior k. No feature transform: the
    propagation is linear as in LightGCN, the encoder the paper builds on.
    """

    def __init__(self, dim: int, n_behaviors: int, weight_norm: str = "softmax", leaky: float = 0.1) -> None:
        super().__init__()
        if weight_norm not in WEIGHT_NORMS:
            raise ConfigError(f"model.weight_norm must be one of {', '.join(WEIGHT_NORMS)}, not '{weight_norm}'")
        self.att = nn.Linear(dim, n_behaviors)
        self.weight_norm = weight_norm
        self.leaky = leaky
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.att.weight)
        nn.init.zeros_(self.att.bias)

    def behavior_weights(self, ego: Tensor) -> Tensor:
        """α [N, K] from the ego embeddings [N, d]."""
        logits = self.att(ego)
        if self.weight_norm == "softmax":
            return logits.softmax(dim=-1)
        return F.leaky_relu(logits, self.leaky)

    def forward(self, m: Tensor, ego: Tensor, graphs: SparseGraphs) -> Tensor:
        alpha = self.behavior_weights(ego)
        out = 0
        for k in range(len(graphs)):
            out = out + alpha[:, k:k + 1] * graphs.propagate(k, m)
        return out


class CIGCN(nn.Module):
    r"""One CIGCN branch per behavior t (reference ``defineModel`` with ``multi_graph``).

    .. math::
        \mathbf{m}^{(1)} = \hat{A}^{t}\mathbf{E}^{(0)},\quad
        \mathbf{m}^{(l)} = \mathrm{CIGConv}_{t,l}(\mathbf{m}^{(l-1)}),\quad
        \mathbf{h}^{(l)} = \mathbf{h}^{(l-1)} + \mathbf{m}^{(l)},\quad
        \mathbf{E}^{t} = \sum_{l=0}^{L}\mathbf{h}^{(l)},\ \ \mathbf{h}^{(0)} = \mathbf{E}^{(0)}
    """

    def __init__(self, dim: int, n_behaviors: int, layers: int, weight_norm: str, leaky: float) -> None:
        super().__init__()
        if layers < 1:
            raise ConfigError(f"model.layers must be at least 1, got {layers}")
        self.branches = nn.ModuleList(
            nn.ModuleList(CIGConv(dim, n_behaviors, weight_norm, leaky) for _ in range(layers - 1))
            for _ in range(n_behaviors))

    def reset_parameters(self) -> None:
        for branch in self.branches:
            for conv in branch:
                conv.reset_parameters()

    def forward(self, ego: Tensor, graphs: SparseGraphs) -> Tensor:
        """[K, N, d]: the representation of every node in every behavior branch."""
        outs = []
        for t, branch in enumerate(self.branches):
            m = graphs.propagate(t, ego)  # first layer: behavior t's own graph
            h = ego + m
            total = ego + h
            for conv in branch:
                m = conv(m, ego, graphs)
                h = h + m
                total = total + h
            outs.append(total)
        return torch.stack(outs)


class MESI(nn.Module):
    r"""Multi-Expert with Separate Input (reference ``sesg_predict``).

    .. math::
        f_k(u,i) = \mathbf{e}^{k}_u \odot \mathbf{e}^{k}_i,\qquad
        \mathbf{g}^{t} = \operatorname{softmax}\big(\mathbf{W}_t[\mathbf{e}^{t}_u \,\|\, \mathbf{e}^{t}_i] + \mathbf{b}_t\big),\qquad
        \hat{y}^{t}_{ui} = c\cdot\mathbf{1}^{\top}\sum_{k=1}^{K} g^{t}_{k}\, f_k(u,i)

    Expert k gets only behavior k's representations (the separate input); each task t
    has its own gate fed with its own branch (``shared_gate=True``: one gate for all
    tasks, as the reference code). ``c`` is the code's score multiplier.
    """

    def __init__(self, dim: int, n_behaviors: int, shared_gate: bool = False, mult: float = 1.0) -> None:
        super().__init__()
        self.n_behaviors = n_behaviors
        self.gates = nn.ModuleList(nn.Linear(2 * dim, n_behaviors) for _ in range(1 if shared_gate else n_behaviors))
        self.mult = mult
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for g in self.gates:
            nn.init.xavier_uniform_(g.weight)
            nn.init.zeros_(g.bias)

    def gate_params(self, task: Tensor) -> tuple[Tensor, Tensor]:
        """(W [R, K, 2d], b [R, K]) of each row's task."""
        w = torch.stack([g.weight for g in self.gates])
        b = torch.stack([g.bias for g in self.gates])
        idx = torch.zeros_like(task) if len(self.gates) == 1 else task
        return w[idx], b[idx]

    def gate(self, task: Tensor, u_task: Tensor, i_task: Tensor) -> Tensor:
        """Gate weights [R, K] of rows whose task is ``task`` [R] (inputs: that task's branch, [R, d])."""
        w, b = self.gate_params(task)
        x = torch.cat([u_task, i_task], dim=-1)
        return (torch.einsum("rkd,rd->rk", w, x) + b).softmax(dim=-1)

    def forward(self, task: Tensor, u: Tensor, i: Tensor) -> Tensor:
        """Scores [R] of pairs with all-branch representations ``u``, ``i`` [K, R, d] and ``task`` [R]."""
        rows = torch.arange(u.size(1), device=u.device)
        g = self.gate(task, u[task, rows], i[task, rows])              # [R, K]
        experts = (u * i).sum(-1)                                      # [K, R]: 1ᵀ(e_u^k ⊙ e_i^k)
        return self.mult * (g * experts.T).sum(-1)

    def score_all(self, task: int, u: Tensor, items: Tensor, block: int = 1 << 20) -> Tensor:
        """Scores [B, I] of users ``u`` [K, B, d] against every item ``items`` [K, I, d] for one task.

        The gate logit of a pair is a user part plus an item part (it is linear in
        [e_u ‖ e_i]), so with α_uk = exp(a_uk − max a_u) and γ_ik = exp(c_ik − max c_i)
        the gated mixture is a ratio of two matrix products, with no per-pair ``exp``:
        Σ_k softmax_k(a_uk + c_ik)·⟨u_k, i_k⟩ = ⟨[α_uk u_k]_k, [γ_ik i_k]_k⟩ / ⟨α_u, γ_i⟩.
        Pairs whose denominator is too small to trust (every expert's α·γ near underflow:
        the user's and the item's favourite experts differ by ~70 logits) are recomputed
        with the softmax (:meth:`_score_all_softmax`).
        """
        g = self.gates[0 if len(self.gates) == 1 else task]
        d = u.size(-1)
        gate_u = u[task] @ g.weight[:, :d].T + g.bias                  # [B, K]
        gate_i = items[task] @ g.weight[:, d:].T                        # [I, K]
        alpha = torch.exp(gate_u - gate_u.amax(1, keepdim=True))
        gamma = torch.exp(gate_i - gate_i.amax(1, keepdim=True))
        users_w = (alpha.T.unsqueeze(2) * u).permute(1, 0, 2).reshape(u.size(1), -1)       # [B, K·d]
        items_w = (gamma.T.unsqueeze(2) * items).permute(1, 0, 2).reshape(items.size(1), -1)  # [I, K·d]
        den = alpha @ gamma.T
        out = (users_w @ items_w.T).div_(den)
        bad = (den < self._tiny(den.dtype)).any(1).nonzero().squeeze(1)
        if len(bad):
            out[bad] = self._score_all_softmax(gate_u[bad].T, gate_i.T, u[:, bad], items, block)
        return self.mult * out

    @staticmethod
    def _tiny(dtype: torch.dtype) -> float:
        return torch.finfo(dtype).tiny * 2 ** 20  # far from subnormals: the ratio keeps its precision

    @staticmethod
    def _score_all_softmax(gate_u: Tensor, gate_i: Tensor, u: Tensor, items: Tensor, block: int) -> Tensor:
        """The mixture with an explicit softmax per pair (gate_u [K, B], gate_i [K, I]).

        Users go in blocks of about ``block`` pairs; every intermediate is expert-major
        [K, b, I], so the softmax over K runs across contiguous planes.
        """
        gate_u, gate_i = gate_u.unsqueeze(2), gate_i.unsqueeze(1)
        items_t = items.transpose(1, 2).contiguous()                      # [K, d, I], once
        step = max(1, block // max(1, items.size(1)))
        out = u.new_empty(u.size(1), items.size(1))
        for s in range(0, u.size(1), step):
            gates = torch.softmax(gate_u[:, s:s + step] + gate_i, dim=0)  # [K, b, I]
            experts = torch.bmm(u[:, s:s + step], items_t)                # 1ᵀ(e_u^k ⊙ e_i^k)
            out[s:s + step] = (gates * experts).sum(0)
        return out


@MODELS.register("cigf")
class CIGF(MultiBehaviorGraphRecommender):
    """CIGCN encoder + MESI head, trained with one BPR loss per behavior."""

    config_class: ClassVar[type] = CIGFConfig

    def __init__(self, n_users: int, n_items: int, graphs: SparseGraphs, target: int, config: CIGFConfig,
                 content: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.n_users, self.n_items = n_users, n_items
        self.n_behaviors = len(graphs)
        self.target = target
        self.graphs = graphs
        self.user_emb = nn.Embedding(n_users, config.dim)
        self.item_emb = nn.Embedding(n_items, config.dim)
        self.content = content
        self.encoder = CIGCN(config.dim, self.n_behaviors, config.layers, config.weight_norm, config.leaky)
        self.head = MESI(config.dim, self.n_behaviors, config.shared_gate, config.mult)
        weights = config.loss_weights or [1.0] * self.n_behaviors
        if len(weights) != self.n_behaviors:
            raise ConfigError(f"model.loss_weights has {len(weights)} entries, the data {self.n_behaviors} behaviors")
        self.register_buffer("loss_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.user_emb.weight)   # NNLayers' default 'xavier'
        nn.init.xavier_uniform_(self.item_emb.weight)
        self.encoder.reset_parameters()
        self.head.reset_parameters()
        if self.content is not None:
            self.content.reset_parameters()

    @classmethod
    def from_dataset(cls, data: Dataset, config: CIGFConfig) -> "CIGF":
        content = item_content_projection(data, config)
        return cls(data.n_users, data.n_items, behavior_adjacencies(data, config.norm), data.target_index,
                   config, content)

    # -- forward ------------------------------------------------------------------

    def compute_representations(self) -> tuple[Tensor]:
        return (self.encoder(self.ego_embeddings(), self.graphs),)  # [K, U+I, d]

    def behavior_weights(self) -> Tensor:
        """Node-specific behavior weights [K branches, L-1 layers, U+I, K] (for inspection/tests)."""
        ego = self.ego_embeddings()
        return torch.stack([torch.stack([c.behavior_weights(ego) for c in branch])
                            for branch in self.encoder.branches]) if self.config.layers > 1 else ego.new_zeros(0)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        (reps,) = self._fresh()
        u, i, j, b = batch["user"], batch["pos"], batch["neg"], batch["behavior"]
        users, items = reps[:, : self.n_users], reps[:, self.n_users:]
        pos = self.head(b, users[:, u], items[:, i])
        neg = self.head(b, users[:, u], items[:, j])
        counts = torch.bincount(b, minlength=self.n_behaviors).clamp(min=1).to(pos.dtype)
        row_w = self.loss_weights[b] / counts[b]                        # Σ_t w_t · mean over behavior t
        bpr = (F.softplus(neg - pos) * row_w).sum()
        return bpr + self.config.reg * self.regularizer()

    # -- scoring ------------------------------------------------------------------
    def score_all(self, users: Tensor) -> Tensor:
        (reps,) = self.representations()
        return self.head.score_all(self.target, reps[:, users], reps[:, self.n_users:])

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        (reps,) = self.representations()
        B, k = items.shape
        u = reps[:, users].unsqueeze(2).expand(-1, -1, k, -1).reshape(self.n_behaviors, B * k, -1)
        i = reps[:, self.n_users + items.reshape(-1)]
        task = torch.full((B * k,), self.target, dtype=torch.long, device=items.device)
        return self.head(task, u, i).view(B, k)

    def item_embeddings(self) -> Tensor:
        (reps,) = self.representations()
        return reps[self.target, self.n_users:]
