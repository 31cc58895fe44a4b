"""Benchmark: the multi-behavior graph models (CIGF, MB-GMN): sparse vs dense, scale, evaluation.

Every measurement runs in its own fresh subprocess (peak memory = that variant's
alone: ``VmHWM``, the peak resident set of the process image, with
``ru_maxrss`` as fallback) and prints ratios against a baseline measured in the same
run. Wall and CPU seconds are both reported: on a shared machine, wall time includes
waiting for cores that other jobs hold.

1. **Training, sparse vs dense.** CIGF and MB-GMN at their recipe settings
   (``configs/<model>.yaml``: 256 users per step, 40 triples per user and behavior,
   10 000 users per epoch) on ``--data`` (default Tmall). ``sparse`` is mmrec: torch
   sparse CSR propagation with a stored transpose. ``dense`` is the same model whose
   normalised (U+I)² adjacencies are dense torch tensors, propagated with ``dense @ x``
   (what the TensorFlow originals' dense ops amount to). Both run the same
   ``--steps`` batches (same seed) after one untimed warm-up step; the epoch time is
   measured for ``sparse`` (one whole epoch) and projected for ``dense``
   (mean step × steps per epoch). When the dense matrices would exceed
   ``--dense-max-gib`` or the memory available, both variants run on a user subsample
   (said in the output).
   MB-GMN also runs ``reference``: the meta prediction network as the reference code
   computes it (a generated [3D, D] matrix per pair, ``mbgmn.reference_predict``),
   i.e. the implementation before the factorised ``_GeneratedLayer``: before/after.
2. **Scale.** A synthetic power-law graph (default 1M users, 200k items, 3 behaviors,
   20M edges, numpy) trains one epoch of CIGF (and MB-GMN) as the references define an
   epoch (``users_per_epoch`` = 10 000 users, 40 steps), and reports steps/s, the
   projected time of a pass over every user, and peak memory.
3. **MB-GMN fast vs previous implementation** (``--only fast``). One process, one model:
   every training step runs the loss and backward with ``model.config.fast = False``
   (the previous implementation) and ``True`` on the same batch and weights, in
   alternating order, then one optimiser step; ``score_all`` of the same users is timed
   with both, alternating, ``--repeat`` rounds. Medians, their ratio, and the largest
   difference between the two paths' losses, gradients and scores (the same mathematics).
4. **Full-ranking evaluation.** ``evaluate_full`` of CIGF on ``--data`` (users/s) next
   to a plain ``scores = U @ I.T`` + mask + ``topk`` loop over the same user batches,
   and next to MESI's previous ``score_all`` (softmax over a [B, I, K] tensor).
   MB-GMN: the sampled protocol (its papers') with the fast and the reference
   predictor, and full ranking on a user subset.

    python bench/multibehavior.py                 # everything (tens of minutes on 2 cores)
    python bench/multibehavior.py --quick         # smoke test, < 2 minutes
    python bench/multibehavior.py --only train eval --steps 5 --json out.json
    python bench/multibehavior.py --only fast --threads 1 --steps 6 --full-users 32 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import available_ram, current_rss, machine, peak_rss

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
SECTIONS = ("train", "scale", "eval", "fast")


# --------------------------------------------------------------------------- data

def powerlaw_interactions(n_users: int, n_items: int, n_edges: int, seed: int = 0,
                          user_exponent: float = 0.6, item_exponent: float = 0.8,
                          behavior_share: tuple[float, ...] = (0.75, 0.17, 0.08)):
    """(user, item, behavior) int arrays of ``n_edges`` rows with power-law-ish degrees.

    Users and items get Zipf weights (rank^-exponent, ranks shuffled); each row draws a
    user and an item from them by inverse CDF (vectorised), and a behavior with
    ``behavior_share`` (view, cart, buy). Duplicate rows are kept here; the binary
    matrices the models use count each (user, item, behavior) once.
    """
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(n: int, exponent: float):
        w = rng.permutation(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
        cdf = np.cumsum(w)
        cdf /= cdf[-1]
        out = np.empty(n_edges, dtype=np.int64)
        for s in range(0, n_edges, 1 << 22):  # in blocks: bounded temporaries
            e = min(n_edges, s + (1 << 22))
            out[s:e] = np.minimum(np.searchsorted(cdf, rng.random(e - s)), n - 1)
        return out

    users, items = draw(n_users, user_exponent), draw(n_items, item_exponent)
    share = np.cumsum(behavior_share) / np.sum(behavior_share)
    behavior = np.searchsorted(share, rng.random(n_edges)).astype(np.int64)
    return users, items, behavior


def write_powerlaw(directory: Path, n_users: int, n_items: int, n_edges: int, seed: int = 0) -> Path:
    """Generate in a subprocess so that the parent never holds (nor peaks with) the data."""
    directory.mkdir(parents=True, exist_ok=True)
    code = (f"import sys, json, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from multibehavior import powerlaw_interactions as f; "
            f"u, i, b = f({n_users}, {n_items}, {n_edges}, seed={seed}); "
            f"[np.save({str(directory)!r} + '/' + n + '.npy', a) for n, a in (('user', u), ('item', i), ('behavior', b))]; "
            f"json.dump(dict(n_users={n_users}, n_items={n_items}, n_edges={n_edges}, seed={seed}), "
            f"open({str(directory / 'meta.json')!r}, 'w'))")
    subprocess.run([sys.executable, "-c", code], check=True)
    return directory


def load_data(spec: str, subsample_users: int = 0, seed: int = 0):
    """A Dataset from a directory, ``powerlaw:DIR`` (see :func:`write_powerlaw`), optionally a user subsample."""
    import numpy as np

    from mmrec.datasets.schema import Dataset, Interactions

    if spec.startswith("powerlaw:"):
        d = Path(spec.split(":", 1)[1])
        meta = json.loads((d / "meta.json").read_text())
        rows = Interactions(np.load(d / "user.npy"), np.load(d / "item.npy"), np.load(d / "behavior.npy"))
        data = Dataset(f"powerlaw-{meta['n_users']}x{meta['n_items']}-{meta['n_edges']}",
                       ["view", "cart", "buy"], "buy",
                       np.char.add("u", np.arange(meta["n_users"]).astype(str)),
                       np.char.add("i", np.arange(meta["n_items"]).astype(str)), rows)
    else:
        from mmrec.datasets.loading import load_dataset
        data = load_dataset(spec)
    if subsample_users and subsample_users < data.n_users:
        data = _subsample(data, subsample_users, seed)
    return data


def _subsample(data, n_users: int, seed: int):
    """The first ``n_users`` of a seeded permutation with all their rows; items re-indexed to those left."""
    import numpy as np

    from mmrec.datasets.schema import Dataset

    keep = np.sort(np.random.default_rng(seed).permutation(data.n_users)[:n_users])
    user_map = np.full(data.n_users, -1)
    user_map[keep] = np.arange(len(keep))

    def rows_of(rows):
        return None if rows is None else rows.select(np.nonzero(user_map[rows.user] >= 0)[0])

    train, test = rows_of(data.train), rows_of(data.test)
    items = np.unique(train.item)
    item_map = np.full(data.n_items, -1)
    item_map[items] = np.arange(len(items))
    train.user, train.item = user_map[train.user], item_map[train.item]
    if test is not None:
        test = test.select(np.nonzero(item_map[test.item] >= 0)[0])
        test.user, test.item = user_map[test.user], item_map[test.item]
    return Dataset(f"{data.name}-sub{n_users}", data.behaviors, data.target, data.user_ids[keep],
                   data.item_ids[items], train, test=test)


# --------------------------------------------------------------------------- model variants

def dense_graphs(graphs):
    """The same normalised adjacencies as dense [N, N] tensors; ``propagate(k, x) = dense_k @ x``."""
    import torch

    class DenseGraphs(torch.nn.Module):
        def __init__(self, sparse) -> None:
            super().__init__()
            self.n = len(sparse)
            for k in range(self.n):
                self.register_buffer(f"dense_{k}", sparse.adj_t(k).to_dense(), persistent=False)

        def __len__(self) -> int:
            return self.n

        def adj_t(self, k: int):
            return getattr(self, f"dense_{k}")

        def propagate(self, k: int, x):
            return self.adj_t(k) @ x  # autograd: adj_tᵀ @ grad, a transposed view (no copy)

    return DenseGraphs(graphs)


def mbgmn_reference_loss(model, batch):
    """MB-GMN's loss with the reference meta prediction network (the pre-factorisation code)."""
    import torch
    import torch.nn.functional as F

    from mmrec.graph.mbgmn import reference_predict

    (reps,) = model._fresh()
    u, i, j, b = batch["user"], batch["pos"], batch["neg"], batch["behavior"]
    n = model.n_users

    def predict(src, tgt, users, items):
        return model.config.mult * reference_predict(model.predictor, reps[src, users], reps[src, items + n],
                                                     reps[tgt, users], reps[tgt, items + n])

    n_src = model.n_behaviors + 1
    src = torch.arange(n_src).repeat_interleave(len(u))
    rows = lambda x: x.repeat(n_src)  # noqa: E731
    hinge = F.relu(model.config.margin - (predict(src, rows(b), rows(u), rows(i)) - predict(src, rows(b), rows(u), rows(j))))
    counts = torch.bincount(b, minlength=model.n_behaviors).clamp(min=1).to(hinge.dtype)
    return (hinge * rows(model.target_weights[b] / counts[b])).sum() + model.config.reg * model.regularizer()


