"""``mmrec export``: a run's representation tables, plus what scores them outside mmrec.

Two kinds of model, two kinds of export:

* **Inner-product models** — ``score(u, i) = <e_u, e_i>``, those built on
  :class:`mmrec.models.base.InnerProductScoring` (BPR-MF, LightGCN, VBPR and the
  multimodal graph backbones): the user and item tables that ``representations()``
  returns after ``prepare_eval()`` (propagated, content fused), and a faiss
  ``IndexFlatIP`` over items (exact inner-product search; the same top-K as
  ``mmrec recommend --include-seen``; it does not mask the users' seen items).
* **Models that score with a network** registered in :data:`ONNX_SCORERS`: the tables
  the network reads and the scoring network as ONNX, ``(per-user inputs, item table) ->
  scores``, exported with ``torch.onnx.export`` (needs ``pip install 'mmrec[export]'``).
  CIGF (its MESI head gates experts per pair) and MB-GMN (its meta prediction network)
  read per-node representation tables; SASRec and NOVA read the user's recent items (a
  padded item-id window: the encoder is in the graph); ``history`` reads the backbone's
  user row plus the user's auxiliary-history items and their evidence (the bonus network
  is in the graph). Each scorer documents its inputs (``inputs_doc``, in export.json).

Either way the export checks, before writing anything, that the tables (and the
scorer) reproduce the model's ``score_all``; the ONNX file is also run once with ONNX
Runtime when it is installed. Other models (popularity, the behavior prior, ``history``
over a backbone that is not an inner product, head runs) are refused: the export says so
instead of writing tables that would rank differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from mmrec.errors import MMRecError
from mmrec.io import atomic_path, write_json
from mmrec.models.base import InnerProductScoring
from mmrec.registry import Registry

__all__ = ["ExportReport", "export_run", "embedding_tables", "load_export", "onnx_session", "MESIScorer",
           "MBGMNScorer", "SequenceScorer", "HistoryScorer", "ONNX_SCORERS", "UserInputs", "HistoryInputs",
           "pad_history", "scorer_inputs", "EMBEDDINGS", "INDEX", "SCORER", "MANIFEST"]

EMBEDDINGS = "embeddings.safetensors"
INDEX = "items.faiss"
SCORER = "scorer.onnx"
MANIFEST = "export.json"
USER_IDS = "user_ids.txt"
ITEM_IDS = "item_ids.txt"
#: Users whose scores are compared with ``score_all`` before exporting.
CHECK_USERS = 256


class NotExportable(MMRecError):
    """The model's score is not an inner product of exportable tables."""


@dataclass
class ExportReport:
    out: Path
    model: str
    n_users: int
    n_items: int
    dim: int
    files: list[str]


