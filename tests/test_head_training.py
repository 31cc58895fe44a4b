"""``mmrec train --head``: tasks derived from data, heads trained on backbones, metrics, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmrec.cli import main
from mmrec.datasets.loading import load_dataset
from mmrec.datasets.schema import Dataset, Interactions
from mmrec.datasets.splits import apply_split
from mmrec.errors import ConfigError, DataError, MMRecError
from mmrec.heads.tasks import derive_tasks
from mmrec.train.config import build_run_config
from mmrec.train.run import evaluate, train

# tiny budgets: a 32-d 2-layer LightGCN over all behaviors, a small head
BASE = ["train.progress=false", "train.lr=0.01", "train.epochs=12", "train.eval_every=3", "train.patience=3",
        "head_args.backbone_epochs=20"]
GRAPH = ["model.dim=32", "model.layers=2"]
MMOE = ["head_args.n_experts=3", "head_args.expert_dims=[32]", "head_args.tower_dims=[16]"]


def run(tmp: Path, name: str, head: str, sets: list[str], model: str = "lightgcn-mb",
        data: str = "synthetic:tiny", mode: str | None = None, small: list[str] | None = None) -> dict:
    cli = {"model": model, "head": head, "data": data, "out": str(tmp / name), "mode": mode}
    if small is None:
        small = GRAPH if model.startswith("lightgcn") else ["model.dim=16"]
    return train(build_run_config(None, cli, BASE + small + sets))


def constant_logloss(table, task: int) -> float:
    """Log loss on test of the best constant predictor one could fit: the training rate."""
    p = float(table.labels[table.rows("train"), task].mean())
    y = table.labels[table.rows("test"), task]
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


@pytest.fixture(scope="module")
def two_step(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heads")
    metrics = run(tmp, "mmoe", "mmoe", MMOE)
    return tmp / "mmoe", metrics


def test_two_step_mmoe_learns_click_and_convert(two_step):
    run_dir, metrics = two_step
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    m = on_disk["metrics"]
    for task in ("click", "convert"):
        for name in ("AUC", "GAUC", "LogLoss"):
            assert f"{task}/{name}" in m
        assert m[f"{task}/AUC"] > 0.62, m
    assert m["AUC"] == pytest.approx((m["click/AUC"] + m["convert/AUC"]) / 2)
    assert on_disk["select"] == "AUC" and on_disk["valid"]["AUC"] > 0.6
    # better calibrated than the best constant predictor (the training click / convert rate)
    data = apply_split(load_dataset("synthetic:tiny"), None)
    table = derive_tasks(data)
    assert table.tasks == ["click", "convert"]
    for k, task in enumerate(table.tasks):
        assert m[f"{task}/LogLoss"] < constant_logloss(table, k) - 0.01
    report = on_disk["data_report"]["head_exposures"]
    assert report["rule"] == "exposures" and report["test"]["rows"] == len(table.rows("test"))


def test_two_step_keeps_the_backbone_frozen(two_step):
    run_dir, _ = two_step
    backbone = load_file(str(run_dir / "backbone" / "best.safetensors"))
    full = load_file(str(run_dir / "best.safetensors"))
    assert backbone, "the backbone stage wrote its weights"
    for k, v in backbone.items():
        assert torch.equal(full[f"backbone.{k}"], v), k


def test_evaluate_reproduces_the_head_metrics(two_step, capsys):
    run_dir, metrics = two_step
    again = evaluate(run_dir)
    for k, v in metrics["metrics"].items():
        assert again["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert main(["evaluate", "--run", str(run_dir), "--split", "valid"]) == 0
    assert "valid (head mmoe, labelled exposures)" in capsys.readouterr().out
    valid = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert valid["AUC"] == pytest.approx(metrics["valid"]["AUC"], abs=1e-6)   # the selected epoch's valid AUC


def test_same_seed_same_numbers(tmp_path):
    sets = MMOE + ["train.epochs=2", "head_args.backbone_epochs=2"]
    a = run(tmp_path, "a", "mmoe", sets)["metrics"]
    b = run(tmp_path, "b", "mmoe", sets)["metrics"]
    assert a == b


def test_multi_behavior_cascade_trains_three_tasks(tmp_path):
    sets = ["head_args.rule=multi-behavior", "head_args.n_levels=1", "head_args.expert_dims=[16]",
            "head_args.tower_dims=[8]", "train.epochs=10", "train.eval_every=5"]
    m = run(tmp_path, "mb", "ple", sets)
    assert m["data_report"]["head_exposures"]["tasks"] == ["view", "cart", "buy"]
    for task in ("view", "cart", "buy"):
        assert f"{task}/AUC" in m["metrics"]
    assert m["metrics"]["buy/AUC"] > 0.6      # held-out purchases vs. sampled pairs


def test_end2end_trains_backbone_and_head(tmp_path):
    metrics = run(tmp_path, "e2e", "mmoe", MMOE, mode="end2end")
    assert not (tmp_path / "e2e" / "backbone").exists()   # no separate backbone stage
    assert metrics["metrics"]["click/AUC"] > 0.62
    # the backbone moved away from its seeded initialisation (it is trained with the head)
    from mmrec.models.base import create_model
    torch.manual_seed(0)
    init = create_model("lightgcn-mb", apply_split(load_dataset("synthetic:tiny"), None), {"dim": 32, "layers": 2})
    trained = load_file(str(tmp_path / "e2e" / "best.safetensors"))
    assert not torch.allclose(trained["backbone.item_emb.weight"], init.item_emb.weight)


def test_cli_multi_scenario_head_writes_per_scenario_metrics(tmp_path, capsys):
    out = tmp_path / "star"
    rc = main(["train", "--model", "lightgcn-mb", "--head", "star", "--data", "synthetic:tiny", "--out", str(out),
               *sum((["--set", s] for s in BASE + GRAPH + ["head_args.balance=uncertainty", "head_args.hidden_dims=[32,16]",
                                                   "head_args.aux_dims=[8]"]), [])])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    for s in ("home", "search", "promo"):
        assert 0.0 < m[f"scenario={s}/AUC"] < 1.0
        assert m[f"scenario={s}/AUC"] == pytest.approx(
            np.mean([m[f"scenario={s}/click/AUC"], m[f"scenario={s}/convert/AUC"]]))
    assert m["click/AUC"] > 0.6
    assert "test (head" in capsys.readouterr().out


# -- errors ----------------------------------------------------------------------------------

def test_unknown_task_lists_the_tasks_the_data_has(tmp_path):
    with pytest.raises(DataError, match=r"task\(s\) like not in the data; it defines: click, convert"):
        run(tmp_path, "bad", "mmoe", ["head_args.tasks=[click,like]"])


def test_unknown_head_option_names_it_as_typed(tmp_path):
    with pytest.raises(ConfigError, match=r"head_args.n_expert; did you mean 'head_args.n_experts'.*also takes: rule"):
        run(tmp_path, "bad", "mmoe", ["head_args.n_expert=3"])
    assert not (tmp_path / "bad" / "backbone").exists()       # refused before training anything


def test_head_with_the_wrong_number_of_tasks_lists_them(tmp_path):
    with pytest.raises(ConfigError, match=r"head 'esmm' needs exactly 2 tasks, got 3; the data defines: view, cart, buy"):
        run(tmp_path, "bad", "esmm", ["head_args.rule=multi-behavior"])
    assert not (tmp_path / "bad" / "backbone").exists()       # refused before training anything


def test_backbone_without_representations_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no representations\\(\\); heads sit on models with user and item vectors"):
        run(tmp_path, "pop", "mmoe", [], model="pop", small=[])
    assert not (tmp_path / "pop" / "backbone").exists()


def test_bad_rule_scenario_and_options_are_clear_errors(tmp_path):
    data = apply_split(load_dataset("synthetic:tiny"), None)
    with pytest.raises(ConfigError, match="unknown task rule 'clicks'; known: exposures, multi-behavior, rated"):
        derive_tasks(data, {"rule": "clicks"})
    with pytest.raises(ConfigError, match="head_args.*no field 'scenarios'|scenarios"):
        derive_tasks(data, {"scenarios": "age"})
    with pytest.raises(DataError, match="users.tsv"):        # the synthetic world has no user columns
        derive_tasks(data, {"scenario": "age"})
    with pytest.raises(DataError, match="needs a 'rating' column"):
        derive_tasks(data, {"rule": "rated"})
    broken = data.replace(scenarios=["home"])                # exposures carry ids 0..2
    with pytest.raises(DataError, match=r"field 'scenario': scenario id 2 out of range \[0, 1\)"):
        derive_tasks(broken)


# -- task derivation on small hand-made data -----------------------------------------------------

RATINGS = [  # user, item, rating
    ("u1", "a", 5), ("u1", "b", 2), ("u1", "c", 4), ("u1", "d", 1), ("u1", "e", 5), ("u1", "f", 3),
    ("u2", "a", 4), ("u2", "c", 3), ("u2", "g", 5), ("u2", "h", 2), ("u2", "i", 4), ("u2", "j", 1),
    ("u3", "b", 5), ("u3", "d", 4), ("u3", "e", 2), ("u3", "g", 1), ("u3", "k", 5), ("u3", "l", 4),
]
USERS = "user\tage\tgender\toccupation\tzip\nu1\t24\tM\ttechnician\t1\nu2\t53\tF\tother\t2\nu3\t30\tF\twriter\t3\n"


@pytest.fixture
def rated_dir(tmp_path):
    root = tmp_path / "ml"
    root.mkdir()
    rows = ["user\titem\trating\ttimestamp"] + [f"{u}\t{i}\t{r}\t{t}" for t, (u, i, r) in enumerate(RATINGS)]
    (root / "interactions.tsv").write_text("\n".join(rows) + "\n")
    extra = "\n".join(f"{c}\tx" for c in "mnopqrstuvwxyz")          # unrated items to sample from
    (root / "items.tsv").write_text("item\ttitle\n" + "\n".join(f"{c}\tx" for c in "abcdefghijkl") + "\n" + extra + "\n")
    (root / "users.tsv").write_text(USERS)
    return root


def test_rated_data_gives_watch_and_like_as_a_cascade(rated_dir):
    data = apply_split(load_dataset(str(rated_dir)), "random", seed=0, ratios=(0.5, 0.25, 0.25))
    table = derive_tasks(data, {"scenario": "age"}, seed=0)
    assert table.rule == "rated" and table.tasks == ["watch", "like"]
    rating = {(u, i): r for u, i, r in RATINGS}
    uid, iid = list(data.user_ids), list(data.item_ids)
    watch, like = table.labels[:, 0], table.labels[:, 1]
    for r in range(len(table)):
        pair = (uid[table.user[r]], iid[table.item[r]])
        if pair in rating:
            assert watch[r] == 1 and like[r] == float(rating[pair] >= 4), pair
        else:
            assert watch[r] == 0 and like[r] == 0, pair               # like only among the watched
    assert (like <= watch).all()
    # every rated pair once; 1:1 sampled negatives per user and part
    assert int(watch.sum()) == len(RATINGS)
    for part in ("train", "valid", "test"):
        idx = table.rows(part)
        for u in np.unique(table.user[idx]):
            mine = idx[table.user[idx] == u]
            assert watch[mine].sum() == (watch[mine] == 0).sum()
    # held-out rows of the split are the held-out positives
    for part, rows in (("valid", data.valid), ("test", data.test)):
        idx = table.rows(part)
        got = {(int(u), int(i)) for u, i, w in zip(table.user[idx], table.item[idx], watch[idx]) if w}
        assert got == {(int(u), int(i)) for u, i in zip(rows.user, rows.item)}
    # scenarios: MovieLens-1M age bands from users.tsv
    band = {"u1": "18-24", "u2": "50-55", "u3": "25-34"}
    for r in range(len(table)):
        assert table.scenarios[table.scenario[r]] == band[uid[table.user[r]]]
    assert table.scenario_source == "age"
    g = derive_tasks(data, {"scenario": "gender"})
    assert g.scenarios == ["F", "M"]
    with pytest.raises(DataError, match="no column 'height'.*age, gender, occupation, zip"):
        derive_tasks(data, {"scenario": "height"})
    # same seed, same table
    again = derive_tasks(data, {"scenario": "age"}, seed=0)
    assert np.array_equal(again.item, table.item) and np.array_equal(again.part, table.part)


def test_dataset_yaml_declares_tasks_and_scenario_column(rated_dir):
    (rated_dir / "dataset.yaml").write_text("tasks: [like]\nscenario_column: gender\n")
    data = apply_split(load_dataset(str(rated_dir)), "random", seed=0, ratios=(0.5, 0.25, 0.25))
    table = derive_tasks(data)
    assert table.tasks == ["like"] and table.scenarios == ["F", "M"]


def test_multi_behavior_funnel_labels():
    # u0: viewed item 0, carted item 1 (no view row), bought item 2 (no view / cart rows)
    train = Interactions(np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 3]), np.array([0, 1, 2, 0, 2]))
    data = Dataset(name="mb", behaviors=["view", "cart", "buy"], target="buy",
                   user_ids=np.array(["a", "b"]), item_ids=np.array([str(i) for i in range(8)]), train=train,
                   valid=Interactions.empty(), test=Interactions.empty())
    table = derive_tasks(data, {"rule": "multi-behavior"})
    assert table.tasks == ["view", "cart", "buy"]
    got = {(int(u), int(i)): tuple(table.labels[r]) for r, (u, i) in enumerate(zip(table.user, table.item))
           if table.labels[r, 0]}
    assert got == {(0, 0): (1, 0, 0), (0, 1): (1, 1, 0), (0, 2): (1, 1, 1), (1, 0): (1, 0, 0), (1, 3): (1, 1, 1)}
    neg = table.labels[:, 0] == 0
    assert neg.sum() == 5 and (table.labels[neg] == 0).all()
    observed = set(zip(train.user.tolist(), train.item.tolist()))
    assert not observed & set(zip(table.user[neg].tolist(), table.item[neg].tolist()))


def test_rated_data_trains_a_multi_scenario_head(rated_dir, tmp_path):
    from mmrec.train.heads import user_side_features
    data = load_dataset(str(rated_dir))
    side = user_side_features(data, ["gender", "age"])            # one-hot F/M, then the 7 age bands
    assert side.shape == (3, 2 + 7) and torch.equal(side.sum(1), torch.full((3,), 2.0))
    u3 = list(data.user_ids).index("u3")
    assert side[u3, 0] == 1 and side[u3, 2 + 2] == 1              # F, 25-34
    sets = ["head_args.scenario=gender", "split_args.ratios=[0.5,0.25,0.25]", "head_args.hidden_dims=[8]",
            "head_args.aux_dims=[4]", "head_args.user_features=[gender,age]"]
    m = run(tmp_path, "ml", "star", sets, model="bprmf", data=str(rated_dir))
    w = load_file(str(tmp_path / "ml" / "best.safetensors"))
    # the head reads x = [e_u ⊙ e_i ‖ e_u ‖ e_i ‖ side] (16-d BPR-MF): its input layer is 3·16 + 9 wide
    assert any(v.dim() == 2 and v.shape[1] == 3 * 16 + 9 for k, v in w.items() if k.startswith("head."))
    keys = set(m["metrics"])
    assert {"watch/AUC", "watch/LogLoss"} <= keys
    assert any(k.startswith("scenario=F/") for k in keys) or any(k.startswith("scenario=M/") for k in keys)
    with pytest.raises(MMRecError):
        run(tmp_path, "ml2", "mmoe", ["head_args.scenario=gender", "split_args.ratios=[0.5,0.25,0.25]",
                                      "head_args.balance=nope"], model="bprmf", data=str(rated_dir))


# -- recipes ---------------------------------------------------------------------------------

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "heads").glob("*.yaml"))


def test_every_head_has_a_recipe_that_builds():
    from mmrec.config import from_dict
    from mmrec.heads import create_head
    from mmrec.heads.model import HeadModelConfig, split_head_args
    from mmrec.registry import HEADS
    assert sorted(p.stem for p in RECIPES) == HEADS.names()
    for path in RECIPES:
        cfg = build_run_config(str(path), {}, [])
        assert cfg.head == path.stem and cfg.model == "lightgcn" and cfg.select_metric() == "AUC"
        own, head_cfg = split_head_args(cfg.head_args)
        from_dict(HeadModelConfig, own, path="head_args")
        head = create_head(cfg.head, in_dim=3 * 64, n_tasks=2, n_scenarios=3, **head_cfg)
        for k, v in head_cfg.items():   # the recipe's values reached the head's config
            got = getattr(head.config, k)
            assert (list(got) if isinstance(got, tuple) else got) == v, (path.name, k)


def test_gradnorm_balancing_trains(tmp_path):
    m = run(tmp_path, "gn", "shared-bottom", ["head_args.balance=gradnorm", "head_args.bottom_dims=[32]",
                                              "head_args.tower_dims=[16]", "train.epochs=3"])
    w = load_file(str(tmp_path / "gn" / "best.safetensors"))["balancer.w"]
    assert w.sum().item() == pytest.approx(2.0, rel=1e-4) and not torch.allclose(w, torch.ones(2))
    assert m["metrics"]["click/AUC"] > 0.55


def test_rms_input_norm_keeps_a_small_head_learning(tmp_path):
    """A trained LightGCN's products are ~3e-3: raw, this shared-bottom fits only the base rate
    (click AUC 0.41 with head_args.input_norm=none on this seed); rescaled, it learns."""
    sets = ["train.eval_every=1", "train.patience=5", "head_args.bottom_dims=[32]", "head_args.tower_dims=[16]"]
    m = run(tmp_path, "sb", "shared-bottom", sets)["metrics"]
    assert m["click/AUC"] > 0.62 and m["convert/AUC"] > 0.62


@pytest.mark.shared
def test_ml100k_tasks_and_age_scenarios():
    from conftest import shared_data_dir
    data = apply_split(load_dataset(shared_data_dir("ml100k-mm")), None, seed=0)
    table = derive_tasks(data, {"scenario": "age"})
    assert table.rule == "rated" and table.tasks == ["watch", "like"]
    watch, like = table.labels[:, 0], table.labels[:, 1]
    assert int(watch.sum()) == 100_000 and len(table) == 200_000          # every rating once, 1:1 negatives
    assert 0.5 < like.sum() / watch.sum() < 0.6                           # ratings >= 4: 55 % of MovieLens-100K
    assert (like <= watch).all()
    assert table.scenarios == ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
    for part, rows in (("valid", data.valid), ("test", data.test)):
        assert int(watch[table.rows(part)].sum()) == len(rows)


def test_recommend_loads_a_head_run_and_ranks_by_its_backbone(two_step):
    import torch

    from mmrec import Recommender

    run_dir, _ = two_step
    rec = Recommender.load(run_dir)
    users = list(rec.data.user_ids[:3])
    out = rec.recommend(users, k=5)
    assert sorted(set(out.frame["user"])) == sorted(users) and len(out.frame) == 15
    # the ranking is the backbone's: its top-5 unseen items for the first user
    model = rec.model
    model.eval()
    with torch.no_grad():
        model.prepare_eval()
        scores = model.backbone.score_all(torch.tensor([0]))[0]
    seen = rec.data.matrix()[0].indices
    if rec.data.valid is not None:
        seen = np.union1d(seen, rec.data.matrix(split="valid")[0].indices)
    scores[torch.from_numpy(seen.astype(np.int64))] = float("-inf")
    want = [rec.data.item_ids[i] for i in torch.topk(scores, 5).indices.tolist()]
    assert out.items(rec.data.user_ids[0]) == want


def test_one_propagation_per_step_is_shared_by_head_and_backbone():
    """GraphRecommender._fresh: within one trainer step (after on_batch) the head's features and the
    backbone's own loss share one propagation, with the same gradients as two separate ones."""
    from mmrec.heads.model import backbone_representations
    from mmrec.models.base import create_model
    data = apply_split(load_dataset("synthetic:tiny"), None)
    torch.manual_seed(0)
    model = create_model("lightgcn", data, {"dim": 8, "layers": 2})
    calls = {"n": 0}
    real = model.compute_representations

    def counting():
        calls["n"] += 1
        return real()
    model.compute_representations = counting
    batch = {"user": torch.tensor([0, 1]), "pos": torch.tensor([2, 3]), "neg": torch.tensor([4, 5])}

    def step() -> dict[str, torch.Tensor]:
        model.zero_grad()
        u, i = backbone_representations(model, fresh=True)        # what HeadModel.features uses
        loss = (u[:3] * i[:3]).sum() + model.loss(batch)           # + the backbone's own BPR loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    separate = step()                   # no on_batch (a plain loop): every call propagates
    assert calls["n"] == 2
    model.on_batch(batch)
    shared = step()                     # one trainer step: one propagation
    assert calls["n"] == 3
    assert all(torch.allclose(separate[n], shared[n], atol=1e-6) for n in separate)
    model.on_batch(batch)               # the next step propagates again (new weights)
    step()
    assert calls["n"] == 4
    model.eval()                        # evaluation never reuses a training step's tensors
    model.prepare_eval()
    assert model._step_memo is None
