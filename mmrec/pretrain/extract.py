"""Frozen feature extraction: every item through the encoders, batched and resumable.

    encoders = frozen_encoders(["image", "text"])        # shipped weights, backbone features
    report = extract_features(data, encoders, "items.safetensors")
    # or a pre-training run's aligned (projected) embeddings:
    report = extract_features(data, load_encoders(run), "items.safetensors", project=True)

Why chunks: a large catalog takes hours on a CPU, and a crash must not cost the
work already done. Items are processed in chunks of ``chunk_size``; each finished
chunk is written atomically to ``OUT.partial/chunk-XXXXX.safetensors`` and a rerun
skips it (``OUT.partial/manifest.json`` records what was being extracted, so chunks
of another extraction are never mixed in). ``OUT`` appears, atomically, only when
every chunk is done; then ``OUT.partial/`` is removed. Nothing partial looks complete.
A catalog of one chunk has nothing to resume: it is assembled in memory, without the
partial directory or the manifest (whose weight hash costs ~0.2 s for MiniLM + a ViT).

Items whose media is missing or does not decode get mask False and a zero row; they
are counted per modality and reason (printed, and in the file's ``bad_media``
metadata), never a crash. See docs/extraction.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn import functional as F

from mmrec.datasets.features import FUSED, write_feature_tables
from mmrec.datasets.schema import Dataset, FeatureTable, n_present
from mmrec.encoders.base import DEFAULT_NAME, Batch, Encoder, create_encoder
from mmrec.encoders.robust import BadMedia, preprocess_robust
from mmrec.encoders.weights import known_weights
from mmrec.errors import ConfigError, MMRecError
from mmrec.io import atomic_path, write_json
from mmrec.rundir import check_free_space, holds_output

#: Modalities that come from item content (a run's behavior encoder is not extracted).
CONTENT_MODALITIES = ("image", "text", "audio")
PARTIAL_SUFFIX = ".partial"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FUSE_MODES = ("auto", "mean", "none")


# -- item content, one sequence per modality -----------------------------------------
class _TextView(Sequence[str]):
    """``item_text(i)`` on access: all text columns joined (lazy, picklable)."""

    def __init__(self, items: Any, n: int) -> None:
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        return self.items.item_text(int(i))


def content_view(data: Dataset, modality: str) -> Sequence[Any] | None:
    """The raw content of every item for one modality, or None when the dataset has none."""
    items = data.items
    if modality == "text":
        return _TextView(items, data.n_items) if items.text else None
    if modality not in ("image", "audio"):
        raise ConfigError(f"'{modality}' is not an item-content modality ({', '.join(CONTENT_MODALITIES)})")
    seq = getattr(items, modality, None)
    if seq is None or len(seq) != data.n_items or n_present(seq) == 0:
        return None
    return seq


def available_modalities(data: Dataset) -> list[str]:
    """Content modalities for which the dataset has raw content."""
    return [m for m in CONTENT_MODALITIES if content_view(data, m) is not None]


_FAILED = object()


def prepare_batch(encoders: dict[str, Encoder], views: dict[str, Sequence[Any]], ids: Sequence[str],
                  idx: Sequence[int]) -> tuple[dict[str, tuple[Batch | None, torch.Tensor]], BadMedia]:
    """Preprocess items ``idx`` for every modality: ``{m: (batch of good rows, ok mask)}`` + counts.

    Runs on the CPU (in DataLoader workers when there are any); bad items are
    left out and counted, never raised.
    """
    bad = BadMedia()
    out: dict[str, tuple[Batch | None, torch.Tensor]] = {}
    for m, enc in encoders.items():
        raws: list[Any] = []
        for i in idx:
            try:  # reading a lazy view can fail too (a renderer, a file): that item only
                raws.append(views[m][i])
            except Exception as e:  # noqa: BLE001 - any read/decode error marks this item's media bad
                bad.add(m, "corrupt", f"{ids[i]}: {type(e).__name__}: {e}"[:200])
                raws.append(_FAILED)
        good = [k for k, r in enumerate(raws) if r is not _FAILED]
        ok = torch.zeros(len(idx), dtype=torch.bool)
        batch = None
        if good:
            batch, ok_good = preprocess_robust(enc, [raws[k] for k in good], m, bad, [ids[idx[k]] for k in good])
            ok[torch.tensor(good, dtype=torch.long)] = ok_good
        out[m] = (batch, ok)
    return out, bad


class _Batches(torch.utils.data.Dataset):
    """Batch ``k`` -> its key and preprocessed inputs (what DataLoader workers run)."""

    def __init__(self, encoders: dict[str, Encoder], views: dict[str, Sequence[Any]], ids: Sequence[str],
                 batches: list[tuple[int, int, int]]) -> None:
        self.encoders, self.views, self.ids, self.batches = encoders, views, ids, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        chunk, b0, b1 = self.batches[k]
        prepared, bad = prepare_batch(self.encoders, self.views, self.ids, range(b0, b1))
        return (chunk, b0, b1), prepared, bad


def _identity(x: Any) -> Any:
    return x


# -- encoders -------------------------------------------------------------------------
def resolve_device(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def frozen_encoders(modalities: Sequence[str], names: dict[str, str] | None = None,
                    pretrained: dict[str, str] | None = None, device: str | torch.device = "cpu",
                    seed: int = 0, log: Callable[[str], None] | None = None) -> dict[str, Encoder]:
    """Backbones without a projection head, in eval mode, gradients off.

    ``names``: encoder name per modality (default :data:`DEFAULT_NAME`: EfficientNet-Lite0,
    all-MiniLM-L6-v2, logmel-cnn); ``pretrained``: a local weights path per modality
    (default "auto": shipped weights when known). A backbone without weights is built
    from ``seed`` (so its features are reproducible) and ``log`` says so.
    """
    names, pretrained = dict(names or {}), dict(pretrained or {})
    unknown = sorted((set(names) | set(pretrained)) - set(CONTENT_MODALITIES))
    if unknown:
        raise ConfigError(f"--encoder/--pretrained for unknown modality {unknown}; known: {', '.join(CONTENT_MODALITIES)}")
    out: dict[str, Encoder] = {}
    for m in modalities:
        name = names.get(m) or DEFAULT_NAME[m]
        weights: Any = pretrained.get(m, "auto")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = create_encoder(m, name, pretrained=weights, embed_dim=None)
        if weights == "auto" and known_weights(m, name) is None and not Path(name).expanduser().is_dir() and log:
            log(f"note: no pretrained weights are known for {m} encoder '{name}': random init (seed {seed})")
        out[m] = _freeze(enc, device)
    return out


def _freeze(enc: Encoder, device: str | torch.device) -> Encoder:
    enc = enc.to(resolve_device(device)).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def output_dim(enc: Encoder, project: bool) -> int:
    return int(enc.embed_dim if project else enc.backbone_dim)


def _encode(enc: Encoder, batch: Batch, project: bool) -> torch.Tensor:
    with torch.no_grad():
        z = enc(batch) if project else enc.encode(enc.to_device(batch))
    return z.detach().float().cpu()


# -- fusion ---------------------------------------------------------------------------
def fuse_tables(tables: dict[str, FeatureTable], how: str = "auto") -> FeatureTable | None:
    """Mean of the L2-normalised modality vectors over the modalities each item has.

    ``auto``: fuse when there are two or more modalities of one size, else None
    (backbone features of different sizes have no common space: models project
    each modality themselves, see mmrec/fusion/content.py); ``mean``: the same but
    a size mismatch is an error; ``none``: no fused table. An item without any
    modality has mask False and a zero row. The mean is not re-normalised.
    """
    if how not in FUSE_MODES:
        raise ConfigError(f"fuse must be one of {', '.join(FUSE_MODES)}, not '{how}'")
    if how == "none" or len(tables) < 2:
        return None
    dims = {m: t.dim for m, t in tables.items()}
    if len(set(dims.values())) > 1:
        if how == "mean":
            raise ConfigError(f"cannot average modalities of different sizes {dims}; use fuse=auto or none "
                              "(or extract a pre-training run's projected embeddings, which share one size)")
        return None
    mods = sorted(tables)
    total = torch.zeros_like(tables[mods[0]].features)
    count = torch.zeros(total.shape[0])
    for m in mods:
        t = tables[m]
        total += F.normalize(t.features, dim=-1) * t.mask.unsqueeze(1).float()
        count += t.mask.float()
    mask = count > 0
    fused = torch.where(mask.unsqueeze(1), total / count.clamp(min=1).unsqueeze(1), torch.zeros(()))
    return FeatureTable(fused, mask, {"how": "mean of L2-normalised embeddings over the modalities present",
                                      "modalities": ",".join(mods), "present": str(int(mask.sum()))})


# -- the extraction -----------------------------------------------------------------
@dataclass
class ExtractReport:
    """What an extraction did (printed by the CLI, returned to callers to log)."""

    out: str
    n_items: int
    tables: dict[str, dict[str, Any]]
    bad_media: dict[str, int]
    bad_examples: dict[str, str]
    chunks: int
    chunks_reused: int
    items_encoded: int
    seconds: float
    projected: bool
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def items_per_second(self) -> float:
        return self.items_encoded / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "items_per_second": round(self.items_per_second, 2)}


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _chunk_path(partial: Path, c: int) -> Path:
    return partial / f"chunk-{c:05d}.safetensors"


def _state_hash(enc: Encoder) -> str:
    """SHA-256 of every tensor's bytes, read in place (a ``tobytes`` copy doubled the cost)."""
    h = hashlib.sha256()
    for name, t in enc.state_dict().items():
        h.update(name.encode())
        h.update(memoryview(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _ids_hash(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def extraction_fingerprint(data: Dataset, encoders: dict[str, Encoder], project: bool, batch_size: int,
                           chunk_size: int) -> dict[str, Any]:
    """Everything that decides a chunk's numbers: a partial result of another extraction is never reused."""
    return {"version": FORMAT_VERSION, "dataset": data.name, "n_items": data.n_items,
            "item_ids": _ids_hash([str(x) for x in data.item_ids]), "project": project,
            "batch_size": batch_size, "chunk_size": chunk_size,
            "encoders": {m: json.loads(json.dumps(enc.spec, default=str)) for m, enc in sorted(encoders.items())},
            "weights": {m: _state_hash(enc) for m, enc in sorted(encoders.items())}}


def _open_partial(partial: Path, fingerprint: dict[str, Any], log: Callable[[str], None]) -> None:
    manifest = partial / MANIFEST
    if partial.exists():
        try:
            same = json.loads(manifest.read_text()) == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            return
        log(f"discarding {partial}: partial results of a different extraction (other data, encoders or sizes)")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json(manifest, fingerprint)


#: One finished chunk: features and masks per modality, and what was bad in it.
ChunkResult = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], BadMedia]


def _write_chunk(path: Path, feats: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], bad: BadMedia) -> None:
    tensors = {}
    for m in feats:
        tensors[f"{m}.features"] = feats[m].contiguous()
        tensors[f"{m}.mask"] = masks[m].contiguous()
    meta = {"bad_media": json.dumps(bad.as_dict()), "bad_examples": json.dumps(bad.examples)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _read_chunk(path: Path, modalities: Sequence[str]) -> ChunkResult:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        feats = {m: f.get_tensor(f"{m}.features") for m in modalities}
        masks = {m: f.get_tensor(f"{m}.mask") for m in modalities}
    bad = BadMedia()
    bad.merge(json.loads(meta.get("bad_media", "{}")), json.loads(meta.get("bad_examples", "{}")))
    return feats, masks, bad


def extract_features(data: Dataset, encoders: dict[str, Encoder], out: str | Path, *, project: bool = False,
                     batch_size: int = 64, chunk_size: int = 4096, fuse: str = "auto", workers: int = 0,
                     progress: bool = True, meta: dict[str, str] | None = None,
                     on_chunk: Callable[[int, int], None] | None = None,
                     log: Callable[[str], None] = print) -> ExtractReport:
    """Encode every item of ``data`` with ``encoders`` into one multi-table feature file.

    ``project``: store the encoders' projected embeddings (``forward``, a pre-training
    run's aligned space) instead of backbone features (``encode``). Modalities the
    dataset has no content for are skipped (and reported). ``on_chunk(c, n_chunks)``
    is called after chunk ``c`` is safely on disk. Returns an :class:`ExtractReport`.
    """
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"batch_size and chunk_size must be positive (got {batch_size}, {chunk_size})")
    fuse_tables({}, fuse)  # validate the mode before any work
    out = Path(out)
    t0 = time.perf_counter()
    ids = [str(x) for x in data.item_ids]
    n = len(ids)
    if n == 0:
        raise MMRecError(f"dataset '{data.name}' has no items to extract")
    views: dict[str, Sequence[Any]] = {}
    skipped: dict[str, str] = {}
    for m in sorted(encoders):
        view = content_view(data, m) if m in CONTENT_MODALITIES else None
        if view is None:
            skipped[m] = "not item content" if m not in CONTENT_MODALITIES else "the dataset has no such content"
            log(f"skipping {m}: {skipped[m]}")
        else:
            views[m] = view
    encoders = {m: encoders[m].eval() for m in views}
    if not encoders:
        raise MMRecError(f"nothing to extract: dataset '{data.name}' has no content for "
                         f"{', '.join(sorted(skipped)) or 'any requested modality'}")

    partial = partial_dir(out)
    chunks = [(c, s, min(s + chunk_size, n)) for c, s in enumerate(range(0, n, chunk_size))]
    check_free_space(out.parent, extraction_bytes(n, [output_dim(e, project) for e in encoders.values()]),
                     f"{out.name} (+ its chunks in {partial.name}/)")

    def fingerprint() -> dict[str, Any]:  # hashes every weight: ~0.2 s for MiniLM + a ViT
        return extraction_fingerprint(data, encoders, project, batch_size, chunk_size)

    # one chunk = nothing to resume: no partial directory, no manifest, no weight hashing
    staged = len(chunks) > 1 or partial.exists()
    if partial.exists():  # a rerun: which chunks are reusable depends on the fingerprint
        _open_partial(partial, fingerprint(), log)
        done = {c for c, _, _ in chunks if _chunk_path(partial, c).exists()}
        if done:
            log(f"resuming: {len(done)} of {len(chunks)} chunks already in {partial}")
    else:
        done = set()
    batches = [(c, b0, min(b0 + batch_size, e)) for c, s, e in chunks if c not in done
               for b0 in range(s, e, batch_size)]
    # start the loader first: its workers fork and preprocess the first batches while this
    # process hashes the weights for a fresh run's manifest (no thread is running at the fork)
    prepared = _prepared_batches(encoders, views, ids, batches, workers)
    if staged and not partial.exists():
        _open_partial(partial, fingerprint(), log)
    in_memory: dict[int, ChunkResult] = {}

    def finished(c: int, result: ChunkResult) -> None:
        if staged:
            _write_chunk(_chunk_path(partial, c), *result)
        else:
            in_memory[c] = result
        if on_chunk is not None:
            on_chunk(c, len(chunks))

    _run_batches(encoders, ids, prepared, chunks, project, progress,
                 initial=sum(e - s for c, s, e in chunks if c in done), finished=finished)

    results = [in_memory[c] if c in in_memory else _read_chunk(_chunk_path(partial, c), list(encoders))
               for c, _, _ in chunks]
    tables, bad = _assemble(results, encoders, project)
    fused = fuse_tables(tables, fuse)
    all_tables = dict(tables)
    if fused is not None:
        all_tables[FUSED] = fused
    elif len(tables) > 1:
        skipped[FUSED] = f"fuse={fuse}: modality sizes {({m: t.dim for m, t in tables.items()})}"
    file_meta = {"created_by": "mmrec extract", "dataset": data.name, "n_items": str(n),
                 "projected": str(project).lower(), "bad_media": json.dumps(bad.as_dict()),
                 "bad_examples": json.dumps(bad.examples), **{k: str(v) for k, v in (meta or {}).items()}}
    write_feature_tables(out, all_tables, ids, file_meta)
    shutil.rmtree(partial, ignore_errors=True)
    encoded = sum(b1 - b0 for _, b0, b1 in batches)
    report = ExtractReport(out=str(out), n_items=n,
                           tables={k: {"dim": t.dim, "present": int(t.mask.sum())} for k, t in all_tables.items()},
                           bad_media=bad.as_dict(), bad_examples=dict(bad.examples), chunks=len(chunks),
                           chunks_reused=len(done), items_encoded=encoded,
                           seconds=round(time.perf_counter() - t0, 3), projected=project, skipped=skipped)
    return report


