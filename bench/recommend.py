"""Serving speed: top-K for every user with ``mmrec.Recommender`` against a plain ``U @ I.T`` loop.

Ranks every item for every user of a dataset (default: Tmall, 15,449 users x 11,953
items) and keeps the top-``k`` unseen items, four ways over the *same* user batches,
alternating for ``--rounds`` rounds in one process (best time of each is kept):

- ``plain``: ``scores = U[b] @ I.T``, seen items set to ``-inf`` from a prebuilt CSR
  matrix, ``torch.topk`` — the baseline, with the tables and the mask already in hand;
- ``top_k``: :meth:`mmrec.Recommender.top_k` per batch (the model's ``score_all``, the mask,
  ``topk``: tensors out);
- ``iter_recommend``: the streaming API (one pandas frame of original ids per batch);
- ``recommend``: the whole call (frames concatenated into one table).

Target: ``iter_recommend`` >= 0.8x the users/s of ``plain``. The top-K of every arm is
checked equal to ``plain``'s. Then faiss retrieval (no masking, as faiss serves it):
recall@k of an exact ``IndexFlatIP`` and of approximate indexes (HNSW, IVF) against the
exact top-``k`` by inner product, with build time and users/s.

A run is needed: ``--run RUN`` (an inner-product model: bprmf, lightgcn, ...), or the
script trains ``--model`` (default lightgcn) on ``--data`` for ``--epochs`` (default 5)
in a temporary directory — ranking speed does not depend on how well the model is trained.

    python bench/recommend.py [--data ../shared/data/tmall] [--run RUN] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from _common import machine

ARMS = ("plain", "top_k", "iter_recommend", "recommend")
TARGET = 0.8
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tmall")


def train_small(data: str, model: str, epochs: int, dim: int, out: Path, seed: int) -> Path:
    """A short full-ranking run (the ranking cost depends on the sizes, not on the training)."""
    from mmrec.train.config import RunConfig, TrainSection
    from mmrec.train.run import train

    cfg = RunConfig(model=model, data=data, out=str(out), protocol="full", seed=seed, device="cpu",
                    model_args={"dim": dim},
                    train=TrainSection(epochs=epochs, batch_size=8192, lr=0.01, progress=False, ks=[20]))
    train(cfg)
    return out


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall s, CPU s, result) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - t0, time.process_time() - c0, result


def plain_topk(users_t: torch.Tensor, items_t: torch.Tensor, seen, batches: list[np.ndarray],
               k: int) -> list[torch.Tensor]:
    """The baseline: one GEMM, the mask from a prebuilt CSR, ``topk``, per batch."""
    out = []
    with torch.no_grad():
        for users in batches:
            scores = users_t[torch.from_numpy(users)] @ items_t.T
            sub = seen[users]
            rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
            scores[torch.from_numpy(rows), torch.from_numpy(sub.indices.astype(np.int64))] = float("-inf")
            out.append(torch.topk(scores, k, dim=1).indices)
    return out


def bench_ranking(rec, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    from mmrec.export import embedding_tables

    users_t, items_t = embedding_tables(rec.model)  # checks that U @ I.T reproduces score_all
    seen = rec.seen_matrix()
    n = rec.data.n_users
    index = np.arange(n, dtype=np.int64)
    batches = [index[s:s + args.batch_size] for s in range(0, n, args.batch_size)]
    k = args.k

    def top_k():
        return [rec.top_k(b, k)[0] for b in batches]

    def iter_rec():
        return sum(len(f) for f in rec.iter_recommend(None, k, batch_size=args.batch_size))

    def recommend():
        return len(rec.recommend(None, k, batch_size=args.batch_size).frame)

    arms = {"plain": lambda: plain_topk(users_t, items_t, seen, batches, k), "top_k": top_k,
            "iter_recommend": iter_rec, "recommend": recommend}
    rec._prepare()
    # same lists: plain vs top_k (indices), plain vs recommend (original ids, seen dropped)
    base = torch.cat(plain_topk(users_t, items_t, seen, batches, k))
    mine = torch.cat(top_k())
    if not torch.equal(base, mine):
        raise SystemExit(f"top_k differs from the plain loop for {(base != mine).any(1).sum()} users")
    frame = rec.recommend(None, k).frame
    kept = frame.groupby("user", sort=False)["item"].apply(list)
    for u in np.random.default_rng(0).choice(n, min(n, 500), replace=False):
        masked = set(seen[u].indices.tolist())
        row = [str(rec.data.item_ids[i]) for i in base[u].tolist() if i not in masked]
        if kept.get(str(rec.data.user_ids[u]), []) != row:
            raise SystemExit(f"recommend's list for user {rec.data.user_ids[u]} differs from the plain loop")
    best: dict[str, tuple[float, float]] = {}
    for r in range(args.rounds):
        order = ARMS if r % 2 == 0 else ARMS[::-1]
        for arm in order:
            wall, cpu, _ = timed(arms[arm])
            prev = best.get(arm)
            best[arm] = (min(wall, prev[0]), min(cpu, prev[1])) if prev else (wall, cpu)
    return best


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over users of |found ∩ exact| / k (faiss pads missing results with -1)."""
    hits = sum(len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, exact))
    return hits / exact.size


