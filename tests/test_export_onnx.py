"""``mmrec export`` of models that score with a network: their tables + the scorer as ONNX, served by ONNX Runtime.

CIGF (MESI head), MB-GMN (meta prediction network), SASRec / NOVA (history windows in, the
sequence encoder in the graph) and ``history`` (backbone + evidence bonus)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.cli import main
from mmrec.export import MBGMNScorer, MESIScorer, NotExportable, scoring_network
from mmrec.recommend import Recommender
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import train

#: tiny runs (synthetic:tiny, dim 8, one or two epochs): model -> (model_args, epochs)
RUNS = {
    "cigf": ({"dim": 8, "layers": 2, "samples_per_user": 4}, 2),  # trained gates: the MESI mixture is not uniform
    "mbgmn": ({"dim": 8, "layers": 1, "samples_per_user": 4}, 1),
    "sasrec": ({"dim": 8, "max_len": 8, "layers": 1}, 1),
    "nova": ({"dim": 8, "max_len": 8, "layers": 1}, 1),
    "history": ({"backbone_args": {"dim": 8, "layers": 1}, "hidden": 8}, 1),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """model name -> its tiny full-ranking run directory, trained on first use."""
    root, done = tmp_path_factory.mktemp("onnx"), {}

    def get(name: str) -> Path:
        if name not in done:
            torch.set_num_threads(1)
            args, epochs = RUNS[name]
            train(RunConfig(model=name, data="synthetic:tiny", out=str(root / name), protocol="full",
                            model_args=args, train=TrainSection(epochs=epochs, batch_size=512, lr=0.01,
                                                                progress=False)))
            done[name] = root / name
        return done[name]
    return get


@pytest.fixture(scope="module")
def cigf_run(runs) -> Path:
    return runs("cigf")


def onnx_scores(exp: dict, users: slice | np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
    """The exported scorer on users ``users``, its inputs formed from the exported tables."""
    from mmrec.export import scorer_inputs
    feed = scorer_inputs(exp, users)
    assert list(feed) + ["items"] == list(exp["manifest"]["inputs"])
    feed["items"] = exp["items"].numpy() if items is None else items
    return exp["scorer"].run(["scores"], feed)[0]


def assert_same_topk(scores: np.ndarray, item_ids: list[str], frame, n_users: int, k: int) -> None:
    """ONNX scores (seen items already masked) give ``frame``'s lists; only float near-ties may swap."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    from_onnx = np.asarray(item_ids, dtype=object)[order]
    top_scores = np.take_along_axis(scores, order, 1)
    assert len(frame) == n_users * k  # every tiny user has >= k unseen items
    served_items = frame["item"].to_numpy().reshape(n_users, k)
    served = frame["score"].to_numpy().reshape(n_users, k)
    scale = np.abs(served).max()
    np.testing.assert_allclose(top_scores, served, rtol=1e-4, atol=1e-4 * scale)
    near_tie = np.zeros_like(served, dtype=bool)
    near_tie[:, 1:] |= np.abs(np.diff(served, axis=1)) < 1e-4 * scale
    near_tie[:, :-1] |= near_tie[:, 1:]
    assert ((from_onnx == served_items) | near_tie).all()
    assert (from_onnx == served_items).mean() > 0.99