def extraction_bytes(n_items: int, dims: Sequence[int]) -> int:
    """Peak bytes of an extraction: float32 tables (+ a fused one as wide as the widest) and masks,
    twice (the chunks in ``OUT.partial/`` and ``OUT``, written before the chunks are removed)."""
    width = sum(dims) + (max(dims) if len(dims) > 1 else 0)
    return 2 * n_items * (4 * width + len(dims) + 1)


def _prepared_batches(encoders: dict[str, Encoder], views: dict[str, Sequence[Any]], ids: list[str],
                      batches: list[tuple[int, int, int]], workers: int) -> Iterator[Any]:
    """``((chunk, b0, b1), prepared, bad)`` for each batch, in order.

    With ``workers``, the DataLoader's worker processes start (fork) at once and take
    batches 1, 2, ...; batch 0 is prepared here meanwhile, so the encoders never wait
    for a worker's start-up (fork of a process holding the models, then its first batch).
    """
    if not batches:
        return iter(())
    if workers == 0 or len(batches) == 1:
        return iter(torch.utils.data.DataLoader(_Batches(encoders, views, ids, batches), batch_size=None,
                                                num_workers=0, collate_fn=_identity))
    import os
    from itertools import chain
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads do not survive fork
    rest = iter(torch.utils.data.DataLoader(_Batches(encoders, views, ids, batches[1:]), batch_size=None,
                                            num_workers=workers, collate_fn=_identity))
    return chain([_Batches(encoders, views, ids, batches[:1])[0]], rest)