def bench_faiss(rec, args: argparse.Namespace) -> list[tuple[str, float, float, float]]:
    """(index, build s, users/s, recall@k vs the exact inner-product top-k), unmasked."""
    import faiss

    from mmrec.export import embedding_tables

    faiss.omp_set_num_threads(args.threads)
    users_t, items_t = embedding_tables(rec.model)
    xq = np.ascontiguousarray(users_t.numpy(), dtype=np.float32)
    xb = np.ascontiguousarray(items_t.numpy(), dtype=np.float32)
    n_items, d = xb.shape
    k = args.k
    with torch.no_grad():
        exact = torch.cat([torch.topk(users_t[s:s + 1024] @ items_t.T, k, dim=1).indices
                           for s in range(0, len(users_t), 1024)]).numpy()

    def flat():
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        return index

    def hnsw(m: int = 32):
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(xb)
        return index

    def ivf(nlist: int):
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(xb)
        index.add(xb)
        return index

    nlist = max(1, int(np.sqrt(n_items)))  # ~sqrt(n) lists: faiss' rule of thumb, >= 39 points per list
    rows = []
    specs = [("IndexFlatIP (exact)", flat, [None]),
             ("IndexHNSWFlat M=32, efSearch={}", hnsw, [32, 64, 128, 256]),
             (f"IndexIVFFlat nlist={nlist}, nprobe={{}}", lambda: ivf(nlist), [1, 4, 16])]
    for label, build, params in specs:
        build_s, _, index = timed(build)
        for p in params:
            if p is not None:
                if isinstance(index, faiss.IndexHNSWFlat):
                    index.hnsw.efSearch = p
                else:
                    index.nprobe = p
            wall, _, (_, found) = timed(lambda: index.search(xq, k))
            rows.append((label.format(p), build_s, len(xq) / wall, recall(found, exact)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="dataset (default: ../shared/data/tmall)")
    ap.add_argument("--run", type=Path, help="a finished run of an inner-product model (default: train one)")
    ap.add_argument("--model", default="lightgcn", help="model trained when no --run is given")
    ap.add_argument("--epochs", type=int, default=5,
                    help="training epochs when no --run is given (ANN recall depends on the embeddings)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024, help="users ranked at once (every arm)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (best is kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-faiss", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mmrec.recommend import Recommender

    print(f"machine: {machine()}; torch threads {args.threads}; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="mmrec-bench-recommend-") as tmp:
        run = args.run
        if run is None:
            t0 = time.perf_counter()
            run = train_small(args.data, args.model, args.epochs, args.dim, Path(tmp) / args.model, seed=0)
            print(f"trained {args.model} (dim {args.dim}, {args.epochs} epoch) on {args.data} in "
                  f"{time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        rec = Recommender.load(run, device="cpu", batch_size=args.batch_size)
        n_users, n_items = rec.data.n_users, rec.data.n_items
        print(f"loaded {run} in {time.perf_counter() - t0:.1f}s: {n_users:,} users x {n_items:,} items, "
              f"{rec.seen_matrix().nnz:,} seen pairs masked; top-{args.k}, batches of {args.batch_size}")
        from mmrec.export import NotExportable
        try:
            best = bench_ranking(rec, args)
        except NotExportable as e:  # the baseline needs U and I
            raise SystemExit(f"{run}: the plain U @ I.T baseline needs an inner-product model ({e})") from e
    print(f"\n{'arm':<22}{'wall s':>9}{'CPU s':>9}{'users/s':>11}{'x plain (wall)':>16}{'x plain (CPU)':>15}")
    for arm in ARMS:
        wall, cpu = best[arm]
        print(f"{arm:<22}{wall:>9.3f}{cpu:>9.3f}{n_users / wall:>11,.0f}{best['plain'][0] / wall:>16.2f}"
              f"{best['plain'][1] / cpu:>15.2f}")
    ratio = best["plain"][0] / best["iter_recommend"][0]
    print(f"iter_recommend / plain users/s = {ratio:.2f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'}); "
          f"load average {os.getloadavg()[0]:.2f}")
    if not args.no_faiss:
        print(f"\nfaiss, {args.threads} thread(s), all {n_users:,} users, recall@{args.k} vs the exact "
              f"inner-product top-{args.k} (no masking)")
        print(f"{'index':<40}{'build s':>9}{'users/s':>11}{'recall@' + str(args.k):>11}")
        for label, build_s, qps, rec_k in bench_faiss(rec, args):
            print(f"{label:<40}{build_s:>9.2f}{qps:>11,.0f}{rec_k:>11.4f}")


if __name__ == "__main__":
    main()