def embedding_tables(model: torch.nn.Module, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(users [n_users, d], items [n_items, d]) whose inner products are the model's scores.

    Raises :class:`NotExportable` for models that do not score by an inner product, and
    when the tables fail to reproduce ``score_all`` (a model that overrides the scoring).
    """
    label = name or type(model).__name__
    if not isinstance(model, InnerProductScoring):
        network = ("`mmrec export` writes its scoring network as ONNX instead" if label.lower() in ONNX_SCORERS
                   else f"ONNX export of its scoring network is not supported yet for it (supported: "
                        f"{', '.join(ONNX_SCORERS.names())}; serve it with `mmrec recommend`)")
        raise NotExportable(f"model '{label}' does not score by a plain inner product of user and item embeddings, "
                            f"so it cannot be exported as embedding tables; {network}")
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        users, items = (t.detach().float() for t in model.scoring_tables())  # cold-item stand-ins included
        probe = torch.arange(min(CHECK_USERS, len(users)), device=users.device)
        expected = model.score_all(probe).float()
    got = users[probe] @ items.T
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise NotExportable(f"model '{label}': the inner products of its representations do not reproduce its "
                            f"score_all, so embedding tables would rank differently; ONNX export of its scoring "
                            f"network is not supported yet (serve it with `mmrec recommend`)")
    return users.cpu().contiguous(), items.cpu().contiguous()


# -- scoring networks as ONNX -------------------------------------------------------------------

#: model name -> ``builder(model) -> (scorer module, users table, items table)``; the scorer maps
#: (user rows, item table) to scores [rows, items] and reproduces the model's ``score_all``.
#: The users table is a tensor (ONNX input ``users``) or, for scorers that take several per-user
#: inputs, a dict ``{input name: [n_users, ...]}`` in the order of the scorer's
#: ``forward(*user inputs, items)``, or a :class:`UserInputs` (stored tables that are not
#: the inputs themselves, e.g. a history in CSR form padded per batch). A scorer may declare
#: ``dynamic_axes`` (``{input: {axis: (name, max or None)}}``, beyond the user and item axes),
#: ``inputs_doc`` (``{input: "shape, dtype, meaning"}``, written to export.json) and
#: ``manifest`` (extra export.json keys).
ONNX_SCORERS: Registry = Registry("ONNX scorer")

class UserInputs:
    """A scorer's per-user inputs: the tables written to ``embeddings.safetensors`` (``tables``)
    and the scorer's positional inputs for a batch of users (``rows``). Here every input is a
    table whose row u is user u; :class:`HistoryInputs` stores a ragged history instead."""

    def __init__(self, tables: dict[str, Tensor]) -> None:
        self.tables = tables

    @property
    def names(self) -> list[str]:
        """The ONNX input names, in the order of the scorer's arguments."""
        return list(self.tables)

    def __len__(self) -> int:
        return len(next(iter(self.tables.values())))

    def rows(self, users: Tensor) -> list[Tensor]:
        return [t[users] for t in self.tables.values()]


def pad_history(offsets: Tensor, items: Tensor, evidence: Tensor, users: Tensor,
                min_width: int = 1) -> tuple[Tensor, Tensor]:
    """The padded ``history_items`` [B, W] (-1 = padding) and ``history_evidence`` [B, W, F] inputs of
    ``users`` from the CSR history (user u's pairs: ``items[offsets[u]:offsets[u + 1]]``);
    W = the longest of these users' histories (at least ``min_width``)."""
    users = torch.as_tensor(users, dtype=torch.long)
    starts, lengths = offsets[users], offsets[users + 1] - offsets[users]
    width = max(int(lengths.max()) if len(lengths) else 0, min_width)
    total = int(lengths.sum())
    slot = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    flat = torch.repeat_interleave(starts, lengths) + slot
    row = torch.repeat_interleave(torch.arange(len(users)), lengths)
    hist = torch.full((len(users), width), -1, dtype=torch.long)
    hist[row, slot] = items[flat]
    padded = evidence.new_zeros(len(users), width, evidence.shape[1])
    padded[row, slot] = evidence[flat]
    return hist, padded


class HistoryInputs(UserInputs):
    """``history``'s inputs: the backbone's user rows, and each user's auxiliary-history pairs stored
    in CSR form (``history_offsets`` [n_users + 1], ``history_items`` [pairs], ``history_evidence``
    [pairs, F]: padded to the longest history they would take 26x the space on Tmall) and padded
    per batch into the scorer's ``history_items`` [B, W] / ``history_evidence`` [B, W, F]."""

    def __init__(self, users: Tensor, offsets: Tensor, items: Tensor, evidence: Tensor) -> None:
        super().__init__({"users": users, "history_offsets": offsets, "history_items": items,
                          "history_evidence": evidence})

    @property
    def names(self) -> list[str]:
        return ["users", "history_items", "history_evidence"]

    def __len__(self) -> int:
        return len(self.tables["users"])

    def rows(self, users: Tensor) -> list[Tensor]:
        t = self.tables
        # width >= 2: the export traces the history axis as dynamic (a one-wide sample would fix it)
        return [t["users"][users], *pad_history(t["history_offsets"], t["history_items"], t["history_evidence"],
                                                users, min_width=2)]


def _as_inputs(users: Tensor | dict[str, Tensor] | UserInputs) -> UserInputs:
    if isinstance(users, UserInputs):
        return users
    return UserInputs(users if isinstance(users, dict) else {"users": users})


def scorer_inputs(exp: dict[str, Any], users: Any) -> dict[str, np.ndarray]:
    """The ONNX scorer's per-user inputs for rows ``users`` of a :func:`load_export` result (every
    input but ``items``): slices of the per-user tables, or ``history``'s padded history batch."""
    users = torch.as_tensor(np.arange(len(exp["user_ids"]))[users])
    if "history_offsets" in exp:
        hist, evidence = pad_history(exp["history_offsets"], exp["history_items"], exp["history_evidence"], users)
        return {"users": exp["users"][users].numpy(), "history_items": hist.numpy(),
                "history_evidence": evidence.numpy()}
    return {name: exp[name][users].numpy() for name in exp["manifest"]["inputs"] if name != "items"}


class MESIScorer(nn.Module):
    r"""CIGF's MESI head for one task as a standalone scorer over representation tables.

    ``forward(users [B, K, d], items [I, K, d]) -> scores [B, I]``, row k of each table
    being behavior branch k's representation (CIGCN output). The paper's definition
    (:class:`mmrec.graph.cigf.MESI`), per pair:

    .. math::
        \hat{y}^{t}_{ui} = c\cdot\sum_{k} \operatorname{softmax}_k\big(\mathbf{W}_t
        [\mathbf{e}^{t}_u \,\|\, \mathbf{e}^{t}_i] + \mathbf{b}_t\big)\,
        \langle \mathbf{e}^{k}_u, \mathbf{e}^{k}_i\rangle

    The gate logit is linear in ``[e_u || e_i]``, so it is a user part plus an item part,
    broadcast to [B, I, K]; the softmax is taken per pair (no data-dependent branches,
    so it exports as a static graph). Memory is ``B x I x K`` floats: score users in
    batches. ``MESI.score_all`` computes the same mixture in a factorised form.
    """

    inputs_doc = {"users": "[batch, behaviors, dim] float32: rows of the 'users' table (row k: behavior branch k)",
                  "items": "[n_items, behaviors, dim] float32: the 'items' table or a subset of its rows"}

    def __init__(self, gate: nn.Linear, task: int, mult: float) -> None:
        super().__init__()
        dim = gate.in_features // 2
        self.task = int(task)
        self.mult = float(mult)
        self.register_buffer("w_user", gate.weight.detach()[:, :dim].T.contiguous().clone())  # [d, K]
        self.register_buffer("w_item", gate.weight.detach()[:, dim:].T.contiguous().clone())  # [d, K]
        self.register_buffer("bias", gate.bias.detach().clone())                               # [K]

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        logits = ((users[:, self.task] @ self.w_user + self.bias).unsqueeze(1)
                  + (items[:, self.task] @ self.w_item).unsqueeze(0))           # [B, I, K]
        experts = torch.einsum("bkd,ikd->bik", users, items)                     # <e_u^k, e_i^k>
        return self.mult * (torch.softmax(logits, dim=-1) * experts).sum(-1)


@ONNX_SCORERS.register("cigf")
def cigf_scorer(model: nn.Module) -> tuple[nn.Module, Tensor, Tensor]:
    """CIGF: the MESI head of the target behavior over the CIGCN outputs [n, K, d]."""
    from mmrec.graph.cigf import CIGF

    if not isinstance(model, CIGF):
        raise NotExportable(f"expected a CIGF model, got {type(model).__name__} (a head run is not exported)")
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        (reps,) = model.representations()                                        # [K, U+I, d]
    reps = reps.detach().float().cpu().transpose(0, 1).contiguous()              # [U+I, K, d]
    head = model.head
    gate = head.gates[0 if len(head.gates) == 1 else model.target]
    scorer = MESIScorer(gate, model.target, head.mult).float().cpu().eval()
    scorer.manifest = {"behaviors": int(reps.shape[1])}
    return scorer, reps[: model.n_users].contiguous(), reps[model.n_users:].contiguous()


class MBGMNScorer(nn.Module):
    r"""MB-GMN's meta prediction network for the target behavior as a standalone scorer.

    ``forward(users [B, 2, D], items [I, 2, D]) -> scores [B, I]``: row 0 of each table is
    the multi-behavior branch (the source representation that is scored), row 1 the target
    behavior's branch (the target side of the pair's meta-knowledge). Per pair, as
    :class:`mmrec.graph.mbgmn.MetaPredictionNetwork` defines it:

    .. math::
        \mathbf{z}_s = \sigma(\mathbf{W}_p[\mathbf{u}_s\odot\mathbf{i}_s\,\|\,\mathbf{u}_s\,\|\,\mathbf{i}_s]),\
        \mathbf{m} = \sigma(\mathbf{W}_q[\mathbf{z}_s\odot\mathbf{z}_t\,\|\,\mathbf{z}_s\,\|\,\mathbf{z}_t]),\
        \hat{y} = c\cdot\mathbf{w}_2(\mathbf{m})^{\top}\sigma\big(\mathbf{W}_1(\mathbf{m})^{\top}\mathbf{x}_s
            + \mathbf{b}_1(\mathbf{m})\big)

    W₁(m) is never built per pair: the user's part of x_s is folded into H_u [3D+1, D+1, D]
    (:func:`mmrec.graph.mbgmn._pair_tensor`, written here without in-place ops so that it
    exports), then ``Y = m' H_u`` and its contraction with i' = [i ‖ 1]. Memory:
    B × I × (D+1) × D floats per call (D = 2 · model.dim): score users in small batches.
    """

    inputs_doc = {"users": "[batch, 2, D] float32: rows of the 'users' table (row 0: multi-behavior branch, "
                           "row 1: target-behavior branch)",
                  "items": "[n_items, 2, D] float32: the 'items' table or a subset of its rows"}

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        net = model.predictor
        d = net.dim
        self.dim, self.leaky, self.mult = d, float(net.leaky), float(model.config.mult)
        wp = net.pair.weight.detach()
        weight = net.generator().detach()                                            # Ĝ [C+1, 3D, J]
        c1, j = weight.size(0), weight.size(2)
        for name, value in (("w_odot", wp[:, :d].T), ("w_user", wp[:, d:2 * d].T), ("w_item", wp[:, 2 * d:].T),
                            ("pair_bias", net.pair.bias.detach()),
                            ("meta_w", net.meta.weight.detach().T), ("meta_b", net.meta.bias.detach()),
                            ("w2_w", net.gen_w2.weight.detach().T), ("w2_b", net.gen_w2.bias.detach()),
                            ("gen_odot", weight[:, :d]), ("gen_item", weight[:, 2 * d:]),
                            ("gen_user", weight[:, d:2 * d].permute(1, 0, 2).reshape(d, c1 * j)),
                            ("gen_bias", net.bias_generator().detach().reshape(c1 * j))):
            self.register_buffer(name, value.contiguous().clone())

    def _act(self, x: Tensor) -> Tensor:
        return torch.nn.functional.leaky_relu(x, self.leaky)

    def _pair(self, u: Tensor, i: Tensor) -> Tensor:
        """z = σ(W_p [u ⊙ i ‖ u ‖ i] + b) of every (user, item) pair [B, I, D]."""
        odot = torch.einsum("bd,id,de->bie", u, i, self.w_odot)
        return self._act(odot + (u @ self.w_user).unsqueeze(1) + (i @ self.w_item + self.pair_bias).unsqueeze(0))

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        su, tu, si, ti = users[:, 0], users[:, 1], items[:, 0], items[:, 1]
        b, n, d = su.shape[0], si.shape[0], self.dim
        zs, zt = self._pair(su, si), self._pair(tu, ti)
        m = self._act(torch.cat([zs * zt, zs, zt], -1) @ self.meta_w + self.meta_b)       # [B, I, C]
        c1, j = self.gen_odot.shape[0], self.gen_odot.shape[2]
        # H_u [B, C+1, D+1, J]: ⊙ and item blocks in rows :D, user block (+ b₁'s generator) in row D
        h_items = self.gen_item.unsqueeze(0) + su[:, None, :, None] * self.gen_odot.unsqueeze(0)
        h_const = (su @ self.gen_user + self.gen_bias).view(b, c1, 1, j)
        head = torch.cat([h_items, h_const], 2).reshape(b, c1, (d + 1) * j)
        m1 = torch.cat([m, torch.ones_like(m[..., :1])], -1)                               # m' [B, I, C+1]
        y = torch.bmm(m1, head).view(b, n, d + 1, j)
        i1 = torch.cat([si, torch.ones_like(si[:, :1])], -1)                               # i' [I, D+1]
        hidden = self._act((y * i1[None, :, :, None]).sum(2))                               # x_sᵀW₁(m) + b₁(m)
        return self.mult * (hidden * (m @ self.w2_w + self.w2_b)).sum(-1)


@ONNX_SCORERS.register("mbgmn")
def mbgmn_scorer(model: nn.Module) -> tuple[nn.Module, Tensor, Tensor]:
    """MB-GMN: the meta prediction network over the multi-behavior and target branches [n, 2, 2·dim]."""
    from mmrec.graph.mbgmn import MBGMN

    if not isinstance(model, MBGMN):
        raise NotExportable(f"expected an MB-GMN model, got {type(model).__name__} (a head run is not exported)")
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        (reps,) = model.representations()                                        # [K+1, U+I, 2d]
    reps = reps.detach().float().cpu()[[model.n_behaviors, model.target]].transpose(0, 1).contiguous()
    scorer = MBGMNScorer(model).float().cpu().eval()
    return scorer, reps[: model.n_users].contiguous(), reps[model.n_users:].contiguous()


class SequenceScorer(nn.Module):
    r"""SASRec / NOVA: a user's recent items -> the last hidden state -> inner products with items.

    ``forward(history [B, L] int64, items [I, d]) -> scores [B, I]``. ``history`` is the
    left-padded window of the user's most recent items, oldest first, each item as its row
    in ``item_ids.txt`` + 1 and 0 as padding (:meth:`UserSequences.windows`); L ≤ ``max_len``
    (padding is masked, so a shorter window scores the same as a padded one). The network
    is the model's own blocks (shared modules): SASRec Eq. 2-8; NOVA with its fusion of
    content and positions in queries and keys, the item content precomputed as a table.
    The item-ID embedding that reads the history is part of the graph; the ``items`` input
    is only the table of the final inner product (the same values, or a subset of rows).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from mmrec.fusion.nova import NOVA

        self.dim, self.heads, self.max_len = model.config.dim, model.config.heads, model.config.max_len
        self.item_emb, self.pos_emb, self.blocks, self.last_norm = (model.item_emb, model.pos_emb,
                                                                    model.blocks, model.last_norm)
        self.nova = model.nova if isinstance(model, NOVA) else None
        self.with_content = isinstance(model, NOVA) and model.content is not None
        if self.with_content:
            with torch.no_grad():
                content, has = model.item_content()
            self.register_buffer("content", content.detach().clone())             # [n_items + 1, d]
            self.register_buffer("has_content", has.detach().clone())
        self.dynamic_axes = {"history": {1: ("length", self.max_len)}}
        self.inputs_doc = {
            "history": f"[batch, length] int64, 1 <= length <= {self.max_len} (model.max_len): the user's most "
                       "recent items, oldest first, left-padded; each item as its row in item_ids.txt + 1, "
                       "0 = padding (the 'history' table holds the windows mmrec recommend scores from: "
                       "train + valid rows)",
            "items": "[n_items, dim] float32: the 'items' table (item-ID embeddings) or a subset of its rows"}

    def forward(self, history: Tensor, items: Tensor) -> Tensor:
        from functools import partial

        from mmrec.sequential.sasrec import attention_mask
        from mmrec.sequential.sequences import PAD

        length = history.shape[1]
        # position 0 = the most recent item; (L-1) - arange(L): a negative-step arange exports as an empty Range
        pos = self.pos_emb((length - 1) - torch.arange(length, device=history.device))
        x = self.item_emb(history) * math.sqrt(self.dim)
        qk = None
        if self.nova is None:
            x = x + pos[None]
        else:  # NOVA: positions and content are side information of queries and keys only
            parts = {"position": pos.expand(history.shape[0], -1, -1)}
            masks = {"position": torch.ones_like(history, dtype=torch.bool)}
            if self.with_content:
                parts["content"], masks["content"] = self.content[history], self.has_content[history]
            qk = [partial(fusion, parts, masks) for fusion in self.nova]
        keep = (history != PAD).unsqueeze(-1).to(x.dtype)
        x = x * keep
        blocked = attention_mask(history, self.heads)
        for layer, block in enumerate(self.blocks):
            x = block(x, blocked, None if qk is None else qk[layer]) * keep
        return self.last_norm(x)[:, -1] @ items.T


def sequence_scorer(model: nn.Module) -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    """SASRec / NOVA: the history windows the model scores from (``use_history``) and the item table."""
    from mmrec.sequential.sasrec import SASRec

    if not isinstance(model, SASRec):
        raise NotExportable(f"expected a SASRec-family model, got {type(model).__name__}")
    if model.sequences is None:
        raise NotExportable("the sequence model has no user histories attached (call use_history(data))")
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
    windows = torch.from_numpy(model.sequences.windows(np.arange(model.sequences.n_users), model.config.max_len))
    scorer = SequenceScorer(model).float().cpu().eval()
    return scorer, {"history": windows.contiguous()}, model.item_emb.weight.detach().float().cpu()[1:].contiguous()


ONNX_SCORERS.register("sasrec")(sequence_scorer)
ONNX_SCORERS.register("nova")(sequence_scorer)


class HistoryScorer(nn.Module):
    r"""``history``: the backbone's inner product, the item prior and the evidence bonus.

    ``forward(users [B, d], history_items [B, H] int64, history_evidence [B, H, F], items [I, d+1])
    -> scores [B, I]``:

    .. math::
        s_{ui} = a\,\langle e_u, e_i\rangle + w^\top\psi_i + [(u,i)\in H]\,g_\theta(\phi_{ui})

    ``items[:, :d]`` are the backbone's item rows and ``items[:, d]`` the item prior
    w·ψ_i (0 without ``item_prior``). ``history_items[b, h]`` is the row of the ``items``
    input of user b's h-th auxiliary-history item, -1 = padding; ``history_evidence[b, h]``
    its evidence φ (:class:`mmrec.graph.history.PairEvidence`). g runs inside the graph
    and its bonus is scatter-added to the history items' scores.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.g = model.g
        self.register_buffer("scale", model.scale.detach().clone())
        names = model.evidence.names
        self.dynamic_axes = {"history_items": {1: ("history", None)}, "history_evidence": {1: ("history", None)}}
        self.inputs_doc = {
            "users": "[batch, dim] float32: the backbone's user rows (the 'users' table)",
            "history_items": "[batch, history] int64: the user's items with auxiliary-behavior evidence, as rows "
                             "of the 'items' input; -1 = padding (stored flat: 'history_items' [pairs] with user u's "
                             "pairs at 'history_offsets'[u]:'history_offsets'[u+1]; mmrec.export.pad_history)",
            "history_evidence": f"[batch, history, {len(names)}] float32: the evidence phi of each of those pairs, "
                                f"features {names}; padding rows are ignored (stored flat: 'history_evidence' "
                                f"[pairs, {len(names)}])",
            "items": "[n_items, dim + 1] float32: the backbone's item rows, last column the item prior "
                     "(the 'items' table or a subset of its rows; history_items index this input)"}

    def forward(self, users: Tensor, history_items: Tensor, history_evidence: Tensor, items: Tensor) -> Tensor:
        d = users.shape[1]
        scores = self.scale * (users @ items[:, :d].T) + items[:, d].unsqueeze(0)
        real = history_items >= 0
        bonus = torch.where(real, self.g(history_evidence), torch.zeros_like(history_evidence[..., 0]))
        return scores.scatter_add(1, history_items.clamp(min=0), bonus)


@ONNX_SCORERS.register("history")
def history_scorer(model: nn.Module) -> tuple[nn.Module, HistoryInputs, Tensor]:
    """``history``: backbone tables (inner-product backbones only) + every user's evidence in CSR form."""
    from mmrec.graph.history import HistoryAware

    if not isinstance(model, HistoryAware):
        raise NotExportable(f"expected a history model, got {type(model).__name__}")
    if not isinstance(model.backbone, InnerProductScoring):
        raise NotExportable(f"model 'history' with backbone '{model.config.backbone}': only a backbone that scores "
                            f"by an inner product (lightgcn-mb, lightgcn, bprmf, ...) exports with it; serve this "
                            f"run with `mmrec recommend`")
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        users, items = embedding_tables(model.backbone, model.config.backbone)
        prior = model._item_prior()
        prior = (prior.detach().float().cpu() if isinstance(prior, Tensor) else torch.full((len(items),), prior))
    scorer = HistoryScorer(model).float().cpu().eval()
    inputs = HistoryInputs(users, model.indptr.detach().cpu().clone(), model.hist_items.detach().cpu().clone(),
                           model.phi.detach().float().cpu().clone())
    return scorer, inputs, torch.cat([items, prior.unsqueeze(1)], 1).contiguous()


def _check_scorer(label: str, expected: Tensor, got: Tensor, what: str) -> None:
    """Scores agree up to float32 rounding of different summation orders (relative to their scale)."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise NotExportable(f"model '{label}': {what} does not reproduce its score_all (max difference {diff:.3g} "
                            f"at score scale {scale:.3g}); not exported")


def scoring_network(model: nn.Module, name: str) -> tuple[nn.Module, UserInputs, Tensor]:
    """(scorer, users, items) of a model in :data:`ONNX_SCORERS` (``users``: its per-user inputs),
    checked against ``score_all`` on the first :data:`CHECK_USERS` users."""
    scorer, table, items = ONNX_SCORERS.get(name)(model)
    users = _as_inputs(table)
    probe = torch.arange(min(CHECK_USERS, len(users)))
    device = getattr(model, "device", torch.device("cpu"))
    with torch.no_grad():
        expected = model.score_all(probe.to(device)).float().cpu()
        got = scorer(*users.rows(probe), items)
    _check_scorer(name, expected, got, "the scoring network")
    return scorer, users, items


def export_onnx(scorer: nn.Module, users: UserInputs | Tensor, items: Tensor) -> bytes:
    """The serialized ONNX model of ``scorer`` (``torch.onnx.export``, torch.export-based), with a dynamic
    number of user rows and items (inputs: the user inputs by name, then ``items``; output ``scores``)
    and the scorer's own ``dynamic_axes`` (a history length).

    The graph holds only the scorer's own weights (the tables are inputs), so it is small
    and kept in memory until it has been checked.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.export-based exporter)
    except ImportError as e:
        raise MMRecError(f"ONNX export needs onnx and onnxscript: pip install 'mmrec[export]' ({e})") from e
    users = _as_inputs(users)
    sample = users.rows(torch.arange(max(2, min(8, len(users)))))
    dims = {"batch": torch.export.Dim("batch"), "n_items": torch.export.Dim("n_items")}
    shapes: list[dict[int, Any]] = []
    extra = getattr(scorer, "dynamic_axes", {})
    for key, table in zip(users.names, sample):
        axes: dict[int, Any] = {0: dims["batch"]}
        for axis, (dim_name, most) in extra.get(key, {}).items():
            if most is not None and most < 2 or table.shape[axis] < 2:
                continue  # a one-wide axis cannot be traced as dynamic: it stays fixed
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name, min=1, max=most) if most else torch.export.Dim(dim_name)
            axes[axis] = dims[dim_name]
        shapes.append(axes)
    shapes.append({0: dims["n_items"]})
    with torch.no_grad():
        program = torch.onnx.export(scorer, (*sample, items), dynamo=True, verbose=False,
                                    input_names=[*users.names, "items"], output_names=["scores"],
                                    dynamic_shapes=tuple(shapes))
    return program.model_proto.SerializeToString()