def _run_batches(encoders: dict[str, Encoder], ids: list[str], loader: Iterator[Any],
                 chunks: list[tuple[int, int, int]], project: bool, progress: bool, initial: int,
                 finished: Callable[[int, ChunkResult], None]) -> None:
    """Encode the prepared batches in order; ``finished(c, result)`` once chunk ``c``'s last batch is done."""
    from mmrec.progress import progress_bar

    bounds = {c: (s, e) for c, s, e in chunks}
    dims = {m: output_dim(enc, project) for m, enc in encoders.items()}
    current: int | None = None
    feats: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    bad = BadMedia()
    with progress_bar(total=bounds[chunks[-1][0]][1], initial=initial, unit="item", desc="extract",
                      enabled=progress, dynamic_ncols=True) as bar:
        for (c, b0, b1), prepared, batch_bad in loader:
            s, e = bounds[c]
            if c != current:
                current = c
                feats = {m: torch.zeros(e - s, d) for m, d in dims.items()}
                masks = {m: torch.zeros(e - s, dtype=torch.bool) for m in dims}
                bad = BadMedia()
            for m, (batch, ok) in prepared.items():
                if batch is None:
                    continue
                z = _encode(encoders[m], batch, project)
                rows = torch.nonzero(ok).flatten() + (b0 - s)
                if z.shape != (len(rows), dims[m]):
                    raise MMRecError(f"{m} encoder returned {tuple(z.shape)} for {len(rows)} items of size {dims[m]}")
                finite = torch.isfinite(z).all(dim=1)
                for r in torch.nonzero(~finite).flatten().tolist():
                    bad.add(m, "non_finite", ids[int(rows[r]) + s])
                feats[m][rows[finite]] = z[finite]
                masks[m][rows[finite]] = True
            bad.merge(batch_bad.counts, batch_bad.examples)
            bar.update(b1 - b0)
            if b1 == e:
                finished(c, (feats, masks, bad))
                current = None


