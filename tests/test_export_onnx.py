"""``mmrec export`` of a CIGF run: representation tables + the MESI scorer as ONNX, served by ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.cli import main
from mmrec.export import MESIScorer, NotExportable, scoring_network
from mmrec.recommend import Recommender
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import train


@pytest.fixture(scope="module")
def cigf_run(tmp_path_factory) -> Path:
    """A tiny full-ranking CIGF run (3 behaviors, trained gates: the MESI mixture is not uniform)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("onnx") / "cigf"
    train(RunConfig(model="cigf", data="synthetic:tiny", out=str(out), protocol="full",
                    model_args={"dim": 8, "layers": 2, "samples_per_user": 4},
                    train=TrainSection(epochs=2, batch_size=512, lr=0.01, progress=False)))
    return out


def test_mesi_scorer_is_the_softmax_mixture():
    """Against MESI.forward (the per-pair definition) on explicit pairs, every task, shared gate too."""
    from mmrec.graph.cigf import MESI
    torch.manual_seed(0)
    for shared in (False, True):
        head = MESI(dim=4, n_behaviors=3, shared_gate=shared, mult=7.0)
        for g in head.gates:
            torch.nn.init.normal_(g.bias, std=2.0)  # a non-zero bias must reach the gate
        users, items = torch.randn(5, 3, 4), torch.randn(6, 3, 4)
        for task in range(3):
            gate = head.gates[0 if shared else task]
            got = MESIScorer(gate, task, head.mult)(users, items)
            u = users.repeat_interleave(6, 0).transpose(0, 1)   # [K, 30, d], pairs user-major
            i = items.repeat(5, 1, 1).transpose(0, 1)
            want = head(torch.full((30,), task), u, i).view(5, 6)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_onnx_runtime_gives_the_topk_of_recommend(cigf_run: Path, tmp_path: Path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mmrec.export import load_export

    assert main(["export", "--run", str(cigf_run), "--out", str(tmp_path / "exp")]) == 0
    assert "scorer.onnx" in capsys.readouterr().out
    exp = load_export(tmp_path / "exp")
    manifest = json.loads((tmp_path / "exp" / "export.json").read_text())
    assert manifest["score"] == "onnx" and manifest["onnx_checked_with_onnxruntime"] is True
    assert not (tmp_path / "exp" / "items.faiss").exists()
    assert isinstance(exp["scorer"], ort.InferenceSession)

    rec = Recommender.load(cigf_run)
    n_users, n_items = rec.data.n_users, rec.data.n_items
    assert exp["users"].shape == (n_users, 3, 8) and exp["items"].shape == (n_items, 3, 8)
    assert exp["item_ids"] == [str(i) for i in rec.item_ids]

    k = 10
    seen = rec.seen_matrix()
    items_np = exp["items"].numpy()
    scores = np.concatenate([exp["scorer"].run(["scores"], {"users": exp["users"][s:s + 64].numpy(),
                                                            "items": items_np})[0]
                             for s in range(0, n_users, 64)])  # several batch sizes through one graph
    assert scores.shape == (n_users, n_items)
    scores[seen.nonzero()] = -np.inf                              # the mask recommend applies
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    from_onnx = np.asarray(exp["item_ids"], dtype=object)[order]
    top_scores = np.take_along_axis(scores, order, 1)

    frame = rec.recommend(k=k).frame
    assert len(frame) == n_users * k  # every tiny user has >= k unseen items
    served_items = frame["item"].to_numpy().reshape(n_users, k)
    served = frame["score"].to_numpy().reshape(n_users, k)
    np.testing.assert_allclose(top_scores, served, rtol=1e-4, atol=1e-4 * np.abs(served).max())
    near_tie = np.zeros_like(served, dtype=bool)  # only float near-ties may swap neighbours
    near_tie[:, 1:] |= np.abs(np.diff(served, axis=1)) < 1e-4 * np.abs(served).max()
    near_tie[:, :-1] |= near_tie[:, 1:]
    assert ((from_onnx == served_items) | near_tie).all()
    assert (from_onnx == served_items).mean() > 0.99

    # a subset of items is a valid input too (the item axis is dynamic)
    part = exp["scorer"].run(["scores"], {"users": exp["users"][:3].numpy(), "items": items_np[5:9]})[0]
    with torch.no_grad():
        np.testing.assert_allclose(part, rec.model.score_all(torch.arange(3))[:, 5:9].numpy(),
                                   rtol=1e-4, atol=1e-4 * np.abs(served).max())


def test_scoring_network_must_reproduce_score_all(cigf_run: Path):
    rec = Recommender.load(cigf_run)
    scorer, users, items = scoring_network(rec.model, "cigf")
    with torch.no_grad():
        torch.testing.assert_close(scorer(users[:4], items), rec.model.score_all(torch.arange(4)),
                                   rtol=1e-4, atol=1e-3)
        original = rec.model.score_all
        rec.model.score_all = lambda u: original(u) + 1.0  # a scorer that no longer matches
    with pytest.raises(NotExportable, match="does not reproduce its score_all"):
        scoring_network(rec.model, "cigf")


def test_other_network_models_are_still_refused(tmp_path: Path, capsys):
    run = tmp_path / "pop"
    train(RunConfig(model="pop", data="synthetic:tiny", out=str(run), protocol="full",
                    train=TrainSection(progress=False)))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "not supported yet for it (supported: cigf;" in err
    assert not (tmp_path / "exp").exists()