def mbgmn_reference_scores(model):
    """``_target_scores`` with the reference predictor, chunked like the model's own."""
    import torch

    from mmrec.graph.mbgmn import reference_predict

    def target_scores(users, items):
        (reps,) = model.representations()
        n, k, t, c = model.n_users, model.n_behaviors, model.target, model.config.score_chunk
        out = [model.config.mult * reference_predict(model.predictor, reps[k, users[s:s + c]],
                                                     reps[k, items[s:s + c] + n], reps[t, users[s:s + c]],
                                                     reps[t, items[s:s + c] + n])
               for s in range(0, len(users), c)]
        return torch.cat(out) if out else reps.new_zeros(0)

    return target_scores


def mesi_reference_score_all(head):
    """MESI.score_all as it was before: softmax over the last dim of a [B, I, K] tensor, whole batch at once."""
    def score_all(task, u, items):
        g = head.gates[0 if len(head.gates) == 1 else task]
        d = u.size(-1)
        logits = ((u[task] @ g.weight[:, :d].T).unsqueeze(1) + (items[task] @ g.weight[:, d:].T).unsqueeze(0)
                  + g.bias)
        experts = u @ items.transpose(1, 2)
        return head.mult * (logits.softmax(-1) * experts.permute(1, 2, 0)).sum(-1)

    return score_all


