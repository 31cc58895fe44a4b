"""Speed of every joint-task / multi-scenario head next to shared-bottom, and its cost on a backbone.

Two measurements, each reported as RATIOS to a baseline timed in the same process with
interleaved repetitions (on a loaded or shared machine the absolute samples/s drift with the
load; a ratio of adjacent timings mostly does not):

1. **Heads alone** on synthetic labelled exposures (:func:`mmrec.heads.synthetic.make_exposures`,
   ``in_dim`` = 3 x ``--dim``, the input :class:`~mmrec.heads.model.HeadModel` feeds a head from a
   ``--dim`` backbone; 2 tasks click / convert; 3 scenarios). Per head: a training step
   (forward, ``task_losses`` summed + ``aux_loss``, backward, Adam step) and inference (eval mode,
   ``no_grad``) on batches of ``--batch-size`` rows, as samples/s and as the ratio to
   ``shared-bottom``. Each repetition times shared-bottom and the head back to back (the order
   swapped every repetition); the ratio of each pair is taken and the median over ``--reps``
   reported. Also: parameters, and the bytes autograd saves for backward in one training step
   (activations and the weights the backward needs; a CPU proxy of the step's peak memory, read
   with ``torch.autograd.graph.saved_tensors_hooks``; on CUDA the allocator's peak is used).
2. **Cost on top of a backbone** (default ``lightgcn`` on ``synthetic:small``, or ``--data DIR``
   with ``--backbone MODEL``): the time of one training step of the backbone alone (its own
   loss on a batch of ``--batch-size`` interactions) against one step of :class:`HeadModel`:
   ``two-step`` (the head on the frozen backbone's cached representations; only the head learns)
   and ``end2end`` (backbone propagation with gradients + the head's loss on ``--batch-size``
   exposures + the backbone's own loss on its own batch). Ratio = step time / backbone step time,
   paired and medianed as above. Batches are built before timing (data preparation is not timed).

A markdown table goes to stdout (for docs/results.md), headed by the machine line.

    python bench/heads.py --reps 3 --threads 1
    python bench/heads.py --heads shared-bottom mmoe star --data ../shared/data/ml100k-mm --backbone lightgcn
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(Path(__file__).resolve().parent)):   # mmrec from this checkout; _common
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import machine, peak_rss  # noqa: E402
from mmrec.errors import MMRecError  # noqa: E402

BASELINE = "shared-bottom"
MIB = 2**20


# ----------------------------------------------------------------------------- timing helpers

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of ``fn()`` (the device drained before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def paired_ratios(base: Callable[[], Any], cand: Callable[[], Any], reps: int,
                  device: torch.device) -> tuple[list[float], list[float]]:
    """(baseline seconds, candidate seconds) per repetition, the two run back to back,
    the baseline first on even repetitions and second on odd ones (so a load change
    within a pair does not always favour the same arm)."""
    tb, tc = [], []
    for r in range(reps):
        if r % 2 == 0:
            tb.append(timed(base, device))
            tc.append(timed(cand, device))
        else:
            tc.append(timed(cand, device))
            tb.append(timed(base, device))
    return tb, tc


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of num[r] / den[r] (paired, not a ratio of medians)."""
    return float(statistics.median(n / d for n, d in zip(num, den)))


