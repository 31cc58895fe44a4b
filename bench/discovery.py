"""How well trained runs rank items *new to the user*: the discovery pairs, history masked.

The evaluator's ``discovery/<metric>`` scores discovery pairs on the model's whole ranked
list, so a model that (rightly, for the whole test set) fills its top list with the user's
viewed and carted items scores near 0 there whatever its ranking of new items. This script
asks the other question, the one a benchmark of new purchases asks: rank only items the
user never had in training under any behavior (those are masked, as training buys are),
and score the test pairs whose item is new to the user.

    OMP_NUM_THREADS=1 python bench/discovery.py runs/hist/tmall/pop/seed0 runs/hist/tmall/history/seed0 ...

Prints one markdown row per run (model, seed, Recall/NDCG @10/20 and the ratio of
Recall@10 to popularity's, when a ``pop`` run is among the arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mmrec.eval.protocols import evaluate_full, history_parts
from mmrec.train.checkpoint import load_weights
from mmrec.train.run import build_model, load_run_config, prepare_data


class HistoryMasked:
    """A scorer whose scores of the user's training-history items (any behavior) are -inf."""

    def __init__(self, model: torch.nn.Module, history) -> None:
        self.model, self.history = model, history.tocsr()

    def prepare_eval(self) -> None:
        self.model.prepare_eval()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def eval(self) -> None:
        self.model.eval()

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        scores = self.model.score_all(users).clone()
        sub = self.history[users.cpu().numpy()]
        rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
        scores[torch.from_numpy(rows), torch.from_numpy(sub.indices.astype(np.int64))] = float("-inf")
        return scores


def discovery_metrics(run: Path, ks: tuple[int, ...] = (10, 20)) -> tuple[str, int, dict[str, float], int]:
    cfg = load_run_config(run)
    data = prepare_data(cfg)
    model = build_model(cfg, data, torch.device("cpu"), train_backbone=False)  # seeded as in training
    model.fit(data)
    load_weights(model, run)
    model.eval()
    test = data.test
    target = test.behavior == data.target_index
    keys = test.user.astype(np.int64) * data.n_items + test.item
    new = history_parts(data, keys)["discovery"] & target
    only_new = data.replace(test=test.select(np.flatnonzero(new)))
    with torch.no_grad():
        r = evaluate_full(HistoryMasked(model, data.merged_matrix()), only_new, "test", ks=ks,
                          batch_size=cfg.train.eval_batch_size)
    return cfg.model, cfg.seed, dict(r), int(new.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [discovery_metrics(run) for run in args.runs]
    pop = [r[2]["Recall@10"] for r in rows if r[0] == "pop"]
    print("| run | model | seed | pairs | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 | Recall@10 / pop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, (model, seed, m, n) in zip(args.runs, rows):
        ratio = f"{m['Recall@10'] / np.mean(pop):.2f}" if pop else "–"
        print(f"| {run} | {model} | {seed} | {n} | {m['Recall@10']:.4f} | {m['NDCG@10']:.4f} | "
              f"{m['Recall@20']:.4f} | {m['NDCG@20']:.4f} | {ratio} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
