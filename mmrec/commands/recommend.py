"""``mmrec recommend``: top-K original item ids per original user id from a run (docs/recommend.md)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_recommend(args: argparse.Namespace) -> int:
    from mmrec.config import apply_overrides, from_dict, load_yaml
    from mmrec.recommend import RecommendConfig, run_recommend

    raw: dict[str, Any] = load_yaml(args.config) if args.config else {}
    flags = {"run": args.run, "out": args.out, "users": args.users, "k": args.k, "batch_size": args.batch_size,
             "data": args.data, "device": args.device, "cold_items": args.cold_items}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.all:
        raw["all"] = True
    if args.include_seen:
        raw["include_seen"] = True
    if args.no_progress:
        raw["progress"] = False
    cfg = from_dict(RecommendConfig, apply_overrides(raw, args.overrides))
    report = run_recommend(cfg)
    if report.unknown:
        print(f"{len(report.unknown):,} of {report.n_requested:,} user ids are not in the run's data: "
              f"listed in {report.unknown_path}")
    seen = "seen items included" if cfg.include_seen else "seen items excluded"
    print(f"wrote {report.out}: top-{cfg.k} for {report.n_users:,} users ({report.n_rows:,} rows, {seen}) "
          f"in {report.seconds:.1f} s")
    return 0


def add_parsers(sub: Any, data_sub: Any, common: Any) -> None:
    p = sub.add_parser("recommend", help="top-K original item ids per original user id from a trained run",
                       description="Load a trained run (its config, data, selected weights) and write the top-K "
                                   "items of each user: columns user, rank, item, score. Items the user had in "
                                   "training (target behavior; plus validation positives) are excluded, as the "
                                   "full-ranking evaluator excludes them. Unknown user ids are counted and listed "
                                   "in OUT's stem + .unknown_users.txt.")
    p.add_argument("--run", help="run directory written by mmrec train")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--users", metavar="FILE", help="one original user id per line (a header line 'user' allowed)")
    who.add_argument("--all", action="store_true", help="every user of the run's data (the default)")
    p.add_argument("--k", type=int, help="items per user (default 20)")
    p.add_argument("--out", help="output file: .parquet or .tsv")
    p.add_argument("--include-seen", action="store_true", help="do not exclude the users' training items")
    p.add_argument("--batch-size", type=int, help="users scored at once (default: the run's train.eval_batch_size)")
    p.add_argument("--data", help="the run's data, when it moved (must hold the same user and item ids)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (default: the run's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cold-items", help="aligned:PRETRAIN_RUN: rank items without training interactions by the "
                                        "content vectors of a pre-training run aligned to this run")
    common(p)
    p.set_defaults(func=cmd_recommend)
