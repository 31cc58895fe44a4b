"""A head on top of a backbone recommender, trained on labelled exposures.

:class:`HeadModel` is a :class:`~mmrec.models.base.Recommender`, so the ordinary
trainer fits it: its batches are labelled exposures (:mod:`mmrec.heads.tasks`), its
loss is the head's per-task BCE balanced by a :mod:`~mmrec.heads.balancing` rule plus
the head's own auxiliary loss. The input of the head for an exposure (u, i) is

    x = [e_u ⊙ e_i ‖ e_u ‖ e_i (‖ one-hot user side columns)]

with (e_u, e_i) the backbone's ``representations()`` (the vectors whose inner product
is its ranking score). ``mode``:

- ``two-step``: the backbone is trained first with its own loss (by the caller, or
  loaded), then frozen; only the head (and the balancer) learn;
- ``end2end``: backbone and head learn together, the loss adding the backbone's own
  (``backbone_weight`` × its BPR / multi-behavior loss on its own batches).

Ranking calls (``score_all``, ``item_embeddings``) are the backbone's, so a head run
still exports its backbone's embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from mmrec.config import from_dict
from mmrec.errors import ConfigError
from mmrec.heads.balancing import GradNorm, create_balancer
from mmrec.heads.base import Head, create_head
from mmrec.heads.tasks import ExposureTable, TaskOptions
from mmrec.models.base import Recommender
from mmrec.registry import HEADS

BACKBONE_PREFIX = "bb."  # batch keys of the backbone's own batches (end2end)


@dataclass
class HeadModelConfig(TaskOptions):
    """``head_args`` fields that are not the head's own config (those go to the head)."""

    balance: str = "fixed"                 # fixed | uncertainty | gradnorm (mmrec/heads/balancing.py)
    balance_args: dict[str, Any] = field(default_factory=dict)
    backbone_run: str | None = None        # two-step: load the backbone's weights from this run
    backbone_epochs: int | None = None     # two-step: epochs of the backbone stage (None: train.epochs)
    backbone_weight: float = 1.0           # end2end: weight of the backbone's own loss
    user_features: list[str] = field(default_factory=list)  # users.tsv columns appended as one-hot
    input_norm: str = "rms"                # rms | batchnorm | none (see HeadModel.features)
    mode: str = "two-step"                 # set from --mode


