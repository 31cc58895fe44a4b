"""``mmrec`` command line: parses arguments and calls the library (never the reverse)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from mmrec.errors import MMRecError

Handler = Callable[[argparse.Namespace], int]
#: CLI modules, each with ``add_parsers(sub, data_sub, common)`` registering its
#: sub-commands (``pretrain``, ``extract``, ``data shards``, ``data attributes``, ``recommend``,
#: ``export``, ``pipeline``) with ``func`` set.
COMMAND_MODULES = ("mmrec.commands.pretrain", "mmrec.commands.extract", "mmrec.commands.shards",
                   "mmrec.commands.attributes", "mmrec.commands.recommend", "mmrec.commands.export",
                   "mmrec.commands.pipeline")
SPLIT_KINDS = ("fixed", "loo", "random", "temporal", "cold")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with defaults for this command")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set model.dim=32 --set train.lr=0.01")


def _load_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    from mmrec.config import apply_overrides, load_yaml
    raw = load_yaml(args.config) if getattr(args, "config", None) else {}
    return apply_overrides(raw, getattr(args, "overrides", []))


# -- data ------------------------------------------------------------------------
def cmd_data_describe(args: argparse.Namespace) -> int:
    from mmrec.datasets.loading import load_dataset
    opts = _load_config_dict(args)
    data = load_dataset(args.data, args.format, seed=args.seed, **opts)
    info = data.describe()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['name']}: {info['n_users']:,} users x {info['n_items']:,} items; "
          f"behaviors {' -> '.join(info['behaviors'])} (target: {info['target']})")
    width = max(len(b) for b in info["behaviors"])
    for b in info["behaviors"]:
        print(f"  {b:<{width}}  {info['interactions'][b]:>12,}  density {info['density'][b]:.2e}")
    for split, counts in info.get("held_out", {}).items():
        print(f"  held out ({split}): " + ", ".join(f"{b} {n:,}" for b, n in counts.items()))
    for m, entry in info.get("modalities", {}).items():
        print(f"  modality {m}: {entry}")
    if info.get("report"):
        print(f"  load report: {info['report']}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from mmrec.datasets.canonical import write_canonical
    from mmrec.datasets.loading import load_dataset
    data = load_dataset(args.data, args.format, seed=args.seed, **_load_config_dict(args))
    write_canonical(data, Path(args.out))
    print(f"wrote {args.out} ({data.n_users:,} users, {data.n_items:,} items, {len(data.train):,} rows)")
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from mmrec.datasets.canonical import write_canonical
    from mmrec.datasets.synthetic import make_world
    data = make_world(args.preset, seed=args.seed, **_load_config_dict(args))
    write_canonical(data, Path(args.out))
    print(f"wrote synthetic:{args.preset} (seed {args.seed}) to {args.out}: "
          f"{data.n_users:,} users, {data.n_items:,} items, {len(data.train):,} interactions")
    return 0


# -- train / evaluate ---------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from mmrec.train.config import build_run_config
    from mmrec.train.run import train
    cli = {k: getattr(args, k) for k in ("model", "data", "out", "format", "split", "protocol", "seed",
                                           "device", "mode", "fusion", "filtration", "enhancement", "head", "features",
                                           "epochs", "batch_size", "lr", "resume")}
    cfg = build_run_config(args.config, cli, args.overrides)
    if getattr(cfg, "recipe", None):
        print(f"config: {cfg.recipe}")
    metrics = train(cfg)
    kind = f"head {cfg.head}, labelled exposures" if cfg.head else f"{cfg.protocol} ranking"
    print_metrics_table({cfg.model: metrics["metrics"]}, title=f"test ({kind})")
    if "cold_start" in metrics:
        print_metrics_table({cfg.model: metrics["cold_start"]}, title="cold-start items")
    print(f"best epoch {metrics['best_epoch']} of {metrics['epochs']}; wrote {Path(cfg.out) / 'metrics.json'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mmrec.train.run import evaluate
    overrides: dict[str, Any] = {}
    held_out = "test"
    if args.split in ("test", "valid"):
        held_out = args.split
    elif args.split is not None:
        overrides["split"] = args.split
    if args.seed is not None:
        overrides["seed"] = args.seed
    out = evaluate(args.run, data=args.data, protocol=args.protocol, split=held_out, overrides=overrides,
                   cold_items=args.cold_items, metrics_out=args.metrics_out)
    from mmrec.train.run import load_run_config
    head = load_run_config(Path(args.run)).head
    kind = f"head {head}, labelled exposures" if head else f"{out['protocol']} ranking"
    print_metrics_table({out["model"]: out["metrics"]}, title=f"{held_out} ({kind})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmrec.demo import run_demo
    run_demo(Path(args.out), preset=args.preset, seed=args.seed, epochs=args.epochs, quick=args.quick)
    return 0


def print_metrics_table(rows: dict[str, dict[str, float]], title: str = "") -> None:
    """A plain aligned table: one row per model, one column per metric."""
    cols: list[str] = []
    for m in rows.values():
        cols += [c for c in m if c not in cols and isinstance(m[c], (int, float))]
    name_w = max([len("model")] + [len(n) for n in rows])
    widths = [max(len(c), 7) for c in cols]
    if title:
        print(f"\n{title}")
    print("  ".join([f"{'model':<{name_w}}"] + [f"{c:>{w}}" for c, w in zip(cols, widths)]))
    for name, m in rows.items():
        cells = [f"{m[c]:>{w}.4f}" if isinstance(m.get(c), float) else f"{m.get(c, ''):>{w}}"
                 for c, w in zip(cols, widths)]
        print("  ".join([f"{name:<{name_w}}"] + cells))


# -- parser ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect, convert and synthesise datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("describe", help="counts per behavior, users, items, modalities, sparsity")
    p.add_argument("data", help="a dataset directory (any readable format) or synthetic:<preset>")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--format", help="force a format: canonical, csv, mmrec, mbgmn, recbole")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_data_describe)

    p = dsub.add_parser("convert", help="any readable format -> canonical directory")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument("--format")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_data_convert)

    p = dsub.add_parser("synth", help="write the synthetic world to disk")
    p.add_argument("--preset", default="tiny", help="tiny, small or medium")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_data_synth)

    p = sub.add_parser("train", help="train, select on valid, evaluate on test")
    p.add_argument("--data", help="dataset directory or synthetic:<preset>")
    p.add_argument("--model", help="registry name, e.g. bprmf, lightgcn, cigf")
    p.add_argument("--out", help="run directory (default runs/run)")
    p.add_argument("--format")
    p.add_argument("--split", choices=SPLIT_KINDS)
    p.add_argument("--protocol", choices=("full", "sampled"))
    p.add_argument("--seed", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--mode", choices=("two-step", "end2end"))
    p.add_argument("--fusion")
    p.add_argument("--filtration")
    p.add_argument("--enhancement", help="feature enhancement after the fusion: mdr, ghmfc")
    p.add_argument("--head")
    p.add_argument("--features", action="append", help="feature-store file (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN/checkpoint.pt")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate a run")
    p.add_argument("--run", required=True)
    p.add_argument("--data")
    p.add_argument("--protocol", choices=("full", "sampled"))
    p.add_argument("--split", help="test or valid (which held-out rows), or a split kind: " + ", ".join(SPLIT_KINDS))
    p.add_argument("--seed", type=int)
    p.add_argument("--cold-items", help="aligned:PRETRAIN_RUN: score items without training interactions with the "
                                        "content vectors of a pre-training run aligned to this run")
    p.add_argument("--metrics-out", help="write the metrics here instead of RUN/metrics.json")
    _common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="the whole path on the synthetic world, ending in a report")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--preset", default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="fewer models, content models on the world's stored features (no pre-training)")
    _common(p)
    p.set_defaults(func=cmd_demo)

    import importlib
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parsers(sub, dsub, _common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # torch-geometric's import triggers torch's own deprecation notice: noise for CLI users
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    if getattr(args, "split", None) and args.command == "evaluate" and \
            args.split not in ("test", "valid") + SPLIT_KINDS:
        build_parser().error(f"--split must be test, valid or one of {', '.join(SPLIT_KINDS)}")
    try:
        return args.func(args)
    except MMRecError as e:
        print(f"mmrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