def autograd_saved_bytes(step: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``step()``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        # the tensor's own bytes (a batch sliced from a larger tensor shares its storage),
        # at most its storage's (an expanded view repeats elements); counted once per address
        nbytes = min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def step_memory(step: Callable[[], Any], device: torch.device) -> tuple[str, int]:
    """(what was measured, bytes) of one training step: CUDA peak over the step, else autograd's saved bytes."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return "cuda_peak_over_step", torch.cuda.max_memory_allocated(device) - before
    return "autograd_saved", autograd_saved_bytes(step)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- 1. heads alone

class HeadArm:
    """A head, its optimizer and fixed batches: ``train()`` / ``infer()`` run every batch once."""

    def __init__(self, name: str, in_dim: int, n_scenarios: int, batches: list[tuple[torch.Tensor, ...]],
                 device: torch.device, seed: int) -> None:
        from mmrec.heads import create_head

        torch.manual_seed(seed)
        self.name = name
        self.head = create_head(name, in_dim, n_tasks=2, n_scenarios=n_scenarios).to(device)
        self.opt = torch.optim.Adam(self.head.parameters(), lr=1e-3)
        self.batches = batches

    def step(self, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        logits = self.head(x, s)
        loss = self.head.task_losses(logits, y).sum() + self.head.aux_loss(logits)
        loss.backward()
        self.opt.step()

    def train(self) -> None:
        self.head.train()
        for b in self.batches:
            self.step(*b)

    @torch.no_grad()
    def infer(self) -> None:
        self.head.eval()
        for x, s, _ in self.batches:
            self.head(x, s)


def bench_heads_alone(heads: list[str], args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    from mmrec.heads.synthetic import make_exposures

    in_dim, n_scen, bs = 3 * args.dim, 3, args.batch_size
    exp = make_exposures(n=bs * args.steps, dim=in_dim, n_scenarios=n_scen, seed=args.seed)
    x = torch.from_numpy(exp.x).to(device)
    s = torch.from_numpy(exp.scenario).to(device)
    y = torch.from_numpy(np.stack([exp.click, exp.convert], 1)).to(device)
    batches = [(x[i:i + bs].clone(), s[i:i + bs].clone(), y[i:i + bs].clone()) for i in range(0, len(x), bs)]
    base = HeadArm(BASELINE, in_dim, n_scen, batches, device, args.seed)
    base.train(), base.infer()   # warm-up (allocator, first-call dispatch)
    rows = []
    for name in heads:
        try:
            arm = base if name == BASELINE else HeadArm(name, in_dim, n_scen, batches, device, args.seed)
        except MMRecError as e:  # a head not defined for this input (e.g. a task count): say so, go on
            rows.append({"head": name, "error": f"{type(e).__name__}: {e}"})
            continue
        arm.train(), arm.infer()
        kind, mem = step_memory(lambda: arm.step(*batches[0]), device)
        tb, tc = paired_ratios(base.train, arm.train, args.reps, device)
        ib, ic = paired_ratios(base.infer, arm.infer, args.reps, device)
        n = len(x)
        rows.append({
            "head": name, "params": n_params(arm.head), "multi_scenario": bool(arm.head.multi_scenario),
            "train_samples_per_s": n / statistics.median(tc), "infer_samples_per_s": n / statistics.median(ic),
            # samples/s ratio = baseline time / head time, per pair
            "train_x_baseline": 1.0 if arm is base else median_ratio(tb, tc),
            "infer_x_baseline": 1.0 if arm is base else median_ratio(ib, ic),
            "memory_kind": kind, "memory_bytes": mem})
    return rows


# ----------------------------------------------------------------------------- 2. cost on a backbone

def load_data(args: argparse.Namespace):
    from mmrec.datasets.loading import load_dataset
    from mmrec.datasets.splits import apply_split

    return apply_split(load_dataset(args.data, seed=args.seed), None, seed=args.seed)


def build_backbone(args: argparse.Namespace, data, device: torch.device):
    """A fresh backbone (same seed, so every arm starts from the same weights), fitted to the data."""
    from mmrec.models.base import create_model

    torch.manual_seed(args.seed)
    margs: dict[str, Any] = {"dim": args.dim}
    if args.layers is not None:
        margs["layers"] = args.layers
    model = create_model(args.backbone, data, margs)
    model.fit(data)
    return model.to(device)


class StepArm:
    """A :class:`~mmrec.models.base.Recommender` and prebuilt batches; ``run()`` makes one
    optimizer step per batch, as :class:`mmrec.train.trainer.Trainer` does."""

    def __init__(self, model, data, args: argparse.Namespace, device: torch.device) -> None:
        self.model, self.device = model, device
        model.train()
        rng = np.random.default_rng(args.seed)
        batches = []
        for b in model.training_batches(data, args.batch_size, rng):
            batches.append({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
            if len(batches) == args.steps:
                break
        if not batches:
            raise SystemExit(f"{type(model).__name__} yields no training batches on {args.data}")
        self.batches = batches
        self.opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model.on_batch(batch)
        loss = self.model.loss(batch)
        aux = self.model.auxiliary_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        self.opt.step()

    def run(self) -> None:
        for b in self.batches:
            self.step(b)

    def seconds_per_step(self, total: float) -> float:
        return total / len(self.batches)


def bench_on_backbone(heads: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from mmrec.heads.model import HeadModel, HeadModelConfig
    from mmrec.heads.tasks import derive_tasks

    data = load_data(args)
    table = derive_tasks(data, HeadModelConfig(), seed=args.seed)
    bb = StepArm(build_backbone(args, data, device), data, args, device)
    bb.run()   # warm-up
    rows, bb_times = [], []
    for name in heads:
        arms: dict[str, StepArm] = {}
        try:
            for mode in ("two-step", "end2end"):
                model = HeadModel.build(build_backbone(args, data, device), table, name,
                                        HeadModelConfig(mode=mode), {}).to(device)
                arms[mode] = StepArm(model, data, args, device)
                arms[mode].run()   # warm-up
        except MMRecError as e:  # e.g. a head needing another number of tasks than the data defines
            rows.append({"head": name, "error": f"{type(e).__name__}: {e}"})
            continue
        row: dict[str, Any] = {"head": name}
        for mode, arm in arms.items():
            tb, tc = paired_ratios(bb.run, arm.run, args.reps, device)
            bb_times += tb
            row[f"{mode}_x_backbone"] = median_ratio([arm.seconds_per_step(t) for t in tc],
                                                     [bb.seconds_per_step(t) for t in tb])
            row[f"{mode}_ms_per_step"] = 1e3 * arm.seconds_per_step(statistics.median(tc))
            row[f"{mode}_head_params"] = n_params(arm.model.head)
            row[f"{mode}_steps"] = len(arm.batches)
        rows.append(row)
    return {"data": args.data, "backbone": args.backbone, "tasks": table.tasks, "scenarios": table.scenarios,
            "train_exposures": int(len(table.rows("train"))),
            "backbone_params": n_params(bb.model), "rows": rows,
            "backbone_ms_per_step": 1e3 * bb.seconds_per_step(statistics.median(bb_times)) if bb_times else None,
            "backbone_batches": len(bb.batches)}


# ----------------------------------------------------------------------------- report

def format_tables(result: dict[str, Any]) -> str:
    a = result["args"]
    mem_kind = next((r["memory_kind"] for r in result["heads"] if "memory_kind" in r), "autograd_saved")
    mem_col = "autograd-saved MiB/step" if mem_kind == "autograd_saved" else "CUDA peak MiB/step"
    out = [f"machine: {result['machine']}; torch threads {a['threads']}; device {a['device']}; "
           f"load average {result['load_start']:.2f} -> {result['load_end']:.2f}", "",
           f"Heads alone: batches of {a['batch_size']} synthetic exposures, in_dim {3 * a['dim']}, 2 tasks, "
           f"3 scenarios; {a['steps']} batches per timing, {a['reps']} paired repetitions, medians "
           f"(× {BASELINE}: samples/s ratio, > 1 is faster).", "",
           f"| head | kind | params | train samples/s | train × {BASELINE} | infer samples/s | infer × {BASELINE} "
           f"| {mem_col} |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["heads"]:
        if "error" in r:
            out.append(f"| {r['head']} | {r['error']} | | | | | | |")
            continue
        out.append(f"| {r['head']} | {'multi-scenario' if r['multi_scenario'] else 'joint-task'} | {r['params']:,} "
                   f"| {r['train_samples_per_s']:,.0f} | {r['train_x_baseline']:.2f} "
                   f"| {r['infer_samples_per_s']:,.0f} | {r['infer_x_baseline']:.2f} | {r['memory_bytes'] / MIB:.1f} |")
    bb = result.get("backbone")
    if bb:
        out += ["", f"On a backbone: `{bb['backbone']}` (dim {a['dim']}, {bb['backbone_params']:,} params) on "
                    f"`{bb['data']}` ({bb['train_exposures']:,} training exposures; tasks {', '.join(bb['tasks'])}; "
                    f"{len(bb['scenarios'])} scenario(s)); one step = a batch of {a['batch_size']}; "
                    f"backbone alone {bb['backbone_ms_per_step'] or float('nan'):.1f} ms/step; "
                    f"× backbone = step time / the backbone-alone step time (> 1 costs more), "
                    f"{a['reps']} paired repetitions of up to {a['steps']} steps per arm (the backbone: "
                    f"{bb['backbone_batches']}, its epoch's batches), medians.", "",
                "| head | two-step × backbone | end2end × backbone | two-step ms/step | end2end ms/step |",
                "|---|---:|---:|---:|---:|"]
        for r in bb["rows"]:
            if "error" in r:
                out.append(f"| {r['head']} | {r['error']} | | | |")
                continue
            out.append(f"| {r['head']} | {r['two-step_x_backbone']:.2f} | {r['end2end_x_backbone']:.2f} "
                       f"| {r['two-step_ms_per_step']:.1f} | {r['end2end_ms_per_step']:.1f} |")
    out += ["", f"peak RSS of the process: {result['peak_rss'] / MIB:,.0f} MiB"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mmrec.registry import HEADS
    import mmrec.heads  # noqa: F401  (registers every head)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=None, help="subset of heads (default: every registered head)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="batches per timing")
    p.add_argument("--reps", type=int, default=5, help="paired repetitions (medians are reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=64, help="backbone dim; heads read 3 x dim features")
    p.add_argument("--data", default="synthetic:small",
                   help="data of the backbone part (a directory or synthetic:<preset>)")
    p.add_argument("--backbone", default="lightgcn", help="backbone model (one with representations())")
    p.add_argument("--layers", type=int, default=None, help="backbone layers (default: the model's)")
    p.add_argument("--no-backbone", action="store_true", help="only the heads-alone table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    heads = list(a.heads) if a.heads else HEADS.names()
    for h in heads:
        HEADS.get(h)   # an unknown name: ConfigError listing the known ones
    if BASELINE not in heads:
        heads.insert(0, BASELINE)
    heads = [BASELINE] + [h for h in dict.fromkeys(heads) if h != BASELINE]
    if a.batch_size < 1 or a.steps < 1 or a.reps < 1:
        raise SystemExit("--batch-size, --steps and --reps must be >= 1")
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {"machine": machine(), "torch": torch.__version__, "load_start": load_start,
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    result["heads"] = bench_heads_alone(heads, a, device)
    if not a.no_backbone:
        result["backbone"] = bench_on_backbone(heads, a, device)
    result["load_end"] = os.getloadavg()[0]
    result["peak_rss"] = peak_rss()
    result["table"] = format_tables(result)
    print(result["table"])
    if a.json:
        from mmrec.io import write_json
        write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
