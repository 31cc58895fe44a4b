"""The untrained references: popularity and the behavior prior."""

import numpy as np
import pytest
import torch

from mmrec.datasets.canonical import read_canonical
from mmrec.errors import ConfigError
from mmrec.models.base import create_model
from mmrec.train.config import RunConfig, TrainSection
from mmrec.train.run import train


def _write(root, rows):
    root.mkdir()
    (root / "interactions.tsv").write_text("user\titem\tbehavior\n" + "".join(f"{u}\t{i}\t{b}\n" for u, i, b in rows))
    return read_canonical(root)


def test_behavior_prior_ranks_carted_then_viewed_then_popular(tmp_path):
    # u0 carted i3 and viewed i2; i1 is the most bought; i0 nothing for u0
    data = _write(tmp_path / "d", [("u0", "i2", "view"), ("u0", "i3", "view"), ("u0", "i3", "cart"),
                                   ("u1", "i1", "buy"), ("u2", "i1", "buy"), ("u2", "i0", "buy"),
                                   ("u0", "i4", "buy")])
    model = create_model("behavior-prior", data)
    model.fit(data)
    u0 = torch.tensor([int(np.flatnonzero(data.user_ids == "u0")[0])])
    idx = {name: int(np.flatnonzero(data.item_ids == name)[0]) for name in ("i0", "i1", "i2", "i3")}
    scores = model.score_all(u0)[0]
    order = sorted(idx, key=lambda n: -float(scores[idx[n]]))
    assert order == ["i3", "i2", "i1", "i0"]  # cart(2)+view(1), view(1), popular, rest
    picked = torch.tensor([[idx["i0"], idx["i3"]]])
    assert torch.allclose(model.score(u0, picked), scores[picked[0]].unsqueeze(0))
    # weights name behaviors; a target-only weighting is popularity plus the user's own buys
    with pytest.raises(ConfigError, match="unknown behavior"):
        create_model("behavior-prior", data, {"weights": {"click": 1.0}})


def test_behavior_prior_beats_popularity_on_the_synthetic_cascade(tmp_path):
    def run(model):
        cfg = RunConfig(model=model, data="synthetic:tiny", out=str(tmp_path / model), protocol="sampled",
                        train=TrainSection(progress=False))
        return train(cfg)["metrics"]["HR@10"]
    assert run("behavior-prior") > run("pop")