def _assemble(results: list[ChunkResult], encoders: dict[str, Encoder],
              project: bool) -> tuple[dict[str, FeatureTable], BadMedia]:
    """The chunks' rows, in order, as one table per modality, and their bad-media counts."""
    bad = BadMedia()
    for _, _, chunk_bad in results:
        bad.merge(chunk_bad.counts, chunk_bad.examples)
    tables = {}
    for m, enc in encoders.items():
        feats = torch.cat([r[0][m] for r in results])
        mask = torch.cat([r[1][m] for r in results])
        spec = json.dumps(enc.spec, default=str)
        tables[m] = FeatureTable(feats, mask, {"modality": m, "encoder": str(enc.spec.get("name", "")),
                                               "spec": spec, "kind": "projected" if project else "backbone",
                                               "present": str(int(mask.sum()))})
    return tables, bad


# -- the command as a library call ------------------------------------------------------
@dataclass
class ExtractConfig:
    """``mmrec extract`` settings (YAML keys; CLI flags and ``--set`` override them)."""

    data: str | None = None
    out: str | None = None
    run: str | None = None
    format: str | None = None
    seed: int = 0
    modalities: list[str] | None = None
    encoders: dict[str, str] = field(default_factory=dict)    # modality -> encoder name (frozen mode)
    pretrained: dict[str, str] = field(default_factory=dict)  # modality -> local weights path (frozen mode)
    batch_size: int = 64
    chunk_size: int = 4096
    device: str = "auto"
    workers: int = 0
    fuse: str = "auto"
    progress: bool = True


