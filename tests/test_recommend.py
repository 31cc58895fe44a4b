"""``mmrec recommend`` / ``mmrec.Recommender``: the top-K of a trained run, as the evaluator ranks it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mmrec
from mmrec.cli import main
from mmrec.errors import DataError, MMRecError
from mmrec.eval import protocols
from mmrec.recommend import (Recommender, read_recommendations, read_user_file, unknown_users_path,
                             write_recommendations)
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import train
from tests.conftest import capture_top_lists


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A small full-ranking BPR-MF run on synthetic:tiny (leave-one-out: train, valid, test)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("recommend") / "bprmf"
    cfg = RunConfig(model="bprmf", data="synthetic:tiny", out=str(out), protocol="full",
                    model_args={"dim": 16},
                    train=TrainSection(epochs=3, batch_size=256, lr=0.05, progress=False))
    train(cfg)
    return out


@pytest.fixture(scope="module")
def rec(run_dir: Path) -> Recommender:
    return Recommender.load(run_dir)


def _gt(data) -> dict[str, set[str]]:
    """Original user id -> original ids of its held-out test items (target behavior)."""
    test = data.test
    sel = test.behavior == data.target_index
    out: dict[str, set[str]] = {}
    for u, i in zip(test.user[sel], test.item[sel]):
        out.setdefault(str(data.user_ids[u]), set()).add(str(data.item_ids[i]))
    return out


def test_top_level_name_is_the_serving_api():
    from mmrec.models.base import Recommender as ModelBase
    assert mmrec.Recommender is Recommender
    assert mmrec.Recommender is not ModelBase


def test_topk_equals_the_full_ranking_evaluator(rec: Recommender, monkeypatch):
    """For every evaluated user, recommend's item list is the evaluator's top-K row."""
    data = rec.data
    top = capture_top_lists(monkeypatch, lambda: protocols.evaluate_full(
        rec.model, data, split="test", ks=[20], batch_size=rec.batch_size))
    users = np.unique(protocols._target_keys(data, "test") // data.n_items)
    assert len(users) == len(top) > 100

    frame = rec.recommend(k=20).frame
    by_user = frame.groupby("user", sort=False)["item"].apply(list)
    for row, u in zip(top, users):
        assert by_user[str(data.user_ids[u])] == [str(i) for i in data.item_ids[row.numpy()]]


def test_recall_from_the_cli_file_equals_metrics_json(run_dir: Path, tmp_path: Path, rec: Recommender, capsys):
    out = tmp_path / "recs.tsv"
    assert main(["recommend", "--run", str(run_dir), "--all", "--k", "20", "--out", str(out), "--no-progress"]) == 0
    assert f"for {rec.data.n_users:,} users" in capsys.readouterr().out
    frame = read_recommendations(out)
    assert list(frame.columns) == ["user", "rank", "item", "score"]
    assert frame["user"].nunique() == rec.data.n_users
    assert (frame.groupby("user")["rank"].apply(list) == [list(range(1, 21))] * rec.data.n_users).all()
    top = frame.groupby("user")["item"].apply(set)
    recall = np.mean([len(top[u] & items) / len(items) for u, items in _gt(rec.data).items()])
    saved = json.loads((run_dir / "metrics.json").read_text())["metrics"]["Recall@20"]
    assert recall == pytest.approx(saved, abs=1e-6)
    assert saved > 0  # a trained model: the comparison is not 0 == 0
    assert not unknown_users_path(out).exists()


def test_seen_items_are_masked_as_the_evaluator_masks_them(rec: Recommender):
    data = rec.data
    seen = data.matrix(split="train") + data.matrix(split="valid")
    frame = rec.recommend(k=data.n_items).frame
    index = {str(u): i for i, u in enumerate(data.user_ids)}
    item_index = {str(i): j for j, i in enumerate(data.item_ids)}
    u = frame["user"].map(index).to_numpy()
    i = frame["item"].map(item_index).to_numpy()
    assert np.asarray(seen[u, i]).ravel().sum() == 0
    # with k = n_items every unseen item (cold ones included) is listed: nothing else is dropped
    assert len(frame) == data.n_users * data.n_items - (seen > 0).sum()
    # scores are sorted best first within each user
    assert (frame.groupby("user", sort=False)["score"].apply(lambda s: s.is_monotonic_decreasing)).all()

    with_seen = rec.recommend(k=data.n_items, include_seen=True).frame
    assert len(with_seen) == data.n_users * data.n_items
    u = with_seen["user"].map(index).to_numpy()
    i = with_seen["item"].map(item_index).to_numpy()
    assert np.asarray(seen[u, i]).ravel().sum() == (seen > 0).sum()


def test_batches_do_not_change_the_answer(rec: Recommender):
    users = [str(u) for u in rec.data.user_ids[::7]]
    a = rec.recommend(users, k=10, batch_size=5).frame
    b = rec.recommend(users, k=10, batch_size=1000).frame
    assert a[["user", "rank", "item"]].equals(b[["user", "rank", "item"]])
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5)
    assert list(a["user"].unique()) == users  # the requested order


def test_unknown_users_are_counted_and_listed(run_dir: Path, rec: Recommender, tmp_path: Path, capsys):
    known = [str(u) for u in rec.data.user_ids[:3]]
    users = tmp_path / "users.txt"
    users.write_text("user\n" + "\n".join([known[0], "nobody", known[1], known[0], "ghost", known[2]]) + "\n")
    out = tmp_path / "recs.parquet"
    assert main(["recommend", "--run", str(run_dir), "--users", str(users), "--k", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 of 5 user ids are not in the run's data" in printed
    listed = tmp_path / "recs.unknown_users.txt"
    assert listed.read_text().split() == ["nobody", "ghost"]
    frame = pd.read_parquet(out)
    assert list(frame["user"].unique()) == known and len(frame) == 15
    assert frame["item"].map(type).eq(str).all()

    direct = rec.recommend([known[0], "nobody"], k=5)
    assert direct.unknown_users == ["nobody"]
    assert direct.items(known[0]) == frame.loc[frame["user"] == known[0], "item"].tolist()

    users.write_text("\n".join(known) + "\n")  # all known now: the stale list goes away
    assert main(["recommend", "--run", str(run_dir), "--users", str(users), "--k", "5", "--out", str(out)]) == 0
    assert not listed.exists()

    users.write_text("nobody\nghost\n")  # nobody known: an error, the list still written
    assert main(["recommend", "--run", str(run_dir), "--users", str(users), "--k", "5", "--out", str(out)]) == 2
    assert "none of the 2 user ids" in capsys.readouterr().err
    assert listed.read_text().split() == ["nobody", "ghost"]


def test_config_file_and_set_reach_the_options(run_dir: Path, tmp_path: Path, rec: Recommender):
    cfg = tmp_path / "rec.yaml"
    cfg.write_text(f"run: {run_dir}\nk: 7\nprogress: false\n")
    out = tmp_path / "r.tsv"
    assert main(["recommend", "--config", str(cfg), "--out", str(out), "--set", "k=3",
                 "--set", "include_seen=true"]) == 0
    frame = read_recommendations(out)
    assert len(frame) == 3 * rec.data.n_users
    expected = rec.recommend(k=3, include_seen=True).frame
    assert frame["item"].tolist() == expected["item"].tolist()
    assert main(["recommend", "--config", str(cfg), "--out", str(out), "--set", "kk=3"]) == 2


def test_users_file_errors_name_file_and_line(tmp_path: Path):
    bad = tmp_path / "u.txt"
    bad.write_text("user\nu1\nu2\tx\n")
    with pytest.raises(DataError, match=r"u\.txt, line 3"):
        read_user_file(bad)
    bad.write_text("user\n\n")
    with pytest.raises(DataError, match="no user ids"):
        read_user_file(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_user_file(tmp_path / "missing.txt")
    bad.write_text("u1\n\nu 2 \n")
    assert read_user_file(bad) == ["u1", "u 2"]


def test_a_run_from_other_data_or_with_missing_files_is_a_clear_error(run_dir: Path, tmp_path: Path, capsys):
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["ids"]["items"] = "0" * 64  # the data now holds other item ids (same count)
    (other / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(DataError, match="item ids .* do not match"):
        Recommender.load(other)
    metrics["n_items"] += 1
    (other / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(DataError, match="trained on 201 items"):
        Recommender.load(other)

    (other / "best.safetensors").unlink()
    assert main(["recommend", "--run", str(other), "--out", str(tmp_path / "r.tsv")]) == 2
    assert "no best.safetensors" in capsys.readouterr().err
    (other / "config.yaml").unlink()
    with pytest.raises(MMRecError, match="not a run directory"):
        Recommender.load(other)
    with pytest.raises(MMRecError, match="does not exist"):
        Recommender.load(tmp_path / "nowhere")
    assert main(["recommend", "--run", str(run_dir), "--out", str(tmp_path / "r.csv")]) == 2
    assert "unknown output format '.csv'" in capsys.readouterr().err


def test_writer_is_atomic_and_round_trips(tmp_path: Path):
    frame = pd.DataFrame({"user": ["007", "7"], "rank": np.array([1, 1], dtype=np.int32),
                          "item": ["010", "NA"], "score": np.array([0.5, -1.25], dtype=np.float32)})
    for name in ("r.tsv", "r.parquet"):
        assert write_recommendations(iter([frame, frame.iloc[:0]]), tmp_path / name) == 2
        back = read_recommendations(tmp_path / name)
        assert back["user"].tolist() == ["007", "7"] and back["item"].tolist() == ["010", "NA"]
        np.testing.assert_array_equal(back["score"].to_numpy(), frame["score"].to_numpy())

    def failing():
        yield frame
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_recommendations(failing(), tmp_path / "partial.tsv")
    assert not (tmp_path / "partial.tsv").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- export: embedding tables and a faiss index --------------------------------------------------

@pytest.fixture(scope="module")
def lightgcn_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("recommend") / "lightgcn"
    train(RunConfig(model="lightgcn", data="synthetic:tiny", out=str(out), protocol="full",
                    model_args={"dim": 16, "layers": 2},
                    train=TrainSection(epochs=2, batch_size=256, lr=0.01, progress=False)))
    return out


@pytest.mark.parametrize("which", ["bprmf", "lightgcn"])
def test_faiss_index_gives_the_topk_of_recommend_with_seen_items(which: str, run_dir: Path, lightgcn_run: Path,
                                                                 tmp_path: Path, capsys):
    from mmrec.export import load_export
    run = run_dir if which == "bprmf" else lightgcn_run
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert "items.faiss" in capsys.readouterr().out
    exp = load_export(tmp_path / "exp")
    rec = Recommender.load(run)
    assert exp["item_ids"] == [str(i) for i in rec.item_ids] and exp["user_ids"] == [str(u) for u in rec.user_ids]
    assert exp["manifest"]["model"] == which and exp["index"].ntotal == rec.data.n_items

    k = 20
    scores, index = exp["index"].search(exp["users"].numpy(), k)
    frame = rec.recommend(k=k, include_seen=True).frame
    items = frame["item"].to_numpy().reshape(rec.data.n_users, k)
    served = frame["score"].to_numpy().reshape(rec.data.n_users, k)
    np.testing.assert_allclose(scores, served, rtol=1e-5, atol=1e-6)
    from_faiss = np.asarray(exp["item_ids"], dtype=object)[index]
    # the same lists; only exact float ties (none expected) could swap neighbours
    near_tie = np.zeros_like(served, dtype=bool)
    near_tie[:, 1:] |= np.abs(np.diff(served, axis=1)) < 1e-6
    near_tie[:, :-1] |= near_tie[:, 1:]
    assert ((from_faiss == items) | near_tie).all()
    assert (from_faiss == items).mean() > 0.99


def test_export_refuses_models_that_are_not_inner_products(tmp_path: Path, capsys):
    run = tmp_path / "pop"
    train(RunConfig(model="pop", data="synthetic:tiny", out=str(run), protocol="full",
                    train=TrainSection(progress=False)))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "model 'pop' does not score by a plain inner product" in err
    assert "ONNX export of its scoring network is not supported yet" in err
    assert "not supported yet for it (supported: cigf, history, mbgmn, nova, sasrec;" in err
    assert not (tmp_path / "exp").exists()


def test_export_checks_the_tables_reproduce_the_scores():
    from mmrec.export import NotExportable, embedding_tables
    from mmrec.models.base import InnerProductScoring, Recommender as ModelBase

    class Biased(InnerProductScoring, ModelBase):  # claims inner products but adds an item bias
        def __init__(self):
            super().__init__()
            self.u = torch.nn.Parameter(torch.randn(5, 3))
            self.i = torch.nn.Parameter(torch.randn(4, 3))

        def representations(self):
            return self.u, self.i

        def score_all(self, users):
            return self.u[users] @ self.i.T + torch.arange(4.0)

    with pytest.raises(NotExportable, match="do not reproduce its score_all"):
        embedding_tables(Biased())
    model = Biased()
    model.score_all = lambda users: model.u[users] @ model.i.T  # now a plain inner product
    users, items = embedding_tables(model)
    assert torch.equal(users, model.u.detach()) and torch.equal(items, model.i.detach())


def test_cold_items_are_ranked_like_any_other(tmp_path: Path):
    run = tmp_path / "cold"
    train(RunConfig(model="bprmf", data="synthetic:tiny", out=str(run), protocol="full", split="cold",
                    model_args={"dim": 8}, train=TrainSection(epochs=1, batch_size=256, progress=False)))
    rec = Recommender.load(run)
    cold = {str(rec.item_ids[i]) for i in rec.data.cold_items}
    assert cold
    frame = rec.recommend(k=rec.data.n_items).frame
    per_user = frame.groupby("user")["item"].apply(set)
    assert all(cold <= items for items in per_user)  # never masked: no user has them in training