# --------------------------------------------------------------------------- worker side

def _recipe(name: str, overrides: dict) -> dict:
    from mmrec.config import load_yaml

    section = dict(load_yaml(ROOT / "configs" / f"{name}.yaml")["model"])
    section.pop("name", None)
    section.update(overrides)
    return section


def _clock():
    return time.perf_counter(), time.process_time()


def worker_train(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from mmrec.models.base import create_model

    torch.set_num_threads(a.threads)
    t0 = _clock()
    data = load_data(a.data, a.subsample, a.seed)
    t_data = time.perf_counter() - t0[0]
    data_rss = current_rss()  # the data alone: "over data" below is what the model and its variant add
    torch.manual_seed(a.seed)
    overrides = {"users_per_epoch": a.users_per_epoch} if a.users_per_epoch >= 0 else {}
    model = create_model(a.model, data, _recipe(a.model, overrides))
    n_active = int(sum(data.matrix(b).getnnz(axis=1) > 0 for b in range(data.n_behaviors)).astype(bool).sum())
    if a.graph == "dense":
        model.graphs = dense_graphs(model.graphs)
    loss_fn = (lambda batch: mbgmn_reference_loss(model, batch)) if a.variant == "reference" else model.loss
    t_setup = time.perf_counter() - t0[0]
    base = current_rss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(a.seed)
    batches = model.training_batches(data, a.batch_size, rng)
    walls, cpus, rows, samp = [], [], [], []
    model.train()
    load0 = os.getloadavg()[0]
    e0 = _clock()
    for step in range(a.steps + 1 if a.steps else 10**9):  # +1: the first (warm-up) step is not timed
        s0 = _clock()
        batch = next(batches, None)
        if batch is None:
            break
        s1 = _clock()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        s2 = _clock()
        if step == 0 and a.steps:
            e0 = _clock()  # fixed-step mode: the clock starts after the warm-up step
            continue
        walls.append(s2[0] - s1[0])
        cpus.append(s2[1] - s1[1])
        samp.append(s1[0] - s0[0])
        rows.append(int(len(batch["user"])))
        if not np.isfinite(float(loss)):
            raise SystemExit(f"loss became {float(loss)}")
        if a.progress and len(walls) % a.progress == 0:
            print(f"    [{a.model}/{a.graph}/{a.variant}] step {len(walls)}: {walls[-1]:.2f} s wall "
                  f"{cpus[-1]:.2f} s cpu, {rows[-1]} rows", file=sys.stderr, flush=True)
    e1 = _clock()
    return {"model": a.model, "graph": a.graph, "variant": a.variant, "data": data.name,
            "users": data.n_users, "items": data.n_items,
            "edges": [int(data.matrix(b).nnz) for b in range(data.n_behaviors)],
            "data_seconds": t_data, "setup_seconds": t_setup, "steps": len(walls), "epoch": not a.steps,
            "loop_seconds": e1[0] - e0[0], "loop_cpu_seconds": e1[1] - e0[1],
            "step_seconds": walls, "step_cpu_seconds": cpus, "sample_seconds": samp, "rows": rows,
            "steps_per_epoch": -(-min(model.config.users_per_epoch or n_active, n_active) // a.batch_size),
            "users_per_epoch": model.config.users_per_epoch, "threads": a.threads,
            "data_rss": data_rss, "base_rss": base, "peak_rss": peak_rss(), "load": [load0, os.getloadavg()[0]]}


def _mask_csr(data, split: str):
    import numpy as np
    import scipy.sparse as sp

    m = data.matrix(data.target_index, "train")
    if split == "test" and data.valid is not None:
        m = m + data.matrix(data.target_index, "valid")
    gt = data.matrix(data.target_index, split)
    m = (m - m.multiply(gt)).astype(bool)  # a ground-truth pair is never masked
    return sp.csr_matrix(m, dtype=np.bool_)


def plain_full_ranking(user_emb, item_emb, mask, users, batch_size: int = 1024, k: int = 50) -> int:
    """``scores = U @ I.T``, training positives to -inf, ``topk``: the floor of any full ranking."""
    import numpy as np
    import torch

    n = 0
    for s in range(0, len(users), batch_size):
        bu = users[s:s + batch_size]
        scores = user_emb[torch.from_numpy(bu)] @ item_emb.T
        sub = mask[bu]
        rows = np.repeat(np.arange(len(bu)), np.diff(sub.indptr))
        scores[torch.from_numpy(rows), torch.from_numpy(sub.indices.astype(np.int64))] = float("-inf")
        torch.topk(scores, min(k, scores.size(1)), dim=1)
        n += len(bu)
    return n


def worker_eval(a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from mmrec.eval.protocols import evaluate_full, evaluate_sampled
    from mmrec.models.base import create_model

    torch.set_num_threads(a.threads)
    data = load_data(a.data, a.subsample, a.seed)
    torch.manual_seed(a.seed)
    model = create_model(a.model, data, _recipe(a.model, {}))
    model.eval()
    out: dict = {"model": a.model, "data": data.name, "users": data.n_users, "items": data.n_items,
                 "threads": a.threads, "load": [os.getloadavg()[0]]}
    best: dict[str, list[float]] = {}

    def timed(name: str, fn):
        c = _clock()
        r = fn()
        w, cp = time.perf_counter() - c[0], time.process_time() - c[1]
        old = best.get(name, [float("inf"), float("inf")])
        best[name] = [min(old[0], w), min(old[1], cp)]
        return r

    test_users = np.unique(data.test.user[data.test.behavior == data.target_index])
    out["eval_users"] = int(len(test_users))
    if a.model == "cigf":
        with torch.no_grad():
            model.prepare_eval()
        (reps,) = model.representations()
        u_emb, i_emb = reps[model.target, :model.n_users], reps[model.target, model.n_users:]
        mask = _mask_csr(data, "test")
        fast_score_all = model.head.score_all
        for _ in range(a.repeat):  # alternate the variants so that load from other jobs hits all alike
            timed("plain U@I.T + mask + topk", lambda: plain_full_ranking(u_emb, i_emb, mask, test_users))
            model.head.score_all = fast_score_all
            r = timed("evaluate_full (cigf)", lambda: evaluate_full(model, data, "test"))
            if a.with_reference:
                model.head.score_all = mesi_reference_score_all(model.head)
                timed("evaluate_full (cigf, previous MESI scoring)", lambda: evaluate_full(model, data, "test"))
        out["metrics"] = {k: v for k, v in r.items() if k.endswith("@10")}
    else:
        fast_scores = model._target_scores
        n_full = min(a.full_users, len(test_users))
        full_users = torch.from_numpy(test_users[:n_full])
        for _ in range(a.repeat):
            model._target_scores = fast_scores
            r = timed("evaluate_sampled (mbgmn)", lambda: evaluate_sampled(model, data, "test"))
            with torch.no_grad():
                model.prepare_eval()
                timed(f"score_all {n_full} users (mbgmn)", lambda: model.score_all(full_users))
        if a.with_reference:  # the reference predictor on a subset of the same work (it is slow)
            sub = data.replace(test=data.test.select(np.nonzero(np.isin(data.test.user, test_users[:a.ref_users]))[0]))
            model._target_scores = mbgmn_reference_scores(model)
            timed("evaluate_sampled (mbgmn, reference predictor)", lambda: evaluate_sampled(model, sub, "test"))
            with torch.no_grad():
                model.prepare_eval()
                timed(f"score_all {n_full} users (mbgmn, reference predictor)",
                      lambda: model.score_all(full_users))
            model._target_scores = fast_scores
            timed("evaluate_sampled (mbgmn, same subset)", lambda: evaluate_sampled(model, sub, "test"))
            out["ref_users"] = int(min(a.ref_users, len(test_users)))
        out["full_users"] = n_full
        out["metrics"] = dict(r)
    out["timings"] = best
    out["peak_rss"] = peak_rss()
    out["load"].append(os.getloadavg()[0])
    return out


def worker_fast(a: argparse.Namespace) -> dict:
    """MB-GMN's fast and previous paths interleaved on the same work (see the module docstring)."""
    import numpy as np
    import torch

    from mmrec.models.base import create_model

    torch.set_num_threads(a.threads)
    data = load_data(a.data, a.subsample, a.seed)
    torch.manual_seed(a.seed)
    model = create_model("mbgmn", data, _recipe("mbgmn", {}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = model.training_batches(data, a.batch_size, np.random.default_rng(a.seed))
    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in ("previous", "fast")}
    rows, loss_diff, grad_diff = [], 0.0, 0.0
    load0 = os.getloadavg()[0]
    model.train()
    for step in range(a.steps + 1):  # step 0 warms both paths up and is not timed
        batch = next(batches)
        order = ("previous", "fast") if step % 2 else ("fast", "previous")
        losses, grads = {}, {}
        for variant in order:
            model.config.fast = variant == "fast"
            opt.zero_grad(set_to_none=True)
            c = _clock()
            loss = model.loss(batch)
            loss.backward()
            w, cp = time.perf_counter() - c[0], time.process_time() - c[1]
            if step:
                times[variant]["wall"].append(w)
                times[variant]["cpu"].append(cp)
            losses[variant] = float(loss)
            grads[variant] = [p.grad.clone() for p in model.parameters()]
        loss_diff = max(loss_diff, abs(losses["fast"] - losses["previous"]) / abs(losses["previous"]))
        fast_g, prev_g = (torch.cat([g.flatten() for g in grads[v]]) for v in ("fast", "previous"))
        grad_diff = max(grad_diff, float((fast_g - prev_g).norm() / prev_g.norm()))  # over all parameters
        opt.step()
        rows.append(int(len(batch["user"])))
        if a.progress:
            print(f"    [fast] step {step}: previous {times['previous']['cpu'][-1] if step else 0:.2f} s cpu, "
                  f"fast {times['fast']['cpu'][-1] if step else 0:.2f} s cpu", file=sys.stderr, flush=True)
    model.eval()
    test_users = np.unique(data.test.user[data.test.behavior == data.target_index])
    users = torch.from_numpy(test_users[:a.full_users])
    scoring: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in ("previous", "fast")}
    scores = {}
    with torch.no_grad():
        model.prepare_eval()
        for r in range(a.repeat):
            for variant in (("previous", "fast") if r % 2 else ("fast", "previous")):
                model.config.fast = variant == "fast"
                c = _clock()
                scores[variant] = model.score_all(users)
                scoring[variant]["wall"].append(time.perf_counter() - c[0])
                scoring[variant]["cpu"].append(time.process_time() - c[1])
    score_diff = float((scores["fast"] - scores["previous"]).abs().max() / scores["previous"].abs().max())
    return {"data": data.name, "users": data.n_users, "items": data.n_items, "threads": a.threads,
            "steps": a.steps, "triples": rows[1:], "train": times, "score_users": len(users), "score_all": scoring,
            "max_rel_diff": {"loss": loss_diff, "grad": grad_diff, "score": score_diff},
            "peak_rss": peak_rss(), "load": [load0, os.getloadavg()[0]]}


# --------------------------------------------------------------------------- parent side

def _run(a: argparse.Namespace, kind: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(a.threads), "--seed", str(a.seed),
           "--batch-size", str(a.batch_size), "--progress", str(a.progress)] + extra
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_WAIT_POLICY=a.omp_wait_policy)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr (progress, errors) passes through
    if p.returncode != 0:
        return {"error": f"exit {p.returncode} (its stderr is above)"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mean(x: list[float]) -> float:
    return sum(x) / max(1, len(x))


def _describe_train(r: dict) -> str:
    if "error" in r:
        return f"FAILED {r['error']}"
    step = _mean(r["step_seconds"])
    line = (f"{r['steps']:3d} steps: {step:7.3f} s/step wall, {_mean(r['step_cpu_seconds']):7.3f} cpu"
            f" (+{_mean(r['sample_seconds']):.3f} s sampling)")
    if r["epoch"]:
        line += f" | epoch {r['loop_seconds']:.1f} s wall, {r['loop_cpu_seconds']:.1f} cpu (measured)"
    else:
        line += f" | epoch ~{(step + _mean(r['sample_seconds'])) * r['steps_per_epoch']:.1f} s (projected)"
    return (line + f" | peak {r['peak_rss'] / GIB:.2f} GiB (+{(r['peak_rss'] - r['data_rss']) / GIB:.2f} over data)"
            f" | setup {r['setup_seconds']:.1f} s | load {r['load'][0]:.1f}->{r['load'][1]:.1f}")


def section_train(a: argparse.Namespace, report: dict) -> None:
    n_nodes = a.train_nodes
    dense_bytes = 3 * n_nodes**2 * 4
    avail = available_ram()
    sub = a.subsample
    if not sub and dense_bytes > min(a.dense_max_gib * GIB, avail - 3 * GIB):
        # keep the user share of nodes: a subsample of s users keeps roughly s/U of the items' rows
        budget = min(a.dense_max_gib * GIB, avail - 3 * GIB)
        sub = int(a.train_users * (budget / dense_bytes) ** 0.5)
        print(f"  dense: 3 x (U+I)^2 x 4 B = {dense_bytes / GIB:.1f} GiB > budget {budget / GIB:.1f} GiB "
              f"(--dense-max-gib {a.dense_max_gib}, MemAvailable {avail / GIB:.1f} GiB): "
              f"both variants run on a subsample of {sub} users")
    data_args = ["--data", a.data, "--subsample", str(sub)]
    print(f"  same {a.steps} batches per variant after 1 untimed warm-up step"
          + (f"; sparse also runs one whole epoch ({a.users_per_epoch if a.users_per_epoch >= 0 else 'recipe'} users)"
             if a.epoch else ""), flush=True)
    results = {}
    for model in a.models:
        variants = [("sparse", "fast")] + ([("dense", "fast")] if model in a.dense_models else [])
        if model == "mbgmn" and a.reference:
            variants.append(("sparse", "reference"))
        for graph, variant in variants:
            name = f"{model}/{graph}" + ("/reference-predictor" if variant == "reference" else "")
            r = _run(a, "train", data_args + ["--model", model, "--graph", graph, "--variant", variant,
                                              "--steps", str(a.steps),
                                              "--users-per-epoch", str(a.users_per_epoch)])
            results[name] = r
            print(f"  {name:34s} {_describe_train(r)}", flush=True)
        if a.epoch:
            name = f"{model}/sparse/epoch"
            r = _run(a, "train", data_args + ["--model", model, "--graph", "sparse", "--steps", "0",
                                              "--users-per-epoch", str(a.users_per_epoch)])
            results[name] = r
            print(f"  {name:34s} {_describe_train(r)}", flush=True)
        ok = {k: v for k, v in results.items() if k.startswith(model + "/") and "error" not in v}
        sp_, de = ok.get(f"{model}/sparse"), ok.get(f"{model}/dense")
        if sp_ and de:
            print(f"  ratio  {model} dense / sparse step time: {_mean(de['step_seconds']) / _mean(sp_['step_seconds']):.2f} wall, "
                  f"{_mean(de['step_cpu_seconds']) / _mean(sp_['step_cpu_seconds']):.2f} cpu; "
                  f"peak memory over data {(de['peak_rss'] - de['data_rss']) / max(1, sp_['peak_rss'] - sp_['data_rss']):.1f}x, "
                  f"peak total {de['peak_rss'] / sp_['peak_rss']:.1f}x")
        ref = ok.get(f"{model}/sparse/reference-predictor")
        if sp_ and ref:
            print(f"  ratio  {model} reference predictor / factorised step time: "
                  f"{_mean(ref['step_seconds']) / _mean(sp_['step_seconds']):.2f} wall, "
                  f"{_mean(ref['step_cpu_seconds']) / _mean(sp_['step_cpu_seconds']):.2f} cpu; peak memory "
                  f"{ref['peak_rss'] / sp_['peak_rss']:.2f}x")
    report["train"] = {"subsample_users": sub, "results": results}


def section_scale(a: argparse.Namespace, report: dict, tmp: Path) -> None:
    results = {}
    sizes = {}
    for model in a.scale_models:
        f = a.scale_fraction.get(model, 1.0)
        sizes.setdefault((int(a.scale_users * f), int(a.scale_items * f), int(a.scale_edges * f)), []).append(model)
    for (n_users, n_items, n_edges), models in sizes.items():
        t = time.perf_counter()
        d = write_powerlaw(tmp / f"powerlaw-{n_users}", n_users, n_items, n_edges, a.seed)
        print(f"  generated {n_edges:,} rows ({n_users:,} users, {n_items:,} items, 3 behaviors) "
              f"in {time.perf_counter() - t:.1f} s", flush=True)
        for model in models:
            r = _run(a, "train", ["--data", f"powerlaw:{d}", "--model", model, "--graph", "sparse", "--steps", "0",
                                  "--users-per-epoch", str(a.scale_users_per_epoch)])
            results[f"{model}@{n_users}"] = r
            if "error" in r:
                print(f"  {model:6s} FAILED {r['error']}")
                continue
            step = _mean(r["step_seconds"]) + _mean(r["sample_seconds"])
            full_steps = -(-r["users"] // a.batch_size)
            print(f"  {model:6s} graph edges per behavior {r['edges']} (distinct pairs); setup {r['setup_seconds']:.0f} s "
                  f"(data {r['data_seconds']:.0f} s)", flush=True)
            print(f"  {model:6s} one epoch = {r['steps']} steps x {a.batch_size} users ({r['users_per_epoch']:,} users): "
                  f"{r['loop_seconds']:.0f} s wall, {r['loop_cpu_seconds']:.0f} s cpu, {1 / step:.3f} steps/s; "
                  f"peak {r['peak_rss'] / GIB:.2f} GiB | load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)
            print(f"  {model:6s} a pass over every user ({full_steps:,} steps) would take ~{full_steps * step / 3600:.1f} h "
                  f"(projected from the measured steps)", flush=True)
    report["scale"] = {"users": a.scale_users, "items": a.scale_items, "rows": a.scale_edges,
                       "fractions": a.scale_fraction, "results": results}


def section_eval(a: argparse.Namespace, report: dict) -> None:
    results = {}
    extra = ["--data", a.data, "--subsample", str(a.eval_subsample), "--repeat", str(a.repeat),
             "--full-users", str(a.full_users), "--ref-users", str(a.ref_users)] + (["--with-reference"] if a.reference else [])
    for model in a.models:
        r = _run(a, "eval", extra + ["--model", model])
        results[model] = r
        if "error" in r:
            print(f"  {model} FAILED {r['error']}")
            continue
        n = r["eval_users"]
        for name, (w, c) in r["timings"].items():
            users = n
            if "score_all" in name:
                users = r["full_users"]
            elif "reference" in name or "same subset" in name:
                users = r["ref_users"]
            print(f"  {name:48s} {w:8.2f} s wall {c:8.2f} s cpu  {users / w:10.1f} users/s", flush=True)
        t = r["timings"]
        if model == "cigf":
            base = t["plain U@I.T + mask + topk"]
            ev = t["evaluate_full (cigf)"]
            print(f"  ratio  evaluate_full(cigf) / plain U@I.T loop: {ev[0] / base[0]:.2f} wall, {ev[1] / base[1]:.2f} cpu")
            prev = t.get("evaluate_full (cigf, previous MESI scoring)")
            if prev:
                print(f"  ratio  previous / current evaluate_full(cigf): {prev[0] / ev[0]:.2f} wall, {prev[1] / ev[1]:.2f} cpu")
        else:
            full = t[f"score_all {r['full_users']} users (mbgmn)"]
            print(f"  mbgmn full ranking projected for {n} users: ~{full[0] / r['full_users'] * n / 60:.1f} min wall")
            ref, same = t.get("evaluate_sampled (mbgmn, reference predictor)"), t.get("evaluate_sampled (mbgmn, same subset)")
            if ref and same:
                print(f"  ratio  mbgmn sampled eval, reference / factorised predictor: {ref[0] / same[0]:.2f} wall, "
                      f"{ref[1] / same[1]:.2f} cpu")
            rf = t.get(f"score_all {r['full_users']} users (mbgmn, reference predictor)")
            if rf:
                print(f"  ratio  mbgmn score_all, reference / factorised predictor: {rf[0] / full[0]:.2f} wall, "
                      f"{rf[1] / full[1]:.2f} cpu")
        print(f"  {model} peak {r['peak_rss'] / GIB:.2f} GiB | load {r['load'][0]:.1f}->{r['load'][1]:.1f}", flush=True)
    report["eval"] = results


def section_fast(a: argparse.Namespace, report: dict) -> None:
    import statistics

    r = _run(a, "fast", ["--data", a.data, "--subsample", str(a.subsample), "--steps", str(a.steps),
                         "--full-users", str(a.full_users), "--repeat", str(a.repeat)])
    report["fast"] = r
    if "error" in r:
        print(f"  FAILED {r['error']}")
        return
    med = {part: {v: {c: statistics.median(r[part][v][c]) for c in ("wall", "cpu")} for v in ("previous", "fast")}
           for part in ("train", "score_all")}
    print(f"  {r['data']}: {r['steps']} steps of {statistics.median(r['triples']):.0f} triples (median), "
          f"{r['threads']} thread(s); each step runs both paths on the same batch and weights, alternating", flush=True)
    for v in ("previous", "fast"):
        t = med["train"][v]
        print(f"  train step (loss + backward), {v:8s} median {t['wall']:6.2f} s wall {t['cpu']:6.2f} s cpu")
    t = {c: med["train"]["previous"][c] / med["train"]["fast"][c] for c in ("wall", "cpu")}
    print(f"  ratio  previous / fast step: {t['wall']:.2f} wall, {t['cpu']:.2f} cpu")
    n = r["score_users"]
    for v in ("previous", "fast"):
        t = med["score_all"][v]
        print(f"  score_all {n} users x {r['items']} items, {v:8s} median {t['wall']:6.2f} s wall {t['cpu']:6.2f} s cpu"
              f"  {n / t['wall']:7.1f} users/s wall {n / t['cpu']:7.1f} users/s cpu")
    t = {c: med["score_all"]["previous"][c] / med["score_all"]["fast"][c] for c in ("wall", "cpu")}
    print(f"  ratio  previous / fast score_all: {t['wall']:.2f} wall, {t['cpu']:.2f} cpu")
    d = r["max_rel_diff"]
    print(f"  largest relative difference fast vs previous: loss {d['loss']:.1e}, gradients {d['grad']:.1e} "
          f"(norm over all parameters), "
          f"scores {d['score']:.1e} | peak {r['peak_rss'] / GIB:.2f} GiB | load {r['load'][0]:.1f}->{r['load'][1]:.1f}",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/data/tmall", help="dataset of the train and eval sections")
    p.add_argument("--models", nargs="+", default=["cigf", "mbgmn"], choices=["cigf", "mbgmn"])
    p.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--quick", action="store_true", help="small data and few steps: a smoke test (< 2 minutes)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--omp-wait-policy", default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                   help="OMP_WAIT_POLICY of the workers (default PASSIVE: with libgomp's default spinning, "
                        "2 threads on a loaded 2-core machine ran a CIGF step 10x slower than 1 thread)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=256, help="users per step (the recipes')")
    p.add_argument("--users-per-epoch", type=int, default=-1, help="-1: the recipe's (10000); 0: every user")
    p.add_argument("--no-epoch", dest="epoch", action="store_false", help="skip the whole sparse epoch")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the reference (pre-factorisation) MB-GMN predictor and previous MESI scoring")
    p.add_argument("--dense-models", nargs="+", default=["cigf", "mbgmn"], choices=["cigf", "mbgmn"],
                   help="models that also run the dense-adjacency variant (--quick: cigf only)")
    p.add_argument("--dense-max-gib", type=float, default=12.0,
                   help="largest total size of the 3 dense adjacencies; above it, subsample users")
    p.add_argument("--subsample", type=int, default=0, help="train section: use this many users (0: all)")
    p.add_argument("--scale-users", type=int, default=1_000_000)
    p.add_argument("--scale-items", type=int, default=200_000)
    p.add_argument("--scale-edges", type=int, default=20_000_000)
    p.add_argument("--scale-models", nargs="+", default=["cigf", "mbgmn"], choices=["cigf", "mbgmn"])
    p.add_argument("--scale-users-per-epoch", type=int, default=10_000, help="the references' trnNum")
    p.add_argument("--scale-fraction", nargs="*", default=["mbgmn=0.2"], metavar="MODEL=F",
                   help="run MODEL on F x the scale sizes (default mbgmn=0.2: at 1M users its full-graph "
                        "activations do not fit beside other jobs in 24 GiB; see docs/models/graph.md)")
    p.add_argument("--full-users", type=int, default=128, help="MB-GMN full-ranking users timed")
    p.add_argument("--ref-users", type=int, default=1000, help="MB-GMN sampled-eval users for the reference predictor")
    p.add_argument("--eval-subsample", type=int, default=0)
    p.add_argument("--repeat", type=int, default=2, help="eval: best of this many alternated rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", type=int, default=0, help="workers print every N-th step to stderr (0: off)")
    p.add_argument("--json", type=Path, default=None, help="also write every result here")
    # worker-only
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--graph", default="sparse", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--with-reference", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    a.scale_fraction = {k: float(v) for k, v in (x.split("=") for x in a.scale_fraction)} \
        if isinstance(a.scale_fraction, list) else a.scale_fraction
    if a.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps({"train": worker_train, "eval": worker_eval, "fast": worker_fast}[a.worker](a)))
        return

    if a.quick:  # beibei-mini when present (1k users), else a small power-law graph; few steps
        mini = Path("/work/shared/data/beibei-mini")
        if a.data == p.get_default("data"):
            a.data = str(mini) if mini.exists() else a.data
        a.steps = min(a.steps, 2)
        a.batch_size = min(a.batch_size, 64)
        a.epoch = False
        a.scale_users, a.scale_items, a.scale_edges = 20_000, 5_000, 200_000
        a.scale_users_per_epoch = 512
        a.scale_models = ["cigf"]
        a.scale_fraction = {}
        a.dense_models = ["cigf"]
        a.full_users, a.ref_users, a.repeat = 8, 100, 1
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, {a.threads} threads, "
          f"OMP_WAIT_POLICY={a.omp_wait_policy}; "
          f"load average {os.getloadavg()[0]:.2f}; MemAvailable {available_ram() / GIB:.1f} GiB")
    report: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(a).items()}}
    with tempfile.TemporaryDirectory(prefix="mmrec-mb-bench-") as tmp:
        if "train" in a.only or "eval" in a.only or "fast" in a.only:
            sys.path.insert(0, str(ROOT))
            info = load_data(a.data)
            a.train_users, a.train_nodes = info.n_users, info.n_users + info.n_items
            print(f"data {info.name}: {info.n_users:,} users, {info.n_items:,} items, "
                  f"{[int(info.matrix(b).nnz) for b in range(info.n_behaviors)]} pairs per behavior", flush=True)
            del info
        if "train" in a.only:
            print("\n== training: sparse (mmrec) vs dense adjacency ==", flush=True)
            section_train(a, report)
        if "eval" in a.only:
            print("\n== evaluation throughput ==", flush=True)
            section_eval(a, report)
        if "fast" in a.only:
            print("\n== MB-GMN: fast vs previous implementation, interleaved ==", flush=True)
            section_fast(a, report)
        if "scale" in a.only:
            print(f"\n== scale: power-law graph ==  (load average {os.getloadavg()[0]:.2f})", flush=True)
            section_scale(a, report, Path(tmp))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if a.json:
        from mmrec.io import write_json
        write_json(a.json, report)


if __name__ == "__main__":
    main()
