"""Benchmark: training-epoch time and peak memory of MICRO, FREEDOM (and LATTICE), sparse
(mmrec) vs the dense formulation of MMRec / the official codes, same data, same run.

Baselines, written out below with the same math as the sparse models (their initial
weights are copied from the sparse model, and the bench checks the two produce the same
item representations before timing):

- ``dense`` MICRO / LATTICE: the official codes and MMRec's ``lattice.py``: dense N x N
  cosine matrix of the projected features (``build_sim``), ``topk`` scattered into a dense
  N x N matrix (``build_knn_neighbourhood``), normalised densely, mixed with the dense
  frozen graph (λ = 0.9), item propagation ``torch.mm(item_adj, h)``; rebuilt at the first
  step of each epoch, detached for the others. The baseline normalises with broadcasting
  (O(N²)); MMRec's ``compute_normalized_laplacian`` multiplies by ``diagflat`` matrices
  (2 dense N x N x N products), so the baseline is *faster* than MMRec's code and the
  ratios are conservative. User-item propagation: COO ``torch.sparse.mm`` (as the codes).
  InfoNCE: MICRO's ``batched_contrastive_loss`` (4096 anchors against all items per block,
  every block kept for backward).
- ``mmrec-code`` FREEDOM: MMRec's ``freedom.py`` as written: dense N x N similarity to
  build the frozen kNN graph (``get_knn_adj_mat``), ``torch.multinomial`` edge pruning and
  ``torch.sparse.sum`` normalisation per epoch, COO ``torch.sparse.mm`` (torch's autograd).

Data: N items with two modalities (image 512-d, text 384-d) drawn from a mixture of
Gaussians (one cluster per 100 items, lifted from a 32-d latent space, plus noise), and
users who each interact with items of a few preferred clusters (Zipf popularity inside a
cluster). Each (case, arm) runs in a fresh subprocess, so peak memory is its own.

Protocol per arm: build the model (timed: ``setup``), one untimed warm-up epoch start +
2 steps, then a timed epoch start (``epoch_start``: pruning / nothing), the first step
(``first_step``: LATTICE/MICRO learn their item graph here) and ``--steps`` further steps
(``step``, mean). An epoch has ``n_batches`` = ceil(interactions / batch) steps; the epoch
time is *estimated* as ``epoch_start + first_step + (n_batches - 1) * step`` (a full
epoch of the dense arm takes hours on a CPU; measured steps are a subset).

On a shared CPU machine use ``--threads 1``: with 2 OpenMP threads on 2 busy cores every
parallel op waits at a barrier for a descheduled thread (and spins meanwhile), which
inflates both wall and CPU time of steps made of many small ops (FREEDOM, same code: 1.45 s CPU
per step with 2 threads at load 10, 0.18 s with 1) and hides the difference between the arms.

    python bench/train_epoch.py --items 20000 --device cpu --steps 3 --threads 1
    python bench/train_epoch.py --items 20000 --device cuda --steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30
#: Peak of the dense arm in N x N float32 matrices (frozen + learned graphs, autograd's saved
#: tensors, MICRO's per-block InfoNCE tensors), as measured at 5k and 10k items on CPU:
#: used to skip arms that would not fit (``--dense-max-gib``).
DENSE_N2_MATRICES = {"micro": 18, "micro-batchcl": 13, "lattice": 13, "freedom": 2}
CASES = {
    # name: (model, model overrides, batch size of the official code)
    "micro": ("micro", {}, 1024),                          # official: InfoNCE over all items
    "micro-batchcl": ("micro", {"cl_items": "batch"}, 1024),  # InfoNCE over the batch's items
    "lattice": ("lattice", {}, 1024),
    "freedom": ("freedom", {}, 2048),
}


# ----------------------------------------------------------------------------- data

def make_data(n_items: int, n_users: int, per_user: int, seed: int = 0, dims=(("image", 512), ("text", 384))):
    """A dataset with clustered features and cluster-driven interactions (deterministic)."""
    import torch

    from mmrec.datasets.schema import Dataset, FeatureTable, Interactions, ItemContent

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_clusters = max(8, n_items // 100)
    cluster = torch.randint(n_clusters, (n_items,), generator=g)
    centres = torch.randn(n_clusters, 32, generator=g)
    z = centres[cluster] + torch.randn(n_items, 32, generator=g)
    features = {}
    for name, d in dims:
        lift = torch.randn(32, d, generator=g) / 32**0.5
        x = z @ lift + 0.3 * torch.randn(n_items, d, generator=g)
        features[name] = FeatureTable(x, torch.ones(n_items, dtype=torch.bool))
    members = [np.flatnonzero(cluster.numpy() == c) for c in range(n_clusters)]
    counts = np.clip(rng.poisson(per_user, n_users), 3, None)
    users, items = [], []
    for u in range(n_users):
        pool = np.concatenate([members[c] for c in rng.choice(n_clusters, 3, replace=False)])
        zipf = 1.0 / np.arange(1, len(pool) + 1)
        pick = rng.choice(pool, size=min(counts[u], len(pool)), replace=False, p=zipf / zipf.sum())
        users.append(np.full(len(pick), u))
        items.append(pick)
    users, items = np.concatenate(users), np.concatenate(items)
    return Dataset(f"bench-{n_items}", ["buy"], "buy", np.array([f"u{u}" for u in range(n_users)], dtype=object),
                   np.array([f"i{i}" for i in range(n_items)], dtype=object),
                   Interactions(users, items, np.zeros(len(users), dtype=np.int64)),
                   items=ItemContent(features=features))


# ----------------------------------------------------------------------------- dense baselines

def build_sim(x):
    xn = x / x.norm(p=2, dim=-1, keepdim=True)
    return xn @ xn.T


def build_knn_neighbourhood(adj, k):
    import torch
    val, ind = torch.topk(adj, k, dim=-1)
    return torch.zeros_like(adj).scatter_(-1, ind, val)


def dense_sym(adj):
    """D^-1/2 A D^-1/2 by broadcasting (MMRec: diagflat @ A @ diagflat, O(N^3))."""
    import torch
    d = adj.sum(-1).pow(-0.5)
    d = torch.where(torch.isinf(d), torch.zeros_like(d), d)
    return d.unsqueeze(1) * adj * d.unsqueeze(0)


def batched_contrastive_loss(z1, z2, tau: float, batch_size: int = 4096):
    """MICRO's official InfoNCE."""
    import torch
    import torch.nn.functional as F
    f = lambda x: torch.exp(x / tau)  # noqa: E731
    n = z1.size(0)
    z1n, z2n = F.normalize(z1), F.normalize(z2)
    losses = []
    for i in range((n - 1) // batch_size + 1):
        idx = torch.arange(i * batch_size, min(n, (i + 1) * batch_size), device=z1.device)
        refl, between = f(z1n[idx] @ z1n.T), f(z1n[idx] @ z2n.T)
        losses.append(-torch.log(between[:, i * batch_size:(i + 1) * batch_size].diag()
                                 / (refl.sum(1) + between.sum(1)
                                    - refl[:, i * batch_size:(i + 1) * batch_size].diag())))
    return torch.cat(losses).mean()


def _dense_module_base():
    import torch
    from torch import nn

    from mmrec.datasets.sampling import bpr_batches

    class DenseBase(nn.Module):
        def copy_ids(self, s) -> None:
            self.n_users, self.n_items = s.n_users, s.n_items
            self.user_emb, self.item_emb = copy.deepcopy(s.user_emb), copy.deepcopy(s.item_emb)
            self.register_buffer("warm", s.warm.clone())
            feats, _ = s.content.source()
            self.modalities = list(feats)
            for m in self.modalities:
                self.register_buffer(f"feat_{m}", feats[m].clone())
            self.proj = copy.deepcopy(s.content.proj)

        def feats(self):
            return {m: getattr(self, f"feat_{m}") for m in self.modalities}

        def lightgcn(self, adj, e, layers):
            ego = torch.cat([self.user_emb.weight, e])
            out = [ego]
            for _ in range(layers):
                ego = torch.sparse.mm(adj, ego)
                out.append(ego)
            out = torch.stack(out, 1).mean(1)
            return out[: self.n_users], out[self.n_users:]

        def training_batches(self, data, batch_size, rng):
            self.start_epoch()
            yield from bpr_batches(data.matrix(), batch_size, rng)

    return DenseBase


def dense_latent_structure(s):
    """MICRO / LATTICE with dense N x N item graphs (official code / MMRec)."""
    import torch
    import torch.nn.functional as F

    Base = _dense_module_base()

    class DenseLatentStructure(Base):
        def __init__(self) -> None:
            super().__init__()
            self.copy_ids(s)
            self.cfg = s.config
            self.fusion = copy.deepcopy(s.fusion)
            self.modal_logits = copy.deepcopy(s.item_graphs.modal_logits)
            k = self.cfg.knn_k
            with torch.no_grad():   # image_original_adj / text_original_adj
                for m in self.modalities:
                    self.register_buffer(f"orig_{m}", dense_sym(build_knn_neighbourhood(build_sim(self.feats()[m]), k)))
            self.adj = s.graph.adj_t_0.to_sparse_coo().coalesce()   # the codes' torch.sparse.FloatTensor
            self.item_adj = None
            self.build = True

        def start_epoch(self):
            self.build = True

        def forward_all(self):
            c, lam = self.cfg, self.cfg.lambda_coeff
            e = self.item_emb.weight * self.warm
            feats = self.feats()
            if self.build or self.item_adj is None:
                proj = {m: self.proj[m](feats[m]) for m in self.modalities}
                knn = {m: build_knn_neighbourhood(build_sim(proj[m]), c.knn_k) for m in self.modalities}
                if self.fusion is None:       # LATTICE
                    w = torch.softmax(self.modal_logits, 0)
                    learned = dense_sym(sum(w[j] * knn[m] for j, m in enumerate(self.modalities)))
                    orig = sum(w[j] * getattr(self, f"orig_{m}") for j, m in enumerate(self.modalities))
                    self.item_adj = [(1 - lam) * learned + lam * orig]
                else:                         # MICRO
                    self.item_adj = [(1 - lam) * dense_sym(knn[m]) + lam * getattr(self, f"orig_{m}")
                                     for m in self.modalities]
                self.build = not self.training
            else:
                self.item_adj = [a.detach() for a in self.item_adj]
            hs = []
            for a in self.item_adj:
                h = e
                for _ in range(c.item_layers):
                    h = torch.mm(a, h)
                hs.append(h)
            if self.fusion is None:
                h, parts = hs[0], None
            else:
                parts = dict(zip(self.modalities, hs))
                masks = {m: torch.ones(self.n_items, dtype=torch.bool, device=e.device) for m in self.modalities}
                h = self.fusion(parts, masks, e)
            users, items = self.lightgcn(self.adj, e, c.ui_layers)
            return users, items + F.normalize(h, p=2, dim=1), h, parts

        def loss(self, batch):
            users, items, h, parts = self.forward_all()
            u, i, j = batch["user"], batch["pos"], batch["neg"]
            ue, ie, je = users[u], items[i], items[j]
            loss = F.softplus((ue * je).sum(-1) - (ue * ie).sum(-1)).mean()
            loss = loss + self.cfg.reg * 0.5 * (ue.pow(2).sum() + ie.pow(2).sum() + je.pow(2).sum()) / len(u)
            if self.cfg.cl_weight > 0:
                rows = torch.unique(torch.cat([i, j])) if self.cfg.cl_items == "batch" else slice(None)
                cl = sum(batched_contrastive_loss(p[rows], h[rows], self.cfg.cl_temperature) for p in parts.values())
                loss = loss + self.cfg.cl_weight * cl
            return loss

        def representations(self):
            return self.forward_all()[:2]

    return DenseLatentStructure()


def mmrec_code_freedom(s):
    """FREEDOM as MMRec's freedom.py writes it (dense similarity at build, COO spmm, multinomial)."""
    import torch
    import torch.nn.functional as F

    Base = _dense_module_base()

    class MMRecFreedom(Base):
        def __init__(self) -> None:
            super().__init__()
            self.copy_ids(s)
            self.cfg = s.config
            users, items = s.graph.users, s.graph.items
            self.edge_indices = torch.stack([users, items])
            self.edge_values = self._normalize_adj_m(self.edge_indices, (self.n_users, self.n_items))
            self.norm_adj = s.graph.adj_t_0.to_sparse_coo().coalesce()   # get_norm_adj_mat: D^-1/2 A D^-1/2
            mm_adj = None
            with torch.no_grad():
                for m, w in s.modality_weights.items():
                    adj = self.get_knn_adj_mat(self.feats()[m])
                    mm_adj = w * adj if mm_adj is None else mm_adj + w * adj
            self.mm_adj = mm_adj.coalesce()
            self.masked_adj = self.norm_adj

        def get_knn_adj_mat(self, x):
            xn = x.div(torch.norm(x, p=2, dim=-1, keepdim=True))
            sim = torch.mm(xn, xn.transpose(1, 0))
            _, knn_ind = torch.topk(sim, self.cfg.knn_k, dim=-1)
            size = sim.size()
            del sim
            rows = torch.arange(knn_ind.shape[0], device=x.device).unsqueeze(1).expand(-1, self.cfg.knn_k)
            indices = torch.stack((torch.flatten(rows), torch.flatten(knn_ind)), 0)
            adj = torch.sparse_coo_tensor(indices, torch.ones_like(indices[0]), size)
            r = (1e-7 + torch.sparse.sum(adj, -1).to_dense()).pow(-0.5)
            return torch.sparse_coo_tensor(indices, r[indices[0]] * r[indices[1]], size)

        def _normalize_adj_m(self, indices, size):
            adj = torch.sparse_coo_tensor(indices, torch.ones_like(indices[0]), size)
            row = (1e-7 + torch.sparse.sum(adj, -1).to_dense()).pow(-0.5)
            col = (1e-7 + torch.sparse.sum(adj.t(), -1).to_dense()).pow(-0.5)
            return row[indices[0]] * col[indices[1]]

        def start_epoch(self):   # pre_epoch_processing
            n_keep = int(self.edge_values.size(0) * (1.0 - self.cfg.prune_ratio))
            idx = torch.multinomial(self.edge_values, n_keep)
            keep = self.edge_indices[:, idx]
            values = self._normalize_adj_m(keep, (self.n_users, self.n_items))
            keep = keep.clone()
            keep[1] += self.n_users
            index = torch.cat((keep, torch.flip(keep, [0])), 1)
            n = self.n_users + self.n_items
            self.masked_adj = torch.sparse_coo_tensor(index, torch.cat((values, values)), (n, n))

        def forward_all(self, adj):
            e = self.item_emb.weight * self.warm
            h = e
            for _ in range(self.cfg.item_layers):
                h = torch.sparse.mm(self.mm_adj, h)
            users, items = self.lightgcn(adj, e, self.cfg.ui_layers)
            return users, items + h

        def loss(self, batch):
            users, items = self.forward_all(self.masked_adj)
            u, i, j = batch["user"], batch["pos"], batch["neg"]
            ue = users[u]
            bpr = lambda p, q: F.softplus(q - p).mean()  # noqa: E731
            loss = bpr((ue * items[i]).sum(-1), (ue * items[j]).sum(-1))
            feats = self.feats()
            for m in self.modalities:
                x = self.proj[m](feats[m])
                loss = loss + self.cfg.feature_weight * bpr((ue * x[i]).sum(-1), (ue * x[j]).sum(-1))
            return loss

        def representations(self):
            return self.forward_all(self.norm_adj)

    return MMRecFreedom()


# ----------------------------------------------------------------------------- worker

def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(a: argparse.Namespace) -> dict:
    import torch

    from mmrec.models.base import create_model

    torch.set_num_threads(a.threads)
    import torch_geometric  # noqa: F401  (imported once before any timing: seconds on a busy machine)

    import mmrec.fusion.models  # noqa: F401
    model_name, overrides, batch_size = CASES[a.case]
    data = make_data(a.items, a.users, a.per_user, a.seed)
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    out = {"case": a.case, "arm": a.arm, "items": a.items, "users": a.users, "interactions": int(data.matrix().nnz),
           "batch_size": batch_size, "device": a.device}
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    sparse = create_model(model_name, data, overrides).to(dev)
    _sync(a.device)
    out["setup_sparse"] = time.perf_counter() - t0
    if a.arm == "sparse":
        model = sparse
        out["setup"] = out["setup_sparse"]
    else:
        t0 = time.perf_counter()
        model = (mmrec_code_freedom if model_name == "freedom" else dense_latent_structure)(sparse).to(dev)
        _sync(a.device)
        out["setup"] = time.perf_counter() - t0
        # same math: the same item representations before any training (eval, full graphs)
        sparse.eval()
        model.eval()
        with torch.no_grad():
            su, si = sparse.compute_representations()
            du, di = model.representations()
        out["max_abs_diff_vs_sparse"] = float(max((su - du).abs().max(), (si - di).abs().max()))
        out["scale"] = float(si.abs().max())
        del sparse, su, si, du, di
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(a.seed)
    n_batches = math.ceil(data.matrix().nnz / batch_size)
    out["n_batches"] = n_batches

    def step(batch):
        batch = {k: v.to(dev) for k, v in batch.items()}
        opt.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        return float(loss.detach())

    it = iter(model.training_batches(data, batch_size, rng))   # warm-up epoch start + 2 steps, untimed
    for _ in range(2):
        step(next(it))
    _sync(a.device)
    t0, c0 = time.perf_counter(), time.process_time()
    it = iter(model.training_batches(data, batch_size, rng))
    first = next(it)
    _sync(a.device)
    out["epoch_start"], out["epoch_start_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    step(first)
    _sync(a.device)
    out["first_step"], out["first_step_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    times, cpu = [], []
    for _ in range(a.steps):
        batch = next(it)
        t0, c0 = time.perf_counter(), time.process_time()
        step(batch)
        _sync(a.device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out["step"], out["step_cpu"] = float(np.mean(times)), float(np.mean(cpu))
    out["epoch_estimate"] = out["epoch_start"] + out["first_step"] + (n_batches - 1) * out["step"]
    out["epoch_estimate_cpu"] = out["epoch_start_cpu"] + out["first_step_cpu"] + (n_batches - 1) * out["step_cpu"]
    out["peak_rss_over_data"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    out["load_end"] = os.getloadavg()[0]   # 1-min load average when the arm finished (shared machine)
    if dev.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated() - base_cuda
    return out


# ----------------------------------------------------------------------------- driver

def _run(a: argparse.Namespace, case: str, arm: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--case", case, "--arm", arm, "--items", str(a.items),
           "--users", str(a.users), "--per-user", str(a.per_user), "--steps", str(a.steps), "--device", a.device,
           "--threads", str(a.threads), "--seed", str(a.seed)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"case": case, "arm": arm, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--users", type=int, default=None, help="default: as many as items")
    p.add_argument("--per-user", type=int, default=20, help="mean interactions per user")
    p.add_argument("--cases", nargs="+", default=["micro", "micro-batchcl", "freedom"], choices=sorted(CASES))
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first of the epoch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-max-gib", type=float, default=8.0,
                   help="skip a dense arm whose estimated peak exceeds this (shared machines)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.users = a.users or a.items
    if a.worker:
        print(json.dumps(worker(a)))
        return
    import torch
    print(f"# train_epoch: {a.items} items, {a.users} users, ~{a.per_user} interactions/user, device {a.device}, "
          f"{a.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    results = []
    for case in a.cases:
        arms = ("sparse", "mmrec-code" if CASES[case][0] == "freedom" else "dense")
        need = DENSE_N2_MATRICES[case] * 4 * a.items**2
        rows = {"sparse": _run(a, case, "sparse")}
        rows[arms[1]] = _run(a, case, arms[1]) if need <= a.dense_max_gib * GIB else {
            "case": case, "arm": arms[1], "error": f"skipped: needs ~{need / GIB:.0f} GiB "
                                                   f"(> --dense-max-gib {a.dense_max_gib:g})"}
        results += list(rows.values())
        print(f"\n## {case}")
        print("arm         setup s  first step s (cpu)  step s (cpu)   epoch est. s (cpu)  peak RSS GiB  "
              "peak CUDA GiB  max|Δ| vs sparse  load")
        for arm, r in rows.items():
            if "error" in r:
                print(f"{arm:<11} {r['error']}")
                continue
            print(f"{arm:<11} {r['setup']:7.2f}  {r['first_step']:7.2f} ({r['first_step_cpu']:7.2f})  "
                  f"{r['step']:6.3f} ({r['step_cpu']:6.3f})  {r['epoch_estimate']:8.1f} ({r['epoch_estimate_cpu']:8.1f})  "
                  f"{_gib(r['peak_rss_over_data']):>12}  {_gib(r.get('peak_cuda')):>13}  "
                  f"{r.get('max_abs_diff_vs_sparse', 0):.1e}  {r.get('load_end', 0):5.1f}")
        s, d = rows["sparse"], rows[arms[1]]
        if "error" not in s and "error" not in d:
            print(f"ratios {arms[1]}/sparse: epoch {d['epoch_estimate'] / s['epoch_estimate']:.1f}x wall, "
                  f"{d['epoch_estimate_cpu'] / s['epoch_estimate_cpu']:.1f}x cpu; "
                  f"step {d['step'] / s['step']:.1f}x, first step {d['first_step'] / s['first_step']:.1f}x, "
                  f"setup {d['setup'] / s['setup']:.1f}x, peak RSS "
                  f"{d['peak_rss_over_data'] / max(s['peak_rss_over_data'], 1):.1f}x"
                  + (f", peak CUDA {d['peak_cuda'] / max(s['peak_cuda'], 1):.1f}x" if "peak_cuda" in s else "")
                  + f"  ({s['n_batches']} steps/epoch)")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
