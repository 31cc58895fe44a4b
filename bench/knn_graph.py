"""Benchmark: item-item kNN graph build vs. the dense product it replaces.

For each size N, in the same run and on the same data (a low-rank mixture of
Gaussians, L2-normalised: clustered like real content embeddings), each in a
fresh subprocess so that its peak RSS (``ru_maxrss``) is its own:

- ``dense``: ``S = X @ X.T`` whole, then ``topk`` (the peer construction); skipped
  with a note when the N^2*4 bytes of S exceed ``--dense-max-gib``;
- ``bare``: the blockwise product ``X_b @ X.T`` alone with our block size, no topk:
  the lower bound of any exact method;
- ``exact``: ``knn_graph(backend="exact")`` (topk + sparse sym-normalised graph);
- ``faiss``: ``knn_graph(backend=--ann)`` and its recall of the exact top-k on a
  sample of queries (exact lists computed blockwise, untimed).

Above ``--exact-max`` items, ``bare`` and ``exact`` time only the first
``--estimate-rows`` query rows against all N and extrapolate linearly (marked ``~``).

    python bench/knn_graph.py --sizes 10000 100000 1000000 --dim 384 --k 10 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import current_rss, machine, total_ram

GIB = 2**30


# --------------------------------------------------------------------------- data

def clustered_vectors(n: int, d: int, seed: int = 0, latent: int = 32,
                      spread: float = 1.0, noise: float = 0.3):
    """Mixture of Gaussians in a ``latent``-dim space (one cluster per 100 items),
    lifted to ``d`` dims by a random map plus isotropic noise, then L2-normalised.
    Overlapping clusters make approximate search honestly imperfect."""
    import torch
    g = torch.Generator().manual_seed(seed)
    n_clusters = max(8, n // 100)
    lift = torch.randn(latent, d, generator=g) / latent**0.5
    centres = torch.randn(n_clusters, latent, generator=g)
    out = torch.empty(n, d)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        z = centres[torch.randint(n_clusters, (e - s,), generator=g)]
        z = z + spread * torch.randn(e - s, latent, generator=g)
        out[s:e] = z @ lift + noise * torch.randn(e - s, d, generator=g)
    return torch.nn.functional.normalize(out, dim=1)


# --------------------------------------------------------------------------- worker side

def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


_CPU: list[float] = []  # process CPU seconds (all threads) of the best run of the last _timed


def _timed(fn, device: str, repeat: int):
    """Best wall time of ``repeat`` runs; the process CPU time goes to ``_CPU``.

    On a shared machine, wall time includes waiting for cores other jobs hold;
    CPU time (user + sys of this process) does not, so both are reported."""
    best, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        result = None  # free the previous result before the next run allocates its own
        _sync(device)
        c, t = time.process_time(), time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
        cpu = min(cpu, time.process_time() - c)
    _CPU[:] = [cpu]
    return best, result


def worker(a: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    import numpy as np
    import torch

    from mmrec.fusion.bridge.knn import auto_block_size, exact_topk, knn_graph

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.from_numpy(np.load(a.data)).to(a.device)
    n = x.shape[0]
    base = current_rss()
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    block = a.block_size or auto_block_size(n, 4, x.device)
    rows = min(n, a.estimate_rows) if a.estimate else n
    out: dict = {"kind": a.worker, "n": n, "block_size": block, "rows_timed": rows}

    if a.worker == "dense":
        def mm():
            return x @ x.T
        t_mm, s = _timed(mm, a.device, a.repeat)
        del s
        out["mm_cpu_seconds"] = _CPU[0]

        def mm_topk():
            s = x @ x.T
            s.fill_diagonal_(float("-inf"))
            return s.topk(a.k, dim=1)
        t, _ = _timed(mm_topk, a.device, a.repeat)
        out.update(seconds=t, mm_seconds=t_mm)
    elif a.worker in ("bare", "exact", "paired"):
        def bare():  # allocates its buffer inside, as knn_graph does: first-touch costs count
            buf = torch.empty((min(block, rows), n), device=x.device)
            for s in range(0, rows, block):
                e = min(rows, s + block)
                torch.mm(x[s:e], x.T, out=buf[: e - s])

        if a.estimate:  # the first `rows` query rows against all n; scaled up below
            q = torch.arange(rows, device=x.device)

            def exact():
                return exact_topk(x, a.k, rows=q, block_size=block)
        else:
            def exact():
                return knn_graph(x, a.k, backend="exact", block_size=block)

        if a.worker == "paired":
            # alternate the two so that load from other jobs hits both alike; best of each
            best = {"bare": [float("inf")] * 2, "exact": [float("inf")] * 2}
            for _ in range(a.repeat):
                for name, fn in (("bare", bare), ("exact", exact)):
                    t, _ = _timed(fn, a.device, 1)
                    best[name] = [min(best[name][0], t), min(best[name][1], _CPU[0])]
            scale = n / rows
            out.update(bare_seconds=best["bare"][0] * scale, bare_cpu_seconds=best["bare"][1] * scale,
                       exact_seconds=best["exact"][0] * scale,
                       exact_cpu_seconds=best["exact"][1] * scale, repeats=a.repeat)
            out.update(seconds=out["exact_seconds"], cpu_seconds=out["exact_cpu_seconds"],
                       estimated=a.estimate)
        else:
            out["seconds"], result = _timed(bare if a.worker == "bare" else exact, a.device, a.repeat)
            if a.worker == "exact" and not a.estimate:
                out["edges"] = result.num_edges
    elif a.worker == "faiss":
        import faiss
        faiss.omp_set_num_threads(a.threads)
        opts = json.loads(a.ann_options) if a.ann_options else None
        t, g = _timed(lambda: knn_graph(x, a.k, backend=a.ann, backend_options=opts), a.device, 1)
        out.update(seconds=t, edges=g.num_edges, cpu_seconds=_CPU[0])
        out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # recall of the true top-k on a seeded sample of queries (exact, blockwise, untimed)
        gen = torch.Generator().manual_seed(1)
        q = torch.randperm(n, generator=gen)[: a.recall_queries].to(x.device)
        _, truth = exact_topk(x, a.k, rows=q)
        approx = g.neighbors[q]
        hits = (approx.unsqueeze(2) == truth.unsqueeze(1)).any(2).sum().item()
        out["recall"] = hits / truth.numel()
        out["recall_queries"] = int(q.numel())
    else:
        raise SystemExit(f"unknown worker {a.worker}")

    out.setdefault("cpu_seconds", _CPU[0])
    out.setdefault("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out["base_rss"] = base if a.device == "cpu" else current_rss()
    if a.device == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated()
        out["base_cuda"] = base
    if a.estimate and a.worker != "paired":  # (paired scales its own numbers)
        out["seconds_measured"] = out["seconds"]
        out["seconds"] = out["seconds"] * n / rows
        out["cpu_seconds"] = out["cpu_seconds"] * n / rows
        out["estimated"] = True
    return out


# --------------------------------------------------------------------------- parent side

def _run_worker(a: argparse.Namespace, kind: str, data: Path, estimate: bool = False,
                repeat: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--k", str(a.k),
           "--device", a.device, "--threads", str(a.threads), "--ann", a.ann, "--ann-options", a.ann_options,
           "--repeat", str(repeat or (a.repeat_small if _n_of(data) <= 20_000 else 1)),
           "--recall-queries", str(a.recall_queries), "--estimate-rows", str(a.estimate_rows)]
    if a.block_size:
        cmd += ["--block-size", str(a.block_size)]
    if estimate:
        cmd.append("--estimate")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"kind": kind, "error": f"exit {p.returncode}: {p.stderr.strip()[-400:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _n_of(data: Path) -> int:
    return int(data.stem.split("_")[1])


def _gen_data(a: argparse.Namespace, n: int, tmp: Path) -> Path:
    """Write the data in a subprocess so the parent never holds it (nor its peak)."""
    path = tmp / f"x_{n}_{a.dim}.npy"
    code = (f"import sys, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from knn_graph import clustered_vectors; "
            f"np.save({str(path)!r}, clustered_vectors({n}, {a.dim}, seed={a.seed}).numpy())")
    subprocess.run([sys.executable, "-c", code], check=True)
    return path


def _mem(r: dict, device: str) -> str:
    if device == "cuda":
        return f"{r['peak_cuda'] / GIB:7.2f} GiB cuda (+{(r['peak_cuda'] - r['base_cuda']) / GIB:.2f})"
    return f"{r['peak_rss'] / GIB:7.2f} GiB (+{(r['peak_rss'] - r['base_rss']) / GIB:.2f} over data)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ann", default="faiss-hnsw", help="approximate backend to compare")
    p.add_argument("--ann-options", default="", help='JSON backend options, e.g. \'{"m": 16, "ef_construction": 20}\'')
    p.add_argument("--block-size", type=int, default=None, help="default: from the memory budget")
    p.add_argument("--exact-max", type=int, default=200_000,
                   help="above this N, time exact/bare on --estimate-rows rows and extrapolate")
    p.add_argument("--estimate-rows", type=int, default=4096)
    p.add_argument("--dense-max-gib", type=float, default=4.0,
                   help="skip the dense baseline when N^2*4 bytes exceed this")
    p.add_argument("--recall-queries", type=int, default=2000)
    p.add_argument("--repeat-small", type=int, default=3, help="repeats (best of) for N <= 20k")
    p.add_argument("--paired", type=int, default=2,
                   help="also time bare and exact alternately in one process, best of this many "
                        "rounds each (robust to load from other jobs); 0 = off")
    p.add_argument("--skip", nargs="*", default=[], choices=["dense", "bare", "exact", "faiss"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    # worker-only arguments
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--estimate", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        print(json.dumps(worker(a)))
        return

    import faiss
    import torch
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__} ({a.threads} threads), faiss {faiss.__version__}, "
          f"device {a.device}, d={a.dim}, k={a.k}, ann={a.ann} {a.ann_options}")
    results = []
    with tempfile.TemporaryDirectory(prefix="mmrec-knn-bench-") as tmp:
        for n in a.sizes:
            print(f"\n== N = {n:,} ==  (load average {os.getloadavg()[0]:.2f})", flush=True)
            data = _gen_data(a, n, Path(tmp))
            row: dict[str, dict] = {}
            dense_bytes = n * n * 4
            if "dense" in a.skip:
                pass
            elif dense_bytes > a.dense_max_gib * GIB:
                print(f"  dense  skipped: S = X @ X.T needs N^2*4 = {dense_bytes / GIB:.1f} GiB "
                      f"> --dense-max-gib {a.dense_max_gib} (machine RAM {(total_ram() / GIB):.1f} GiB, shared)")
            else:
                row["dense"] = _run_worker(a, "dense", data)
            est = n > a.exact_max
            for kind in ("bare", "exact"):
                if kind not in a.skip:
                    row[kind] = _run_worker(a, kind, data, estimate=est)
            if a.paired and not {"bare", "exact"} <= set(a.skip):  # --skip bare: exact alone + paired
                row["paired"] = _run_worker(a, "paired", data, estimate=est, repeat=a.paired)
            if "faiss" not in a.skip:
                row["faiss"] = _run_worker(a, "faiss", data)
            for kind, r in row.items():
                if "error" in r:
                    print(f"  {kind:6s} FAILED {r['error']}")
                    continue
                mark = "~" if r.get("estimated") else " "
                if kind == "paired":
                    print(f"  paired {mark}bare {r['bare_seconds']:.2f}s wall {r['bare_cpu_seconds']:.2f}s cpu"
                          f" | exact {r['exact_seconds']:.2f}s wall {r['exact_cpu_seconds']:.2f}s cpu"
                          f"  (interleaved, best of {r['repeats']} each)", flush=True)
                    continue
                extra = ""
                if kind == "dense":
                    extra = f"  (matmul alone {r['mm_seconds']:.2f}s, cpu {r['mm_cpu_seconds']:.2f}s)"
                if r.get("estimated"):
                    extra = f"  (measured {r['seconds_measured']:.1f}s on {r['rows_timed']} rows)"
                if kind == "faiss":
                    extra = f"  recall@{a.k} {r['recall']:.4f} on {r['recall_queries']} queries"
                print(f"  {kind:6s} {mark}{r['seconds']:9.2f}s wall {mark}{r['cpu_seconds']:9.2f}s cpu"
                      f"  peak {_mem(r, a.device)}  block {r['block_size']}{extra}", flush=True)
            ok = {k: r for k, r in row.items() if "error" not in r}
            ratios = {}

            def ratio(name: str, num: str, den: str, den_key: str = "seconds", cpu_key: str = "cpu_seconds"):
                if num in ok and den in ok:
                    ratios[name] = {"wall": ok[num]["seconds"] / ok[den][den_key],
                                    "cpu": ok[num]["cpu_seconds"] / ok[den][cpu_key]}

            ratio("exact / bare blockwise matmul", "exact", "bare")
            ratio("exact / dense matmul", "exact", "dense", "mm_seconds", "mm_cpu_seconds")
            ratio("exact / dense matmul+topk", "exact", "dense")
            ratio("bare blockwise / dense matmul", "bare", "dense", "mm_seconds", "mm_cpu_seconds")
            ratio("faiss / exact", "faiss", "exact")
            if "paired" in ok:
                pr = ok["paired"]
                ratios["paired exact / bare blockwise matmul"] = {
                    "wall": pr["exact_seconds"] / pr["bare_seconds"],
                    "cpu": pr["exact_cpu_seconds"] / pr["bare_cpu_seconds"]}
            for name, v in ratios.items():
                print(f"  ratio  {name}: {v['wall']:.3f} wall, {v['cpu']:.3f} cpu")
            if "exact" in ok and "dense" in ok:
                extra_mem = ((ok["exact"]["peak_rss"] - ok["exact"]["base_rss"])
                             / max(1, ok["dense"]["peak_rss"] - ok["dense"]["base_rss"]))
                ratios["exact / dense peak memory over data"] = {"memory": extra_mem}
                print(f"  ratio  exact / dense peak memory over data: {extra_mem:.3f}")
            results.append({"n": n, "results": row, "ratios": ratios})
    if a.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from mmrec.io import write_json
        write_json(a.json, {"machine": machine(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                             for k, v in vars(a).items()},
                            "sizes": results})


if __name__ == "__main__":
    main()
