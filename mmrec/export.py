"""``mmrec export``: a run's representation tables, plus what scores them outside mmrec.

Two kinds of model, two kinds of export:

* **Inner-product models** — ``score(u, i) = <e_u, e_i>``, those built on
  :class:`mmrec.models.base.InnerProductScoring` (BPR-MF, LightGCN, VBPR and the
  multimodal graph backbones): the user and item tables that ``representations()``
  returns after ``prepare_eval()`` (propagated, content fused), and a faiss
  ``IndexFlatIP`` over items (exact inner-product search; the same top-K as
  ``mmrec recommend --include-seen``; it does not mask the users' seen items).
* **Models that score with a network** registered in :data:`ONNX_SCORERS` (CIGF: its
  MESI head gates experts per pair): the per-behavior representation tables and the
  scoring network as ONNX, ``(user rows, item table) -> scores``, exported with
  ``torch.onnx.export`` (needs ``pip install 'mmrec[export]'``).

Either way the export checks, before writing anything, that the tables (and the
scorer) reproduce the model's ``score_all``; the ONNX file is also run once with ONNX
Runtime when it is installed. Other models (MB-GMN's meta network, SASRec, popularity,
...) are refused: exporting their scoring is not supported yet, and the export says so
instead of writing tables that would rank differently.
"""

from __future__ import annotations

import json
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
           "ONNX_SCORERS", "EMBEDDINGS", "INDEX", "SCORER", "MANIFEST"]

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
ONNX_SCORERS: Registry = Registry("ONNX scorer")


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
    return scorer, reps[: model.n_users].contiguous(), reps[model.n_users:].contiguous()


def _check_scorer(label: str, expected: Tensor, got: Tensor, what: str) -> None:
    """Scores agree up to float32 rounding of different summation orders (relative to their scale)."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise NotExportable(f"model '{label}': {what} does not reproduce its score_all (max difference {diff:.3g} "
                            f"at score scale {scale:.3g}); not exported")


def scoring_network(model: nn.Module, name: str) -> tuple[nn.Module, Tensor, Tensor]:
    """(scorer, users [n_users, K, d], items [n_items, K, d]) of a model in :data:`ONNX_SCORERS`,
    checked against ``score_all`` on the first :data:`CHECK_USERS` users."""
    scorer, users, items = ONNX_SCORERS.get(name)(model)
    probe = torch.arange(min(CHECK_USERS, len(users)))
    device = getattr(model, "device", torch.device("cpu"))
    with torch.no_grad():
        expected = model.score_all(probe.to(device)).float().cpu()
        got = scorer(users[probe], items)
    _check_scorer(name, expected, got, "the scoring network")
    return scorer, users, items


def export_onnx(scorer: nn.Module, users: Tensor, items: Tensor) -> bytes:
    """The serialized ONNX model of ``scorer`` (``torch.onnx.export``, torch.export-based), with a dynamic
    number of user rows and items (inputs ``users``, ``items``; output ``scores``).

    The graph holds only the scorer's own weights (the tables are inputs), so it is small
    and kept in memory until it has been checked.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the torch.export-based exporter)
    except ImportError as e:
        raise MMRecError(f"ONNX export needs onnx and onnxscript: pip install 'mmrec[export]' ({e})") from e
    batch, n_items = torch.export.Dim("batch"), torch.export.Dim("n_items")
    sample = users[: max(2, min(8, len(users)))]
    with torch.no_grad():
        program = torch.onnx.export(scorer, (sample, items), dynamo=True, verbose=False,
                                    input_names=["users", "items"], output_names=["scores"],
                                    dynamic_shapes=({0: batch}, {0: n_items}))
    return program.model_proto.SerializeToString()


def onnx_session(model: str | Path | bytes) -> Any:
    """An ONNX Runtime CPU session on a ``scorer.onnx`` file (or its bytes); needs ``onnxruntime``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MMRecError("running the ONNX scorer needs onnxruntime: pip install 'mmrec[export]'") from e
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])


def _verify_onnx(name: str, model: bytes, scorer: nn.Module, users: Tensor, items: Tensor) -> bool:
    """Run the exported model once with ONNX Runtime (when installed) against the torch scorer."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    probe = users[: min(CHECK_USERS, len(users))]
    got = onnx_session(model).run(["scores"], {"users": probe.numpy(), "items": items.numpy()})[0]
    with torch.no_grad():
        expected = scorer(probe, items)
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
    name = load_run_config(run).model
    onnx = not isinstance(rec.model, InnerProductScoring) and name in ONNX_SCORERS
    scorer: nn.Module | None = None
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
    row = ", behaviors, dim]" if onnx else ", dim]"
    meta = {"model": name, "score": score, "run": str(run), "n_users": str(len(users)),
            "n_items": str(len(items)), "dim": str(users.shape[-1])}
    with atomic_path(out / EMBEDDINGS) as tmp:
        tmp.write_bytes(safetensors_bytes({"users": users, "items": items}, metadata=meta))  # keeps the mode atomic_path set
    for fname, ids in ((USER_IDS, rec.data.user_ids), (ITEM_IDS, rec.data.item_ids)):
        with atomic_path(out / fname) as tmp:
            tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    files = [EMBEDDINGS, USER_IDS, ITEM_IDS]
    for stale in (INDEX, SCORER):  # from an earlier export into the same directory: load_export would read it
        if (out / stale).exists():
            (out / stale).unlink()
    described = {EMBEDDINGS: f"tensors 'users' [n_users{row} and 'items' [n_items{row}, float32",
                 USER_IDS: "original user id of each row of 'users'",
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
        described[SCORER] = ("ONNX graph: inputs 'users' [batch, behaviors, dim] (rows of 'users') and 'items' "
                             "[n_items, behaviors, dim] (the 'items' table or a subset) -> 'scores' [batch, n_items], "
                             "the model's score_all; seen items are not masked")
    manifest: dict[str, Any] = {
        "model": name, "run": str(run), "score": score, "dim": int(users.shape[-1]),
        "n_users": int(len(users)), "n_items": int(len(items)),
        "ids": {"users": id_digest(rec.data.user_ids), "items": id_digest(rec.data.item_ids)},
        "files": described,
    }
    if onnx:
        manifest["behaviors"] = int(users.shape[1])
        manifest["onnx_checked_with_onnxruntime"] = verified
    write_json(out / MANIFEST, manifest)
    return ExportReport(out=out, model=name, n_users=len(users), n_items=len(items), dim=int(users.shape[-1]),
                        files=files + [MANIFEST])


def load_export(out: str | Path) -> dict[str, Any]:
    """Read an export back: ``users``/``items`` tensors, ``user_ids``/``item_ids`` lists, ``index`` (or
    None), ``scorer`` (an ONNX Runtime session on ``scorer.onnx``, or None)."""
    from safetensors.torch import load_file

    out = Path(out)
    if not (out / MANIFEST).exists():
        raise MMRecError(f"{out} is not an export directory (no {MANIFEST})")
    tables = load_file(str(out / EMBEDDINGS))
    result: dict[str, Any] = {
        "manifest": json.loads((out / MANIFEST).read_text()),
        "users": tables["users"], "items": tables["items"],
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
