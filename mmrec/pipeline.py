"""``mmrec pipeline CONFIG.yaml``: pretrain -> extract -> train -> evaluate -> recommend, reusing stages.

One YAML file holds the data, an output directory and one section per stage::

    data: synthetic:tiny
    out: runs/pipeline
    seed: 0                      # format, seed, device: defaults for every stage
    pretrain: {modalities: [text], train: {max_steps: 20}}   # PretrainConfig keys
    extract: {batch_size: 64}                                 # ExtractConfig keys
    train: {model: vbpr, fusion: attention, train: {epochs: 5}}   # RunConfig keys (required)
    evaluate: [sampled]                                       # or {protocols: [...], split: test}
    recommend: {k: 10}                                        # RecommendConfig keys (+ format)

Every stage writes under ``out/`` (``pretrain/``, ``features.safetensors``, ``train/``,
``evaluate/<protocol>/``, ``recs.tsv``) and, once it finished, ``out/fingerprints/<stage>.json``:
a SHA-256 of the stage's resolved config, the fingerprints of the stages it reads, the data
(spec plus the content hash of every data file; size and mtime for files over
:data:`HASH_LIMIT`), the files it reads from outside the pipeline (``--features`` files, a
``users`` file) and the mmrec version. A stage whose fingerprint is unchanged and whose outputs
exist is reused; otherwise it runs, and so does every stage after it (make-like, but a stage
is keyed by what it was computed from, not by timestamps).

Library calls only (no subprocesses): :func:`mmrec.pretrain.run.pretrain`,
:func:`mmrec.pretrain.extract.run_extract`, :func:`mmrec.train.run.train` /
:func:`~mmrec.train.run.evaluate`, :func:`mmrec.recommend.run_recommend`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from mmrec.config import apply_overrides, from_dict, load_yaml
from mmrec.errors import ConfigError, MMRecError
from mmrec.io import write_json
from mmrec.registry import Registry

Log = Callable[[str], None]

#: Stages in the order they run; each is registered in :data:`STAGES` under its YAML key.
STAGE_ORDER = ("pretrain", "extract", "train", "evaluate", "recommend")
#: Top-level keys that are not stages; ``format``, ``seed``, ``device`` are defaults for every stage.
COMMON_KEYS = ("data", "out", "format", "seed", "device")
#: Files up to this size are fingerprinted by content, larger ones by size and mtime.
HASH_LIMIT = 64 * 2 ** 20
#: Keys that change how a stage reports, never what it computes: left out of fingerprints.
COSMETIC_KEYS = frozenset({"progress"})
FINGERPRINTS = "fingerprints"
HASH_CACHE = "file-hashes.json"   # in FINGERPRINTS: content hashes by path, size and mtime
SUMMARY = "pipeline.json"

STAGES: Registry = Registry("pipeline stage")


# -- configuration ----------------------------------------------------------------------------
@dataclass
class PipelineConfig:
    """The YAML file: data, output directory, stage defaults and one section per stage."""

    data: str | None = None
    out: str | None = None
    format: str | None = None
    seed: int = 0
    device: str = "auto"
    pretrain: dict[str, Any] | None = None
    extract: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    evaluate: Any = None          # [protocol, ...] or {protocols: [...], split: test|valid}
    recommend: dict[str, Any] | None = None
    source: str = "<dict>"        # where it came from, for error messages


def load_pipeline_config(raw: dict[str, Any] | str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Parse a pipeline YAML (a path or an already loaded dict) plus ``--set`` overrides."""
    source = "<dict>"
    if isinstance(raw, (str, Path)):
        source = str(raw)
        raw = load_yaml(raw)
    raw = json.loads(json.dumps(raw, default=str))  # a deep copy
    if isinstance(raw.get("train"), dict) and isinstance(raw["train"].get("model"), str):
        raw["train"]["model"] = {"name": raw["train"]["model"]}  # so that --set train.model.dim=32 works
    raw = apply_overrides(raw, overrides)
    unknown = sorted(set(raw) - set(STAGE_ORDER) - set(COMMON_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(repr(k) for k in unknown)}; stages: "
                          f"{', '.join(STAGE_ORDER)}; other keys: {', '.join(COMMON_KEYS)}")
    for key in ("data", "out"):
        if not raw.get(key):
            raise ConfigError(f"{source}: '{key}' is required (the dataset, and the directory every stage writes to)")
    if raw.get("train") is None:
        raise ConfigError(f"{source}: the 'train' stage is required (a RunConfig mapping, e.g. {{model: lightgcn}})")
    for key in ("pretrain", "extract", "train", "recommend"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping of that stage's keys, got {raw[key]!r}")
    try:
        cfg = from_dict(PipelineConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    cfg.source = source
    return cfg


# -- fingerprints -----------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str | Path, exclude: Iterable[Path] = (),
                     cache: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """What a file or directory holds: per file its size and content hash (size + mtime when large).

    Hidden files and directories (``.mmrec-cache``, editors' files) and ``exclude`` are skipped.
    ``cache`` (absolute path -> size, mtime_ns, sha256; filled in here) skips re-reading a file
    whose size and mtime are those of its cached hash, as git's index and DVC do: a run over
    100k images reads them once, not at every pipeline run.
    """
    root = Path(path)
    if not root.exists():
        raise MMRecError(f"not found: {root}")
    skip = {Path(p).resolve() for p in exclude}
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and not any(p.resolve().is_relative_to(s) for s in skip))
    out: dict[str, Any] = {}
    for p in files:
        st = p.stat()
        key = "." if p == root else p.relative_to(root).as_posix()
        if st.st_size > HASH_LIMIT:
            out[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            continue
        where = str(p.absolute())
        hit = (cache or {}).get(where)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            sha = hit["sha256"]
        else:
            sha = _sha256_file(p)
            if cache is not None:
                cache[where] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        out[key] = {"size": st.st_size, "sha256": sha}
    return out


def data_fingerprint(spec: str, exclude: Iterable[Path] = (),
                     cache: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The data a pipeline reads: ``synthetic:<preset>`` is its spec (the world is a function of
    the preset and the seed, which is in each stage's config); a directory is its files."""
    from mmrec.datasets.loading import SYNTHETIC_PREFIX
    if spec.startswith(SYNTHETIC_PREFIX):
        return {"spec": spec}
    return {"spec": spec, "files": file_fingerprint(spec, exclude, cache)}


def _strip_cosmetic(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_cosmetic(v) for k, v in obj.items() if k not in COSMETIC_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_strip_cosmetic(v) for v in obj]
    return obj


def digest(obj: Any) -> str:
    """SHA-256 of a JSON-able object in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


# -- stages -----------------------------------------------------------------------------------
@dataclass
class Plan:
    """One stage, resolved: its config (the library call's), outputs and what it reads."""

    name: str
    config: Any                                       # the stage's config dataclass
    outputs: list[Path]                               # all must exist for the stage to be reused
    owned: list[Path]                                 # removed before the stage recomputes
    inputs: list[str] = field(default_factory=list)   # earlier stages whose outputs it reads
    files: list[str] = field(default_factory=list)    # files from outside the pipeline it reads

    def resolved(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


@dataclass
class StageResult:
    name: str
    status: str              # "computed" or "reused"
    fingerprint: str
    reason: str              # why it was computed (or "unchanged")
    seconds: float
    path: str                # the stage's run directory or file
    outputs: list[str]       # the files whose presence makes it reusable
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineResult:
    out: Path
    stages: list[StageResult]

    def status(self) -> dict[str, str]:
        return {s.name: s.status for s in self.stages}

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)


def _section(p: PipelineConfig, name: str, forbidden: dict[str, str]) -> dict[str, Any]:
    """A stage's section with the pipeline's defaults; keys the pipeline sets itself are refused."""
    section = dict(getattr(p, name) or {})
    for key, why in forbidden.items():
        if key in section:
            raise ConfigError(f"{p.source}: '{name}.{key}' is set by the pipeline ({why}); remove it")
    for key in ("format", "seed", "device"):
        section.setdefault(key, getattr(p, key))
    return section


def _checked(p: PipelineConfig, name: str, build: Callable[[], Any]) -> Any:
    """Run ``build`` with errors prefixed by the YAML file and the stage's key."""
    try:
        return build()
    except MMRecError as e:
        raise ConfigError(f"{p.source}: stage '{name}': {e}") from None


@STAGES.register("pretrain")
class PretrainStage:
    """Contrastive alignment pre-training (docs/pretraining.md) into ``out/pretrain``."""

    @staticmethod
    def plan(p: PipelineConfig, out: Path, plans: dict[str, Plan]) -> Plan:
        from mmrec.pretrain.config import PretrainConfig, validate, with_defaults
        raw = _section(p, "pretrain", {"data": "the pipeline's 'data'", "out": "out/pretrain"})
        if isinstance(raw.get("train"), dict) and raw["train"].get("resume"):
            raise ConfigError(f"{p.source}: 'pretrain.train.resume' is set by the pipeline (a stage runs from scratch)")
        raw.update(data=p.data, out=str(out / "pretrain"))
        cfg = _checked(p, "pretrain", lambda: validate(from_dict(PretrainConfig, with_defaults(raw), "pretrain")))
        run = out / "pretrain"
        files = [cfg.behavior.run] if cfg.behavior.run else []
        if cfg.loader.shards:
            files.append(cfg.loader.shards)
        return Plan("pretrain", cfg, [run / "encoders.json", run / "encoders.safetensors", run / "metrics.json"],
                    [run], files=files)

    @staticmethod
    def run(plan: Plan, log: Log) -> dict[str, Any]:
        from mmrec.pretrain.run import pretrain
        out = pretrain(plan.config, log=log)
        if out.get("interrupted"):
            raise MMRecError("pre-training stopped early (pretrain.train.stop_after); remove it to run the pipeline")
        return {"metrics": out.get("metrics", {}), "steps": out.get("steps")}


@STAGES.register("extract")
class ExtractStage:
    """Item features for every item into ``out/features.safetensors``: the pretrain stage's
    aligned embeddings, or frozen backbone features when there is no pretrain stage."""

    @staticmethod
    def plan(p: PipelineConfig, out: Path, plans: dict[str, Plan]) -> Plan:
        from mmrec.pretrain.extract import ExtractConfig
        raw = _section(p, "extract", {"data": "the pipeline's 'data'", "out": "out/features.safetensors",
                                       "run": "the pretrain stage's run, when there is one"})
        raw.update(data=p.data, out=str(out / "features.safetensors"))
        inputs = []
        if "pretrain" in plans:
            raw["run"] = str(plans["pretrain"].config.out)
            inputs = ["pretrain"]
        cfg = _checked(p, "extract", lambda: from_dict(ExtractConfig, raw, "extract"))
        if cfg.run and (cfg.encoders or cfg.pretrained):
            raise ConfigError(f"{p.source}: 'extract.encoders' / 'extract.pretrained' choose frozen encoders; "
                              f"with a pretrain stage the features come from its run")
        target = Path(cfg.out)
        return Plan("extract", cfg, [target], [target], inputs=inputs)

    @staticmethod
    def run(plan: Plan, log: Log) -> dict[str, Any]:
        from mmrec.pretrain.extract import run_extract
        report = run_extract(plan.config, log=log)
        return {"tables": report.tables, "bad_media": report.bad_media}


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@STAGES.register("train")
class TrainStage:
    """``mmrec train`` into ``out/train``; the extract stage's file joins ``features``.

    ``recipe`` (not a RunConfig key): the YAML the section is laid over. Omitted, it is
    ``configs/<model>.yaml`` when the checkout has one, as for ``mmrec train --model M``;
    ``null`` means none.
    """

    @staticmethod
    def plan(p: PipelineConfig, out: Path, plans: dict[str, Plan]) -> Plan:
        from mmrec.models.base import model_config
        from mmrec.train.config import _normalise, default_recipe, run_config_from_dict
        from mmrec.train.run import model_args
        raw = _section(p, "train", {"data": "the pipeline's 'data'", "out": "out/train",
                                     "resume": "a changed stage runs from scratch"})
        recipe = raw.pop("recipe", "default")
        section = _normalise(raw)
        if recipe == "default":
            name = section.get("model")
            recipe = default_recipe(name) if isinstance(name, str) else None
        base: dict[str, Any] = {}
        if recipe:
            base = _normalise(load_yaml(recipe))
            if section.get("model") not in (None, base.get("model")):
                raise ConfigError(f"{p.source}: 'train.recipe' {recipe} is for model '{base.get('model')}', "
                                  f"but train.model is '{section['model']}'")
        merged = _merge(base, section)
        merged.update(data=p.data, out=str(out / "train"))
        files = [str(f) for f in merged.get("features") or []]
        inputs = []
        if "extract" in plans:
            merged["features"] = files + [str(plans["extract"].config.out)]
            inputs = ["extract"]
        cfg = _checked(p, "train", lambda: run_config_from_dict(merged, "train"))
        _checked(p, "train", lambda: model_config(cfg.model, model_args(cfg)))  # bad model keys: now, not later
        cfg.recipe = str(recipe) if recipe else None  # type: ignore[attr-defined]
        run = Path(cfg.out)
        return Plan("train", cfg, [run / "config.yaml", run / "best.safetensors", run / "metrics.json"], [run],
                    inputs=inputs, files=files)

    @staticmethod
    def run(plan: Plan, log: Log) -> dict[str, Any]:
        from mmrec.train.run import train
        recipe = getattr(plan.config, "recipe", None)
        if recipe:
            log(f"  recipe: {recipe}")
        metrics = train(plan.config)
        return {"protocol": metrics["protocol"], "metrics": metrics["metrics"], "best_epoch": metrics["best_epoch"],
                "epochs": metrics["epochs"]}


@dataclass
class EvaluateConfig:
    """The evaluate stage: re-score the trained run with each protocol (``mmrec evaluate``)."""

    protocols: list[str] = field(default_factory=lambda: ["sampled"])
    split: str = "test"          # which held-out rows: test or valid
    run: str = ""                # set by the pipeline: the train stage's run
    out: str = ""                # set by the pipeline: out/evaluate


@STAGES.register("evaluate")
class EvaluateStage:
    """``mmrec evaluate`` per protocol into ``out/evaluate/<protocol>/`` (a copy of the run:
    ``evaluate`` rewrites a run's metrics.json, and the train stage's must stay as trained)."""

    @staticmethod
    def plan(p: PipelineConfig, out: Path, plans: dict[str, Plan]) -> Plan:
        raw = p.evaluate
        if isinstance(raw, (list, str)):
            raw = {"protocols": raw}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p.source}: 'evaluate' must be a list of protocols or a mapping "
                              f"{{protocols: [...], split: test}}, got {raw!r}")
        for key in ("run", "out"):
            if key in raw:
                raise ConfigError(f"{p.source}: 'evaluate.{key}' is set by the pipeline; remove it")
        raw = {**raw, "run": str(plans["train"].config.out), "out": str(out / "evaluate")}
        cfg = _checked(p, "evaluate", lambda: from_dict(EvaluateConfig, raw, "evaluate"))
        bad = [x for x in cfg.protocols if x not in ("full", "sampled")]
        if bad or not cfg.protocols or len(set(cfg.protocols)) != len(cfg.protocols):
            raise ConfigError(f"{p.source}: 'evaluate.protocols' must list distinct protocols among full, sampled; "
                              f"got {cfg.protocols}")
        if cfg.split not in ("test", "valid"):
            raise ConfigError(f"{p.source}: 'evaluate.split' must be test or valid, not '{cfg.split}'")
        root = Path(cfg.out)
        return Plan("evaluate", cfg, [root / x / "metrics.json" for x in cfg.protocols], [root], inputs=["train"])

    @staticmethod
    def run(plan: Plan, log: Log) -> dict[str, Any]:
        from mmrec.train.run import evaluate
        cfg: EvaluateConfig = plan.config
        run, summary = Path(cfg.run), {}
        for protocol in cfg.protocols:
            view = Path(cfg.out) / protocol
            view.mkdir(parents=True, exist_ok=True)
            for name in ("config.yaml", "metrics.json"):
                shutil.copy2(run / name, view / name)
            _link_or_copy(run / "best.safetensors", view / "best.safetensors")
            result = evaluate(view, protocol=protocol, split=cfg.split)
            summary[protocol] = result["metrics"]
            log(f"  {protocol}: " + ", ".join(f"{k} {v:.4f}" for k, v in list(result["metrics"].items())[:4]
                                              if isinstance(v, float)))
        write_json(Path(cfg.out) / "metrics.json", {"split": cfg.split, "metrics": summary})
        return {"metrics": summary}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # weights are only read: a hard link costs no space
    except OSError:
        shutil.copy2(src, dst)


@STAGES.register("recommend")
class RecommendStage:
    """``mmrec recommend`` from the train stage's run into ``out/recs.tsv`` (``format: parquet``:
    ``out/recs.parquet``)."""

    @staticmethod
    def plan(p: PipelineConfig, out: Path, plans: dict[str, Plan]) -> Plan:
        from mmrec.recommend import RecommendConfig
        raw = dict(p.recommend or {})
        for key, why in (("run", "the train stage's run"), ("out", "out/recs.<format>"),
                         ("data", "the pipeline's 'data'")):
            if key in raw:
                raise ConfigError(f"{p.source}: 'recommend.{key}' is set by the pipeline ({why}); remove it")
        fmt = raw.pop("format", "tsv")
        if fmt not in ("tsv", "parquet"):
            raise ConfigError(f"{p.source}: 'recommend.format' must be tsv or parquet, not '{fmt}'")
        raw.update(run=str(plans["train"].config.out), out=str(out / f"recs.{fmt}"))
        if not raw.get("users"):
            raw.setdefault("all", True)
        cfg = _checked(p, "recommend", lambda: from_dict(RecommendConfig, raw, "recommend"))
        if cfg.users and cfg.all:
            raise ConfigError(f"{p.source}: give 'recommend.users' or 'recommend.all', not both")
        if cfg.k < 1:
            raise ConfigError(f"{p.source}: 'recommend.k' must be at least 1, got {cfg.k}")
        target = Path(cfg.out)
        owned = [target, target.with_name(target.stem + ".unknown_users.txt")]
        return Plan("recommend", cfg, [target], owned, inputs=["train"], files=[cfg.users] if cfg.users else [])

    @staticmethod
    def run(plan: Plan, log: Log) -> dict[str, Any]:
        from mmrec.recommend import run_recommend
        report = run_recommend(plan.config)
        if report.unknown:
            log(f"  {len(report.unknown):,} of {report.n_requested:,} user ids are not in the data: "
                f"listed in {report.unknown_path}")
        return {"users": report.n_users, "rows": report.n_rows, "unknown_users": len(report.unknown)}


# -- running ----------------------------------------------------------------------------------
def plan_pipeline(cfg: PipelineConfig) -> list[Plan]:
    """Resolve every stage's config before anything runs, so a bad key fails in seconds."""
    out = Path(cfg.out)  # type: ignore[arg-type]
    plans: dict[str, Plan] = {}
    for name in STAGE_ORDER:
        if getattr(cfg, name) is None:
            continue
        plans[name] = STAGES.get(name).plan(cfg, out, plans)
    return list(plans.values())


def stage_fingerprints(plans: list[Plan], data: dict[str, Any],
                       cache: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Each stage's fingerprint record: its config, its upstream fingerprints, the data, its files."""
    from mmrec import __version__
    records: dict[str, dict[str, Any]] = {}
    for plan in plans:
        record = {"stage": plan.name, "mmrec": __version__,
                  "config": _strip_cosmetic(plan.resolved()),
                  "inputs": {s: records[s]["fingerprint"] for s in plan.inputs},
                  "data": digest(data),
                  "files": {f: _input_file(plan.name, f, cache) for f in plan.files}}
        record["fingerprint"] = digest(record)
        records[plan.name] = record
    return records


def _input_file(stage: str, path: str, cache: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    if not Path(path).exists():
        raise ConfigError(f"stage '{stage}' reads {path}, which does not exist")
    return file_fingerprint(path, cache=cache)


def _load_hash_cache(out: Path) -> dict[str, dict[str, Any]]:
    try:
        cache = json.loads((out / FINGERPRINTS / HASH_CACHE).read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _fingerprint_path(out: Path, stage: str) -> Path:
    return out / FINGERPRINTS / f"{stage}.json"


def _previous(out: Path, stage: str) -> str | None:
    path = _fingerprint_path(out, stage)
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def run_pipeline(cfg: PipelineConfig | dict[str, Any] | str | Path, *, overrides: Iterable[str] = (),
                 force: bool = False, dry_run: bool = False, log: Log = print) -> PipelineResult:
    """Run the stages in order, reusing each whose fingerprint and outputs are unchanged.

    ``force``: recompute every stage. ``dry_run``: only say what would be reused or computed
    (status ``"would compute"``).
    """
    if not isinstance(cfg, PipelineConfig):
        cfg = load_pipeline_config(cfg, overrides)
    plans = plan_pipeline(cfg)
    out = Path(cfg.out)  # type: ignore[arg-type]
    cache = _load_hash_cache(out)
    known = dict(cache)
    data = data_fingerprint(str(cfg.data), exclude=[out], cache=cache)
    records = stage_fingerprints(plans, data, cache)  # a missing input file is reported before out/ is made
    if dry_run:  # reads only: no lock (it may report a stage another process is computing as missing)
        return _run_stages(cfg, plans, out, records, force=force, dry_run=True, log=log)
    from mmrec.rundir import prepare_run_dir, run_lock
    # one pipeline per out/ for the whole call: two would remove each other's stage outputs
    # (each train / pretrain stage also locks its own run directory, out/train/.lock ...)
    with run_lock(prepare_run_dir(out, kind="pipeline directory"), "pipeline", kind="pipeline directory"):
        if cache != known:
            write_json(out / FINGERPRINTS / HASH_CACHE, cache)
        return _run_stages(cfg, plans, out, records, force=force, dry_run=False, log=log)


def _run_stages(cfg: PipelineConfig, plans: list[Plan], out: Path, records: dict[str, dict[str, Any]], *,
                force: bool, dry_run: bool, log: Log) -> PipelineResult:
    if not dry_run:
        (out / SUMMARY).unlink(missing_ok=True)  # pipeline.json describes a run that finished
    results: list[StageResult] = []
    cascade: str | None = "--force" if force else None  # set once a stage runs: every later one runs too
    for plan in plans:
        record = records[plan.name]
        fp = record["fingerprint"]
        previous = _previous(out, plan.name)
        missing = [str(o) for o in plan.outputs if not o.exists()]
        if cascade is None and previous == fp and not missing:
            log(f"stage {plan.name}: reused (fingerprint {fp[:12]})")
            results.append(StageResult(plan.name, "reused", fp, "unchanged", 0.0, str(plan.owned[0]),
                                       [str(o) for o in plan.outputs]))
            continue
        own = ("first run" if previous is None else "config, data or inputs changed" if previous != fp else
               f"outputs missing: {', '.join(missing)}" if missing else None)
        reason = ("--force" if force else None) or own or str(cascade)
        if dry_run:
            log(f"stage {plan.name}: would compute ({reason}; fingerprint {fp[:12]})")
            results.append(StageResult(plan.name, "would compute", fp, reason, 0.0, str(plan.owned[0]),
                                       [str(o) for o in plan.outputs]))
            cascade = cascade or f"stage {plan.name} would be recomputed"
            continue
        log(f"stage {plan.name}: computing ({reason}; fingerprint {fp[:12]})")
        _fingerprint_path(out, plan.name).unlink(missing_ok=True)  # an interrupted stage is never reused
        for path in plan.owned:
            _remove(path)
        t0 = time.perf_counter()
        summary = json.loads(json.dumps(STAGES.get(plan.name).run(plan, log), default=str))  # plain JSON types
        seconds = time.perf_counter() - t0
        absent = [str(o) for o in plan.outputs if not o.exists()]
        if absent:
            raise MMRecError(f"stage {plan.name} finished without writing {', '.join(absent)}")
        write_json(_fingerprint_path(out, plan.name),
                   {**record, "seconds": round(seconds, 3), "finished": time.time(),
                    "outputs": [str(o) for o in plan.outputs]})
        log(f"stage {plan.name}: done in {seconds:.1f} s")
        results.append(StageResult(plan.name, "computed", fp, reason, seconds, str(plan.owned[0]),
                                   [str(o) for o in plan.outputs], summary))
        cascade = f"stage {plan.name} was recomputed"
    result = PipelineResult(out, results)
    if not dry_run:
        write_json(out / SUMMARY, {"config": cfg.source, "data": cfg.data,
                                   "stages": [dataclasses.asdict(s) for s in results]})
    return result


__all__ = ["COMMON_KEYS", "EvaluateConfig", "PipelineConfig", "PipelineResult", "Plan", "STAGES", "STAGE_ORDER",
           "StageResult", "data_fingerprint", "file_fingerprint", "load_pipeline_config", "plan_pipeline",
           "run_pipeline", "stage_fingerprints"]
