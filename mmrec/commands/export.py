"""``mmrec export``: embedding tables + a faiss index (inner-product runs) or + an ONNX scorer (network models) (docs/recommend.md)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass
class ExportOptions:
    """What ``mmrec export`` takes (``--config`` YAML keys and ``--set`` overrides)."""

    run: str | None = None
    out: str | None = None
    data: str | None = None
    device: str | None = None
    index: bool = True


def cmd_export(args: argparse.Namespace) -> int:
    from mmrec.config import apply_overrides, from_dict, load_yaml
    from mmrec.errors import ConfigError
    from mmrec.export import export_run

    raw: dict[str, Any] = load_yaml(args.config) if args.config else {}
    flags = {"run": args.run, "out": args.out, "data": args.data, "device": args.device}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if args.no_index:
        raw["index"] = False
    # unknown keys: the shared dataclass check (names the key, suggests the closest)
    opts = from_dict(ExportOptions, apply_overrides(raw, args.overrides), path="export")
    for key in ("run", "out"):
        if not getattr(opts, key):
            raise ConfigError(f"export needs --{key}")
    from pathlib import Path

    from mmrec.rundir import output_lock, prepare_run_dir
    # OUT's parent writable and not full before the run is read; OUT.lock beside OUT: one writer per
    # export directory (beside it, so that a refused export leaves no OUT behind)
    prepare_run_dir(Path(opts.out).parent, kind="output directory")
    with output_lock(opts.out, "export"):
        report = export_run(opts.run, opts.out, data=opts.data, device=opts.device, index=opts.index)
    print(f"wrote {report.out}: {report.model} representations of {report.n_users:,} users and {report.n_items:,} "
          f"items (dim {report.dim}); files: {', '.join(report.files)}")
    return 0


def add_parsers(sub: Any, data_sub: Any, common: Any) -> None:
    p = sub.add_parser("export", help="user / item embeddings (safetensors) and a faiss index or an ONNX scorer",
                       description="For models whose score is a plain inner product of user and item embeddings "
                                   "(bprmf, lightgcn, vbpr, the multimodal graph models): write the embedding "
                                   "tables (safetensors), the id of each row, a faiss IndexFlatIP over items and "
                                   "export.json. For cigf, mbgmn, sasrec, nova and history: the tables their "
                                   "scoring network reads and the network as scorer.onnx (per-user inputs, items "
                                   "table -> scores; export.json lists the inputs; needs mmrec[export]). Other "
                                   "models are refused: serve them with mmrec recommend.")
    p.add_argument("--run", help="run directory written by mmrec train")
    p.add_argument("--out", help="output directory")
    p.add_argument("--data", help="the run's data, when it moved (must hold the same user and item ids)")
    p.add_argument("--device", help="auto, cpu, cuda ... (default: the run's)")
    p.add_argument("--no-index", action="store_true", help="no faiss index (no faiss needed; ONNX exports have none)")
    common(p)
    p.set_defaults(func=cmd_export)
