"""``mmrec pretrain``: contrastive alignment pre-training (alone or under ``torchrun``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable



def cmd_pretrain(args: argparse.Namespace) -> int:
    from mmrec.pretrain.config import build_pretrain_config
    from mmrec.pretrain.run import METRICS, pretrain

    cli: dict[str, Any] = {"data": args.data, "out": args.out, "format": args.format, "split": args.split,
                           "seed": args.seed, "device": args.device, "train.epochs": args.epochs,
                           "train.max_steps": args.max_steps, "loader.batch_size": args.batch_size,
                           "train.lr": args.lr, "loader.shards": args.shards,
                           "loader.num_workers": args.num_workers}
    if args.modalities:
        cli["modalities"] = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if args.resume:
        cli["train.resume"] = True
    if args.no_progress:
        cli["train.progress"] = False
    cfg = build_pretrain_config(args.config, cli, args.overrides)
    main = int(os.environ.get("RANK", "0")) == 0
    out = pretrain(cfg, log=print)
    if not main:
        return 0
    if out.get("interrupted"):
        print(f"stopped after step {out['step']} (train.stop_after); continue with --resume")
        return 0
    _print_table(out)
    _print_heldout(out)
    print(f"{out['steps']} steps, {out['train_seconds']:.1f}s; bad media: {out['bad_media']['items'] or 'none'}; "
          f"wrote {Path(cfg.out) / METRICS}")
    return 0


def _print_table(out: dict[str, Any]) -> None:
    after, before = out["metrics"], out.get("baseline", {})
    names = sorted({k.split("/")[0] for k in after})
    cols = [c for c in ("Recall@1", "Recall@10", "Recall@50", "MRR") if any(k.endswith("/" + c) for k in after)]
    width = max(len(n) for n in names) + 2
    print(f"\nitem retrieval ({out['n_items']} items; chance Recall@10 = {out['chance'].get('Recall@10', 0):.4f})")
    print(f"{'':<{width}}" + "".join(f"{c:>22}" for c in cols))
    for n in names:
        cells = []
        for c in cols:
            a, b = after.get(f"{n}/{c}"), before.get(f"{n}/{c}")
            cells.append(f"{b:.4f} -> {a:.4f}" if a is not None and b is not None else
                         (f"{a:.4f}" if a is not None else "-"))
        print(f"{n:<{width}}" + "".join(f"{c:>22}" for c in cells))


def _print_heldout(out: dict[str, Any]) -> None:
    """The held-out items' numbers beside their references (docs/pretraining.md, "Held-out items")."""
    m = out["metrics"]
    if "heldout/MRR" not in m:
        return
    rows = [("encoders", "heldout"), ("ridge", "heldout/ridge"), ("control", "heldout/control"),
            ("chance", "heldout/chance")]
    print(f"\nheld-out items ({out['heldout']['heldout']} never aligned; Recall@10 / MRR)")
    for name, prefix in rows:
        if f"{prefix}/MRR" in m:
            print(f"  {name:<10}{m.get(prefix + '/Recall@10', float('nan')):>8.4f}{m[prefix + '/MRR']:>9.4f}")


def add_parsers(sub: argparse._SubParsersAction, data_sub: argparse._SubParsersAction,
                common: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("pretrain", help="contrastive alignment pre-training of content encoders (runs under torchrun)",
                       description="Align image/text/audio encoders with behavior embeddings (InfoNCE). "
                                   "Multi-GPU/CPU: torchrun --nproc_per_node N -m mmrec.cli pretrain ...")
    p.add_argument("--data", help="dataset directory or synthetic:<preset> (config key: data)")
    p.add_argument("--out", help="run directory (config key: out)")
    p.add_argument("--format")
    p.add_argument("--split", help="split whose training rows feed the behavior side (default as `mmrec train`)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, help="global micro-batch (all ranks together)")
    p.add_argument("--lr", type=float)
    p.add_argument("--modalities", help="comma list, e.g. image,text")
    p.add_argument("--shards", help="stream from this `mmrec data shards` directory")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (decoding and preprocessing)")
    p.add_argument("--resume", action="store_true", help="continue exactly from RUN/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_pretrain)


__all__ = ["add_parsers", "cmd_pretrain"]