def split_head_args(head_args: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields of :class:`HeadModelConfig`, the rest = the head's config)."""
    own = {f.name for f in dataclasses.fields(HeadModelConfig)}
    return ({k: v for k, v in head_args.items() if k in own},
            {k: v for k, v in head_args.items() if k not in own})


def check_head_config(head_name: str, head_config: dict[str, Any], tasks: list[str] | None = None) -> None:
    """The head's own ``head_args`` keys, checked under the name the user typed them, and
    (given the data's ``tasks``) whether the head is defined for that many tasks."""
    cls = HEADS.get(head_name)
    try:
        from_dict(cls.config_class, head_config, path="head_args")
    except ConfigError as e:
        own = ", ".join(f.name for f in dataclasses.fields(HeadModelConfig))
        raise ConfigError(f"{e} (head '{head_name}'); head_args also takes: {own}") from None
    if tasks is not None:
        n, lo, hi = len(tasks), cls.min_tasks, cls.max_tasks
        if n < lo or (hi is not None and n > hi):
            need = f"exactly {lo}" if lo == hi else f"at least {lo}" + (f" and at most {hi}" if hi else "")
            raise ConfigError(f"head '{head_name}' needs {need} tasks, got {n}; the data defines: "
                              f"{', '.join(tasks)} (choose with --set head_args.tasks=[...])")


def backbone_representations(backbone: Recommender, fresh: bool = False) -> tuple[Tensor, Tensor]:
    """(users [n_users, d], items [n_items, d]) of a backbone, or a ConfigError.

    ``fresh``: recompute with gradients (graph models cache their eval-time propagation); a
    graph backbone's ``_fresh`` shares the step's propagation with the backbone's own loss.
    """
    reps = getattr(backbone, "representations", None)
    if fresh and callable(getattr(backbone, "_fresh", None)):
        reps = backbone._fresh
    elif fresh and callable(getattr(backbone, "compute_representations", None)):
        reps = backbone.compute_representations
    if not callable(reps):
        raise ConfigError(f"backbone '{type(backbone).__name__}' has no representations(); heads sit on models "
                          "with user and item vectors: bprmf, lightgcn, lightgcn-mb, vbpr, freedom, lattice, micro, "
                          "cigf (its per-behavior vectors concatenated)")
    out = reps()
    if len(out) == 1 and out[0].dim() == 3:   # per-behavior [K, U+I, d] (CIGF): concatenate the behaviors
        k, _, d = out[0].shape
        n_users = int(backbone.n_users)
        both = out[0].permute(1, 0, 2).reshape(-1, k * d)
        return both[:n_users], both[n_users:]
    return out[0], out[1]


def _drop_reps(module: "HeadModel", incompatible_keys) -> None:
    """load_state_dict post-hook: representations cached before the load are stale."""
    module._reps = None


class HeadModel(Recommender):
    """Backbone + head + loss balancer over an :class:`ExposureTable`."""

    config_class: ClassVar[type] = HeadModelConfig

    def __init__(self, backbone: Recommender, head: Head, table: ExposureTable, config: HeadModelConfig,
                 user_side: Tensor | None = None) -> None:
        super().__init__()
        if config.mode not in ("two-step", "end2end"):
            raise ConfigError(f"mode must be two-step or end2end, not '{config.mode}'")
        self.backbone, self.head, self.table, self.config = backbone, head, table, config
        kw = dict(config.balance_args)
        if config.balance == "gradnorm":  # the head's first layer is what every task shares
            kw.setdefault("shared", [next(m for m in head.modules() if isinstance(m, nn.Linear)).weight])
        self.balancer = create_balancer(config.balance, head.n_tasks, **kw)
        self.register_buffer("user_side", user_side if user_side is not None else torch.zeros(0, 0),
                             persistent=False)
        if config.input_norm not in ("rms", "batchnorm", "none"):
            raise ConfigError(f"head_args.input_norm must be rms, batchnorm or none, not '{config.input_norm}'")
        self.input_norm = nn.BatchNorm1d(head.in_dim, affine=False) if config.input_norm == "batchnorm" \
            else nn.Identity()
        self._reps: tuple[Tensor, Tensor] | None = None
        self._bb_batches: Iterator[dict[str, Tensor]] | None = None
        self.frozen = config.mode == "two-step"
        self.register_load_state_dict_post_hook(_drop_reps)
        if self.frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    @staticmethod
    def input_dim(dim: int, side: int = 0) -> int:
        return 3 * dim + side

    @classmethod
    def build(cls, backbone: Recommender, table: ExposureTable, head_name: str, config: HeadModelConfig,
              head_config: dict[str, Any], user_side: Tensor | None = None) -> "HeadModel":
        """Size the head from the backbone's representations and the table's tasks / scenarios."""
        with torch.no_grad():
            backbone.prepare_eval()
            _, items = backbone_representations(backbone)
        side = 0 if user_side is None else int(user_side.shape[1])
        check_head_config(head_name, head_config, table.tasks)
        head = create_head(head_name, cls.input_dim(int(items.shape[1]), side), len(table.tasks),
                           len(table.scenarios), **head_config)
        return cls(backbone, head, table, config, user_side)

    # -- representations ----------------------------------------------------------------
    def train(self, mode: bool = True) -> "HeadModel":
        super().train(mode)
        self._reps = None
        if self.frozen:
            self.backbone.eval()   # no dropout / fresh propagation in a frozen backbone
        return self

    def _apply(self, fn, recurse: bool = True):
        self._reps = None
        return super()._apply(fn, recurse)

    def _representations(self) -> tuple[Tensor, Tensor]:
        if self.frozen or not self.training:
            if self._reps is None:
                with torch.no_grad():
                    self.backbone.prepare_eval()
                    u, i = backbone_representations(self.backbone)
                self._reps = (u.detach(), i.detach())
            return self._reps
        return backbone_representations(self.backbone, fresh=True)

    def features(self, users: Tensor, items: Tensor) -> Tensor:
        """x = [e_u ⊙ e_i ‖ e_u ‖ e_i (‖ side_u)] for exposures (users, items).

        Backbones emit embeddings at their own scale (a trained LightGCN: entries ~0.05,
        products ~0.003), at which a head's default initialisation sees a near-constant
        input and fits only the base rate. ``input_norm="rms"`` (default) divides each table
        by its root-mean-square entry (a detached scalar: directions, relative norms and so
        popularity are kept); ``batchnorm`` standardises every column of x instead.
        """
        u_all, i_all = self._representations()
        if self.config.input_norm == "rms":
            u_all = u_all / u_all.detach().pow(2).mean().sqrt().clamp(min=1e-12)
            i_all = i_all / i_all.detach().pow(2).mean().sqrt().clamp(min=1e-12)
        eu, ei = u_all[users], i_all[items]
        parts = [eu * ei, eu, ei]
        if self.user_side.numel():
            parts.append(self.user_side[users])
        return torch.cat(parts, dim=1)

    def forward(self, users: Tensor, items: Tensor, scenario: Tensor) -> Tensor:
        """Logits [B, n_tasks] of exposures."""
        return self.head(self.input_norm(self.features(users, items)), scenario)

    # -- training -----------------------------------------------------------------------
    def fit(self, data) -> None:
        if not self.frozen:
            self.backbone.fit(data)

    def training_batches(self, data, batch_size: int, rng: np.random.Generator) -> Iterator[dict[str, Tensor]]:
        """Shuffled training exposures; end2end adds one backbone batch to each (cycled)."""
        t = self.table
        idx = t.rows("train")
        idx = idx[rng.permutation(len(idx))]
        for start in range(0, len(idx), batch_size):
            b = idx[start:start + batch_size]
            batch = {"exp_user": torch.from_numpy(t.user[b]), "item": torch.from_numpy(t.item[b]),
                     "exp_scenario": torch.from_numpy(t.scenario[b]),
                     "exp_labels": torch.from_numpy(t.labels[b])}
            if not self.frozen:
                batch.update({BACKBONE_PREFIX + k: v for k, v in self._backbone_batch(data, batch_size, rng).items()})
            yield batch

    def _backbone_batch(self, data, batch_size: int, rng: np.random.Generator) -> dict[str, Tensor]:
        for _ in range(2):
            if self._bb_batches is None:
                self._bb_batches = iter(self.backbone.training_batches(data, batch_size, rng))
            try:
                return next(self._bb_batches)
            except StopIteration:
                self._bb_batches = None
        raise ConfigError("the backbone yields no training batches (no training interactions?)")

    def on_batch(self, batch: dict[str, Tensor]) -> None:
        if isinstance(self.balancer, GradNorm):
            self.balancer.renormalize()   # after the previous optimizer step (GradNorm keeps Σw = T)
        if not self.frozen:
            own = {k[len(BACKBONE_PREFIX):]: v for k, v in batch.items() if k.startswith(BACKBONE_PREFIX)}
            own["items"] = batch["item"]
            self.backbone.on_batch(own)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        logits = self(batch["exp_user"], batch["item"], batch["exp_scenario"])
        loss = self.balancer(self.head.task_losses(logits, batch["exp_labels"])) + self.head.aux_loss(logits)
        if not self.frozen and self.config.backbone_weight:
            own = {k[len(BACKBONE_PREFIX):]: v for k, v in batch.items() if k.startswith(BACKBONE_PREFIX)}
            loss = loss + self.config.backbone_weight * self.backbone.loss(own)
            aux = self.backbone.auxiliary_loss()
            if aux is not None:
                loss = loss + aux
        return loss

    # -- scoring ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, rows: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Probabilities [len(rows), n_tasks] of table rows (eval mode)."""
        t, dev = self.table, self.device
        out = []
        for start in range(0, len(rows), batch_size):
            b = rows[start:start + batch_size]
            logits = self(torch.from_numpy(t.user[b]).to(dev), torch.from_numpy(t.item[b]).to(dev),
                          torch.from_numpy(t.scenario[b]).to(dev))
            out.append(torch.sigmoid(logits).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(t.tasks)))

    def prepare_eval(self) -> None:
        self._reps = None
        self.backbone.prepare_eval()

    def score_all(self, users: Tensor) -> Tensor:
        return self.backbone.score_all(users)

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        return self.backbone.score(users, items)

    def item_embeddings(self) -> Tensor | None:
        return self.backbone.item_embeddings()


__all__ = ["HeadModel", "HeadModelConfig", "split_head_args", "check_head_config", "backbone_representations"]