def onnx_session(model: str | Path | bytes) -> Any:
    """An ONNX Runtime CPU session on a ``scorer.onnx`` file (or its bytes); needs ``onnxruntime``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MMRecError("running the ONNX scorer needs onnxruntime: pip install 'mmrec[export]'") from e
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])


def _verify_onnx(name: str, model: bytes, scorer: nn.Module, users: UserInputs | Tensor, items: Tensor) -> bool:
    """Run the exported model once with ONNX Runtime (when installed) against the torch scorer."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    users = _as_inputs(users)
    probe = users.rows(torch.arange(min(CHECK_USERS, len(users))))
    feed = {key: t.numpy() for key, t in zip(users.names, probe)} | {"items": items.numpy()}
    got = onnx_session(model).run(["scores"], feed)[0]
    with torch.no_grad():
        expected = scorer(*probe, items)
    _check_scorer(name, expected, torch.from_numpy(got), f"the exported {SCORER} under ONNX Runtime")
    return True


def export_run(run: str | Path, out: str | Path, data: str | None = None, device: str | None = None,
               index: bool = True) -> ExportReport:
    """Write ``out/``: tables (safetensors), id lists, a manifest, and a faiss ``IndexFlatIP`` over
    items (inner-product models) or the scoring network as ONNX (models in :data:`ONNX_SCORERS`)."""
    from mmrec.recommend import Recommender
    from mmrec.train.run import id_digest, load_run_config

    run, out = Path(run), Path(out)
    if out.exists() and not out.is_dir():
        raise MMRecError(f"--out {out} exists and is not a directory")
    rec = Recommender.load(run, data=data, device=device)
    if hasattr(rec.model, "use_history"):  # sequence models: the history recommend scores from (train + valid)
        rec._prepare()
    name = load_run_config(run).model
    onnx = not isinstance(rec.model, InnerProductScoring) and name in ONNX_SCORERS
    scorer: nn.Module | None = None
    users: UserInputs | Tensor
    if onnx:
        scorer, users, items = scoring_network(rec.model, name)
    else:
        users, items = embedding_tables(rec.model, name)
    faiss = _faiss() if index and not onnx else None  # fail before writing anything
    graph: bytes | None = None
    verified = False
    if scorer is not None:
        graph = export_onnx(scorer, users, items)
        verified = _verify_onnx(name, graph, scorer, users, items)
    out.mkdir(parents=True, exist_ok=True)
    score = "onnx" if onnx else "inner_product"
    tables = {**_as_inputs(users).tables, "items": items}
    n_users = len(_as_inputs(users))
    dim = int(tables["users"].shape[-1] if "users" in tables else items.shape[-1])
    meta = {"model": name, "score": score, "run": str(run), "n_users": str(n_users),
            "n_items": str(len(items)), "dim": str(dim)}
    with atomic_path(out / EMBEDDINGS) as tmp:
        tmp.write_bytes(safetensors_bytes(tables, metadata=meta))  # keeps the mode atomic_path set
    for fname, ids in ((USER_IDS, rec.data.user_ids), (ITEM_IDS, rec.data.item_ids)):
        with atomic_path(out / fname) as tmp:
            tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    files = [EMBEDDINGS, USER_IDS, ITEM_IDS]
    for stale in (INDEX, SCORER):  # from an earlier export into the same directory: load_export would read it
        if (out / stale).exists():
            (out / stale).unlink()
    shapes = ", ".join(f"'{key}' {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for key, t in tables.items())
    described = {EMBEDDINGS: (f"tensors {shapes}: row u of every per-user table is user u" if onnx else
                              "tensors 'users' [n_users, dim] and 'items' [n_items, dim], float32"),
                 USER_IDS: "original user id of each row of " + ("the per-user tables" if onnx else "'users'"),
                 ITEM_IDS: "original item id of each row of 'items'" + ("" if onnx else " (and of each faiss id)")}
    if faiss is not None:
        flat = faiss.IndexFlatIP(items.shape[1])
        flat.add(np.ascontiguousarray(items.numpy(), dtype=np.float32))
        with atomic_path(out / INDEX) as tmp:
            faiss.write_index(flat, str(tmp))
        files.append(INDEX)
        described[INDEX] = "faiss IndexFlatIP over 'items': exact top-K by inner product; seen items are not masked"
    if graph is not None:
        with atomic_path(out / SCORER) as tmp:
            tmp.write_bytes(graph)
        files.append(SCORER)
        described[SCORER] = (f"ONNX graph: inputs {', '.join(repr(k) for k in [*_as_inputs(users).names, 'items'])}"
                             f" (see 'inputs'; mmrec.export.scorer_inputs forms them from the tables) -> 'scores' "
                             f"[batch, n_items], the model's score_all; seen items are not masked")
    manifest: dict[str, Any] = {
        "model": name, "run": str(run), "score": score, "dim": dim,
        "n_users": n_users, "n_items": int(len(items)),
        "ids": {"users": id_digest(rec.data.user_ids), "items": id_digest(rec.data.item_ids)},
        "files": described,
    }
    if scorer is not None:
        manifest["inputs"] = getattr(scorer, "inputs_doc", {})
        manifest.update(getattr(scorer, "manifest", {}))
        manifest["onnx_checked_with_onnxruntime"] = verified
    write_json(out / MANIFEST, manifest)
    return ExportReport(out=out, model=name, n_users=n_users, n_items=len(items), dim=dim,
                        files=files + [MANIFEST])


def load_export(out: str | Path) -> dict[str, Any]:
    """Read an export back: ``users``/``items`` tensors (``users`` is None for sequence models) and every
    other table by name (``history``, ``history_items`` ...), ``user_ids``/``item_ids`` lists, ``index``
    (or None), ``scorer`` (an ONNX Runtime session on ``scorer.onnx``, or None)."""
    from safetensors.torch import load_file

    out = Path(out)
    if not (out / MANIFEST).exists():
        raise MMRecError(f"{out} is not an export directory (no {MANIFEST})")
    tables = load_file(str(out / EMBEDDINGS))
    result: dict[str, Any] = {
        **tables,
        "manifest": json.loads((out / MANIFEST).read_text()),
        "users": tables.get("users"), "items": tables["items"],
        "user_ids": (out / USER_IDS).read_text(encoding="utf-8").splitlines(),
        "item_ids": (out / ITEM_IDS).read_text(encoding="utf-8").splitlines(),
        "index": None,
        "scorer": None,
    }
    if (out / INDEX).exists():
        result["index"] = _faiss().read_index(str(out / INDEX))
    if (out / SCORER).exists():
        result["scorer"] = onnx_session(out / SCORER)
    return result


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise MMRecError("the faiss index needs faiss: pip install 'mmrec[ann]' (or faiss-cpu), "
                         "or pass --no-index") from e
    return faiss