@holds_output("extract", out=lambda cfg, *a, **k: cfg.out)  # OUT.lock: one writer per output (mmrec/rundir.py)
def run_extract(cfg: ExtractConfig, log: Callable[[str], None] = print) -> ExtractReport:
    """Load the data, build the encoders (a run's or frozen defaults) and extract."""
    from mmrec.datasets.loading import load_dataset

    if not cfg.data or not cfg.out:
        raise ConfigError("extract needs --data and --out")
    if cfg.run and (cfg.encoders or cfg.pretrained):
        raise ConfigError("--run uses the run's own encoders; --encoder/--pretrained are for frozen extraction without --run")
    wanted = list(cfg.modalities) if cfg.modalities else None
    bad = [m for m in wanted or [] if m not in CONTENT_MODALITIES]
    if bad:
        raise ConfigError(f"--modalities: unknown {bad}; known: {', '.join(CONTENT_MODALITIES)}")
    data = load_dataset(cfg.data, cfg.format, seed=cfg.seed)
    present = available_modalities(data)
    if wanted:
        absent = [m for m in wanted if m not in present]
        if absent:
            raise ConfigError(f"--modalities asks for {absent}, but dataset '{data.name}' has raw content only for "
                              f"{present or 'no modality'}")
    modalities = wanted or present
    device = resolve_device(cfg.device)
    meta: dict[str, str] = {}
    if cfg.run:
        from mmrec.pretrain.artifacts import load_encoders

        encoders = load_encoders(cfg.run, device=device)
        extra = [m for m in encoders if m not in CONTENT_MODALITIES]
        for m in extra:
            log(f"skipping the run's {m} encoder (not item content)")
        for m in sorted(set(encoders) - set(extra) - set(modalities)):
            log(f"skipping the run's {m} encoder: " + ("not asked for" if wanted else "the dataset has no such content"))
        encoders = {m: _freeze(e, device) for m, e in encoders.items() if m in modalities}
        missing = [m for m in (wanted or []) if m not in encoders]
        if missing:
            raise ConfigError(f"run {cfg.run} has no encoder for {missing} (it has {sorted(encoders) or 'none'})")
        meta["run"] = str(Path(cfg.run).resolve())
        project = True
    else:
        if not modalities:
            raise MMRecError(f"dataset '{data.name}' has no raw item content (image, text or audio) to extract")
        encoders = frozen_encoders(modalities, cfg.encoders, cfg.pretrained, device, cfg.seed, log)
        project = False
    what = ", ".join(f"{m} ({e.spec.get('name')})" for m, e in sorted(encoders.items()))
    log(f"extracting {what} for "
        f"{data.n_items:,} items of {data.name} on {device}"
        f" ({'projected run embeddings' if project else 'frozen backbone features'})")
    return extract_features(data, encoders, cfg.out, project=project, batch_size=cfg.batch_size,
                            chunk_size=cfg.chunk_size, fuse=cfg.fuse, workers=cfg.workers,
                            progress=cfg.progress, meta=meta, log=log)


__all__ = ["CONTENT_MODALITIES", "ExtractConfig", "ExtractReport", "available_modalities", "content_view",
           "extract_features", "extraction_bytes", "extraction_fingerprint", "frozen_encoders", "fuse_tables", "partial_dir",
           "prepare_batch", "run_extract"]
