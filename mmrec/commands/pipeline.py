"""``mmrec pipeline CONFIG.yaml``: pretrain -> extract -> train -> evaluate -> recommend (docs/pipeline.md)."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_pipeline(args: argparse.Namespace) -> int:
    from mmrec.errors import ConfigError
    from mmrec.pipeline import run_pipeline

    if args.pipeline and args.config and args.pipeline != args.config:
        raise ConfigError(f"give the pipeline file once: '{args.pipeline}' or --config '{args.config}'")
    path = args.pipeline or args.config
    if not path:
        raise ConfigError("mmrec pipeline needs a CONFIG.yaml (see docs/pipeline.md)")
    result = run_pipeline(path, overrides=args.overrides, force=args.force, dry_run=args.dry_run)
    width = max(len(s.name) for s in result.stages)
    print(f"\npipeline {path} -> {result.out}")
    for s in result.stages:
        took = f"{s.seconds:8.1f} s" if s.status == "computed" else " " * 10
        print(f"  {s.name:<{width}}  {s.status:<13}  {s.fingerprint[:12]}  {took}  {s.path}")
    return 0


def add_parsers(sub: Any, data_sub: Any, common: Any) -> None:
    p = sub.add_parser("pipeline", help="pretrain -> extract -> train -> evaluate -> recommend, stages reused "
                                        "when unchanged",
                       description="Run the stages of a pipeline YAML (data, out, and one section per stage: "
                                   "pretrain, extract, train (required), evaluate, recommend) with the library "
                                   "calls of the single commands. A stage whose fingerprint (its resolved config, "
                                   "the data files, the fingerprints of the stages it reads) is unchanged and "
                                   "whose outputs exist is reused; otherwise it runs, and so do the stages after "
                                   "it. --set reaches any key: --set train.train.epochs=5.")
    p.add_argument("pipeline", nargs="?", metavar="CONFIG.yaml", help="the pipeline file (or --config)")
    p.add_argument("--force", action="store_true", help="recompute every stage")
    p.add_argument("--dry-run", action="store_true", help="say which stages would be reused or computed; run none")
    common(p)
    p.set_defaults(func=cmd_pipeline)


__all__ = ["add_parsers", "cmd_pipeline"]
