"""How far can item content alone rank cold items? A content -> popularity reference for ``--split cold``.

The ``cold_start`` block of ``metrics.json`` ranks each user's held-out cold items among
all cold items. Which cold items a user picks is, on datasets like MovieLens, mostly
which items are popular, so a cold-start scorer is bounded by how well content predicts
popularity. This script measures that, per seed, on the same split ``mmrec train
--split cold`` makes:

- ``content->pop[<features>]``: a ridge regression (scikit-learn) from the item's
  standardised features to log(1 + training count), fitted on warm items; the cold items
  are ranked by its prediction, the same list for every user. Its strength α is chosen on
  the *validation*-cold items (their validation pairs), never on test.
- ``oracle test popularity``: cold items ranked by their number of test pairs. It reads
  the test labels, so it is not a model; it shows how much of the task popularity is.
- ``random``: min(K, n) / n, a uniform scorer's expectation.

Both rows are scored by the evaluator ``mmrec train`` uses (``evaluate_full(items=cold)``).

    python bench/cold_popularity.py --data ../shared/data/ml100k-mm --seeds 0 1 2 \
        [--features runs/ml100k-attr/attributes.safetensors]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

ALPHAS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def fixed_scores(scores: np.ndarray):
    """The ``pop`` model holding ``scores``: it gives every user the same item scores."""
    from mmrec.graph.baselines import Popularity
    model = Popularity(len(scores))
    model.popularity.copy_(torch.as_tensor(scores, dtype=torch.float32))
    return model


def popularity(data, split: str = "train") -> np.ndarray:
    """Users per item with a target-behavior row in ``split`` (what ``pop`` ranks by)."""
    return np.asarray(data.matrix(split=split).sum(axis=0)).ravel()


def standardised(data, modalities: list[str]) -> np.ndarray:
    """Features of ``modalities`` side by side, each z-scored over its present rows (absent rows: 0)."""
    out = []
    for m in modalities:
        table = data.items.features[m]
        x, present = table.features.double().numpy(), table.mask.numpy()
        mean, std = x[present].mean(0), x[present].std(0) + 1e-8
        out.append(np.where(present[:, None], (x - mean) / std, 0.0))
    return np.concatenate(out, 1)


def cold_recall(data, scores: np.ndarray, split: str, items: np.ndarray, k: int) -> float:
    from mmrec.eval.protocols import evaluate_full
    return float(evaluate_full(fixed_scores(scores), data, split=split, ks=[k], items=items)[f"Recall@{k}"])


def one_seed(path: str, seed: int, k: int, features: list[str]) -> dict[str, float]:
    from sklearn.linear_model import Ridge

    from mmrec.train.config import build_run_config
    from mmrec.train.run import prepare_data

    cfg = build_run_config(None, {"model": "pop", "data": path, "seed": seed, "out": "unused", "split": "cold",
                                   "features": features}, [])
    data = prepare_data(cfg)
    test_cold = np.asarray(data.cold_items, dtype=np.int64)
    valid_cold = np.asarray(data.report["cold_valid_items"], dtype=np.int64)
    counts = popularity(data)
    warm = np.flatnonzero(counts > 0)
    y = np.log1p(counts[warm])
    modalities = sorted(data.items.features)
    feature_sets = [[m] for m in modalities] + ([modalities] if len(modalities) > 1 else [])
    row: dict[str, float] = {"random": min(k, len(test_cold)) / len(test_cold)}
    for feats in feature_sets:
        x = standardised(data, feats)
        preds = {a: Ridge(alpha=a).fit(x[warm], y).predict(x) for a in ALPHAS}
        best = max(ALPHAS, key=lambda a: cold_recall(data, preds[a], "valid", valid_cold, k))
        row[f"content->pop[{'+'.join(feats)}]"] = cold_recall(data, preds[best], "test", test_cold, k)
    row["oracle test popularity"] = cold_recall(data, popularity(data, "test"), "test", test_cold, k)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--features", nargs="+", default=[], help="extra feature-store files (as mmrec train --features)")
    args = ap.parse_args()
    rows = [one_seed(args.data, s, args.k, args.features) for s in args.seeds]
    print(f"cold Recall@{args.k} on {args.data}, --split cold, seeds {args.seeds} (mean ± std; x random)")
    print(f"{'scorer':<36}{'cold Recall':>16}{'x random':>14}")
    for name in rows[0]:
        vals = [r[name] for r in rows]
        ratios = [r[name] / r["random"] for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        sdr = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        print(f"{name:<36}{statistics.mean(vals):>9.4f} ± {sd:.4f}{statistics.mean(ratios):>8.2f} ± {sdr:.2f}")


if __name__ == "__main__":
    main()