def export_and_serve(run: Path, out: Path, capsys, inputs: list[str], k: int = 10) -> tuple[dict, Recommender]:
    """``mmrec export``, then ONNX Runtime + the mask ``recommend`` applies == ``mmrec recommend``'s top-K."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from mmrec.export import load_export

    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert "scorer.onnx" in capsys.readouterr().out
    exp = load_export(out)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["score"] == "onnx" and manifest["onnx_checked_with_onnxruntime"] is True
    assert list(manifest["inputs"]) == inputs + ["items"]                   # documented, in graph order
    assert [i.name for i in exp["scorer"].get_inputs()] == inputs + ["items"]
    assert not (out / "items.faiss").exists()
    assert isinstance(exp["scorer"], ort.InferenceSession)

    rec = Recommender.load(run)
    n_users, n_items = rec.data.n_users, rec.data.n_items
    assert len(exp["items"]) == n_items and len(exp["users"] if "users" in inputs else exp["history"]) == n_users
    assert exp["item_ids"] == [str(i) for i in rec.item_ids]
    scores = np.concatenate([onnx_scores(exp, slice(s, s + 64)) for s in range(0, n_users, 64)])
    assert scores.shape == (n_users, n_items)                     # several batch sizes through one graph
    scores[rec.seen_matrix().nonzero()] = -np.inf                 # the mask recommend applies
    assert_same_topk(scores, exp["item_ids"], rec.recommend(k=k).frame, n_users, k)
    return exp, rec


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
    exp, rec = export_and_serve(cigf_run, tmp_path / "exp", capsys, ["users"])
    assert exp["users"].shape == (rec.data.n_users, 3, 8) and exp["items"].shape == (rec.data.n_items, 3, 8)
    assert exp["manifest"]["behaviors"] == 3
    # a subset of items is a valid input too (the item axis is dynamic)
    part = onnx_scores(exp, slice(0, 3), exp["items"][5:9].numpy())
    with torch.no_grad():
        want = rec.model.score_all(torch.arange(3))
    np.testing.assert_allclose(part, want[:, 5:9].numpy(), rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_scoring_network_must_reproduce_score_all(cigf_run: Path):
    rec = Recommender.load(cigf_run)
    scorer, users, items = scoring_network(rec.model, "cigf")
    with torch.no_grad():
        torch.testing.assert_close(scorer(*users.rows(torch.arange(4)), items), rec.model.score_all(torch.arange(4)),
                                   rtol=1e-4, atol=1e-3)
        original = rec.model.score_all
        rec.model.score_all = lambda u: original(u) + 1.0  # a scorer that no longer matches
    with pytest.raises(NotExportable, match="does not reproduce its score_all"):
        scoring_network(rec.model, "cigf")


# -- MB-GMN ---------------------------------------------------------------------------------------

def test_mbgmn_scorer_is_the_meta_prediction_network():
    """Against reference_predict (W₁(m) generated per pair, the paper's form) on every (user, item) pair."""
    from types import SimpleNamespace

    from mmrec.graph.mbgmn import MetaPredictionNetwork, reference_predict
    torch.manual_seed(0)
    net = MetaPredictionNetwork(6)
    for lin in (net.pair, net.meta, net.gen_b1):
        torch.nn.init.normal_(lin.bias, std=0.5)  # biases (zero at init) must reach the scorer
    scorer = MBGMNScorer(SimpleNamespace(predictor=net, config=SimpleNamespace(mult=3.0)))
    users, items = torch.randn(5, 2, 6), torch.randn(7, 2, 6)
    u, i = users.repeat_interleave(7, 0), items.repeat(5, 1, 1)  # pairs user-major
    with torch.no_grad():
        want = 3.0 * reference_predict(net, u[:, 0], i[:, 0], u[:, 1], i[:, 1]).view(5, 7)
        torch.testing.assert_close(scorer(users, items), want, rtol=1e-4, atol=1e-4)


def test_mbgmn_onnx_gives_the_topk_of_recommend(runs, tmp_path: Path, capsys):
    exp, rec = export_and_serve(runs("mbgmn"), tmp_path / "exp", capsys, ["users"])
    assert exp["users"].shape == (rec.data.n_users, 2, 16) and exp["items"].shape == (rec.data.n_items, 2, 16)


# -- sequence models: the user's recent items in, the encoder in the graph --------------------------

@pytest.mark.parametrize("name", ["sasrec", "nova"])
def test_sequence_onnx_scores_from_the_history_window(name: str, runs, tmp_path: Path, capsys):
    exp, rec = export_and_serve(runs(name), tmp_path / "exp", capsys, ["history"])
    history = exp["history"]
    assert history.dtype == torch.int64 and history.shape == (rec.data.n_users, 8)
    if name == "nova":
        assert rec.model.content is not None  # the content side information is in the graph
    # the model's own ranking with the history the evaluator gives it on test: train + valid rows
    model = Recommender.load(runs(name)).model.eval()
    model.use_history(rec.data, ("train", "valid"))
    users = np.arange(rec.data.n_users)
    windows = model.sequences.windows(users, model.config.max_len)
    np.testing.assert_array_equal(history.numpy(), windows)
    with torch.no_grad():
        model.prepare_eval()
        want = model.score_all(torch.from_numpy(users)).numpy()
    got = exp["scorer"].run(["scores"], {"history": windows, "items": exp["items"].numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    k = 10
    top_got, top_want = np.argsort(-got, 1, kind="stable")[:, :k], np.argsort(-want, 1, kind="stable")[:, :k]
    assert (top_got == top_want).mean() > 0.99  # only float near-ties may swap

    # a shorter window (the last 4 items; padding is masked) and a one-item window score the same
    short = (windows != 0).sum(1) <= 4
    assert short.any()
    part = exp["scorer"].run(["scores"], {"history": windows[short][:, -4:], "items": exp["items"].numpy()})[0]
    np.testing.assert_allclose(part, want[short], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    one = np.array([[windows[0, -1]]])
    with torch.no_grad():
        state = model.encode(torch.from_numpy(one))[:, -1]
        np.testing.assert_allclose(exp["scorer"].run(["scores"], {"history": one, "items": exp["items"].numpy()})[0],
                                   (state @ model.item_embeddings().T).numpy(), rtol=1e-4, atol=1e-4)


# -- history: backbone + the evidence bonus -----------------------------------------------------------

def test_history_onnx_adds_the_evidence_bonus(runs, tmp_path: Path, capsys):
    from mmrec.export import pad_history
    exp, rec = export_and_serve(runs("history"), tmp_path / "exp", capsys,
                                ["users", "history_items", "history_evidence"])
    model = rec.model
    # stored in CSR form: user u's pairs at offsets[u]:offsets[u + 1], every history pair once
    offsets, items, evidence = exp["history_offsets"], exp["history_items"], exp["history_evidence"]
    assert torch.equal(offsets, model.indptr.cpu()) and len(items) == len(evidence) == int(offsets[-1]) > 0
    assert items.dtype == torch.int64 and evidence.shape[1] == len(model.evidence.names)
    users = torch.arange(16)
    hist, padded = pad_history(offsets, items, evidence, users)
    real = hist >= 0
    assert (real.sum(1) == offsets[1:17] - offsets[:16]).all() and (padded[~real] == 0).all()
    assert hist.shape[1] == int((offsets[1:17] - offsets[:16]).max())  # padded to the batch's longest history
    # without its history the user gets the backbone scores: the bonus sits on the history items only
    with_h = onnx_scores(exp, users.numpy())
    feed = {"users": exp["users"][users].numpy(), "history_items": np.full_like(hist.numpy(), -1),
            "history_evidence": padded.numpy(), "items": exp["items"].numpy()}
    without = exp["scorer"].run(["scores"], feed)[0]
    with torch.no_grad():
        base = (model.scale * model.backbone.score_all(users)).numpy()
    np.testing.assert_allclose(without, base, rtol=1e-4, atol=1e-4)
    differs = np.zeros_like(with_h, dtype=bool)
    for r in range(16):
        differs[r, hist[r][real[r]].numpy()] = True
    np.testing.assert_allclose(with_h[~differs], without[~differs], rtol=1e-5, atol=1e-5)
    assert np.abs(with_h[differs] - without[differs]).max() > 1e-3
    # one user at a time gives the same rows as the batch; so do histories one and zero wide
    for u in range(16):
        np.testing.assert_allclose(onnx_scores(exp, [u]), with_h[u:u + 1], rtol=1e-5, atol=1e-5)
    from mmrec.export import history_scorer
    scorer = history_scorer(model)[0]
    for width in (1, 0):
        args = (exp["users"][:1], hist[:1, :width], padded[:1, :width], exp["items"])
        got = exp["scorer"].run(["scores"], dict(zip(feed, (a.numpy() for a in args))))[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, scorer(*args).numpy(), rtol=1e-5, atol=1e-5)


def test_history_with_a_network_backbone_is_refused(runs):
    from mmrec.export import history_scorer
    model = Recommender.load(runs("history")).model
    model.backbone = torch.nn.Linear(2, 2)  # stands for a backbone that does not score by an inner product
    with pytest.raises(NotExportable, match="only a backbone that scores by an inner product"):
        history_scorer(model)
