"""``mmrec export``: a run's user and item embedding tables plus a faiss index over items.

Only models whose score *is* a plain inner product, ``score(u, i) = <e_u, e_i>``, can be
served from embedding tables: those built on :class:`mmrec.models.base.InnerProductScoring`
(BPR-MF, LightGCN, VBPR and the multimodal graph backbones). The tables are the ones
``representations()`` returns after ``prepare_eval()`` (propagated, content fused), and
the export checks that they reproduce the model's ``score_all`` before writing
anything. Other models (CIGF's gated experts, MB-GMN's meta network, SASRec, popularity)
score with a network or a rule: exporting that network to ONNX is not supported yet, and
the export says so instead of writing tables that would rank differently.

The faiss index (``IndexFlatIP``: exact inner-product search) returns the same top-K as
``mmrec recommend --include-seen``; it does not mask the users' seen items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from mmrec.errors import MMRecError
from mmrec.io import atomic_path, write_json
from mmrec.models.base import InnerProductScoring

__all__ = ["ExportReport", "export_run", "embedding_tables", "EMBEDDINGS", "INDEX", "MANIFEST"]

EMBEDDINGS = "embeddings.safetensors"
INDEX = "items.faiss"
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
        raise NotExportable(
            f"model '{label}' does not score by a plain inner product of user and item embeddings, so it "
            f"cannot be exported as embedding tables; ONNX export of its scoring network is not supported "
            f"yet (serve it with `mmrec recommend`)")
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        users, items = (t.detach().float() for t in model.representations()[:2])
        probe = torch.arange(min(CHECK_USERS, len(users)), device=users.device)
        expected = model.score_all(probe).float()
    got = users[probe] @ items.T
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise NotExportable(f"model '{label}': the inner products of its representations do not reproduce its "
                            f"score_all, so embedding tables would rank differently; ONNX export of its scoring "
                            f"network is not supported yet (serve it with `mmrec recommend`)")
    return users.cpu().contiguous(), items.cpu().contiguous()


def export_run(run: str | Path, out: str | Path, data: str | None = None, device: str | None = None,
               index: bool = True) -> ExportReport:
    """Write ``out/``: embeddings (safetensors), id lists, a faiss ``IndexFlatIP`` over items, a manifest."""
    from mmrec.recommend import Recommender
    from mmrec.train.run import id_digest, load_run_config

    run, out = Path(run), Path(out)
    if out.exists() and not out.is_dir():
        raise MMRecError(f"--out {out} exists and is not a directory")
    rec = Recommender.load(run, data=data, device=device)
    name = load_run_config(run).model
    users, items = embedding_tables(rec.model, name)
    faiss = _faiss() if index else None  # fail before writing anything
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": name, "score": "inner_product", "run": str(run), "n_users": str(len(users)),
            "n_items": str(len(items)), "dim": str(users.shape[1])}
    with atomic_path(out / EMBEDDINGS) as tmp:
        save_file({"users": users, "items": items}, str(tmp), metadata=meta)
    for fname, ids in ((USER_IDS, rec.data.user_ids), (ITEM_IDS, rec.data.item_ids)):
        with atomic_path(out / fname) as tmp:
            tmp.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    files = [EMBEDDINGS, USER_IDS, ITEM_IDS]
    if faiss is not None:
        flat = faiss.IndexFlatIP(items.shape[1])
        flat.add(np.ascontiguousarray(items.numpy(), dtype=np.float32))
        with atomic_path(out / INDEX) as tmp:
            faiss.write_index(flat, str(tmp))
        files.append(INDEX)
    manifest: dict[str, Any] = {
        "model": name, "run": str(run), "score": "inner_product", "dim": int(users.shape[1]),
        "n_users": int(len(users)), "n_items": int(len(items)),
        "ids": {"users": id_digest(rec.data.user_ids), "items": id_digest(rec.data.item_ids)},
        "files": {EMBEDDINGS: "tensors 'users' [n_users, dim] and 'items' [n_items, dim], float32",
                  USER_IDS: "original user id of each row of 'users'",
                  ITEM_IDS: "original item id of each row of 'items' (and of each faiss id)",
                  **({INDEX: "faiss IndexFlatIP over 'items': exact top-K by inner product; "
                              "seen items are not masked"} if faiss is not None else {})},
    }
    write_json(out / MANIFEST, manifest)
    return ExportReport(out=out, model=name, n_users=len(users), n_items=len(items), dim=int(users.shape[1]),
                        files=files + [MANIFEST])


def load_export(out: str | Path) -> dict[str, Any]:
    """Read an export back: ``users``/``items`` tensors, ``user_ids``/``item_ids`` lists, ``index`` (or None)."""
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
    }
    if (out / INDEX).exists():
        result["index"] = _faiss().read_index(str(out / INDEX))
    return result


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise MMRecError("the faiss index needs faiss: pip install 'mmrec[ann]' (or faiss-cpu), "
                         "or pass --no-index") from e
    return faiss
