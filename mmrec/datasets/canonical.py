"""The canonical dataset directory (a DESIGN.md contract): read it and write it.

====================  =========================================================
``interactions.tsv``  ``user``, ``item``; optional ``behavior``, ``timestamp``,
                      ``rating``, ``scenario``, ``label``
``valid.tsv``,        held-out rows, same columns; without a ``behavior`` column
``test.tsv``          they are rows of the target behavior
``items.tsv``         ``item``, text columns, ``image`` / ``audio`` paths relative
                      to the directory (standard CSV quoting, tab separated)
``exposures.tsv``     ``user``, ``item``, optional ``scenario``/``timestamp``, then
                      label columns (``click``, ``convert``, ...)
``dataset.yaml``      ``name``, ``behaviors`` (cascade order), ``target`` (default:
                      the last behavior), ``text_columns``, ``scenarios`` (index order)
``features/``         ``<modality>.safetensors`` (see :mod:`mmrec.datasets.features`)
====================  =========================================================

Rules the loader follows:

* Ids are strings ('007' and '7' are two items). Users are those of the training
  interactions; items are those of the training interactions plus every item of
  ``items.tsv`` (items without interactions are kept: they are the cold items).
  When every id is a plain integer the index follows the number (id 5 -> index 5
  when ids are 0..n-1); otherwise ``items.tsv`` order, then first appearance.
* Behaviors: ``dataset.yaml``'s list when given (a behavior in the data that it
  does not list is an error). Otherwise, when every name is a known stage
  (view/pv/click < fav/collect < cart < buy/purchase) that cascade order, else
  order of first appearance. No ``behavior`` column: one behavior, ``interact``.
* Held-out rows whose user or item is not in the index are counted in
  ``report["unseen"][split]`` and dropped with a warning (``on_unseen="drop"``),
  or raise a DataError naming file, line and field (``on_unseen="error"``).
* Media: an ``image`` column holds paths; without one, ``images/<item>.<jpg|jpeg|png|webp>``
  is used (``audio``: ``audio/<item>.wav``). A listed file that does not exist is
  counted in ``report["missing_media"]`` and that item's entry is None (masked);
  with ``verify_media=True`` files that do not decode are counted in
  ``report["unreadable_media"]`` and masked the same way. A listed path that leaves the
  directory (absolute, or ``..`` past it) is never opened: counted in
  ``report["unsafe_media"]`` and masked (docs/reliability.md).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import shutil
import tempfile
import uuid
import warnings
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import yaml

from mmrec.config import from_dict
from mmrec.datasets.features import load_feature_dir, write_features
from mmrec.datasets.readers import cascade_order, check_on_unseen, register_reader
from mmrec.datasets.readers.table import (FLOAT, ID, TIME, Table, as_numpy, encode, id_order, index_in,
                                          iter_rows, named, read_header, read_table)
from mmrec.datasets.schema import DEFAULT_BEHAVIOR, Dataset, Interactions, ItemContent
from mmrec.errors import ConfigError, DataError

INTERACTION_COLUMNS = {"user": ID, "item": ID, "behavior": ID, "timestamp": TIME,
                       "rating": FLOAT, "scenario": ID, "label": FLOAT}
HELD_OUT = ("valid", "test")
WRITTEN_NAMES = {"interactions.tsv", "valid.tsv", "test.tsv", "items.tsv", "exposures.tsv", "dataset.yaml",
                 "features", "images", "audio"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
AUDIO_EXTS = (".wav",)
MEDIA_COLUMNS = ("image", "audio")
_FLAGS = {"", "0", "1", "true", "false", "yes", "no", "y", "n", "t", "f"}
_NUMERIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass
class DatasetMeta:
    """``dataset.yaml``: everything optional."""

    name: str | None = None
    behaviors: list[str] | None = None
    target: str | None = None
    text_columns: list[str] | None = None
    scenarios: list[str] | None = None  # scenario names in index order (written so round trips keep it)
    # joint-task heads (mmrec/heads/tasks.py): a task rule name (exposures, rated, multi-behavior) or
    # task names in cascade order, and the scenario source (`scenario`, or a users.tsv column)
    tasks: str | list[str] | None = None
    scenario_column: str | None = None


@dataclass
class ItemRows:
    """``items.tsv`` as strings: ids, every other column, and the line of each row."""

    path: Path
    ids: list[str]
    columns: dict[str, list[str]]
    lines: list[int]
    types: dict[str, str] = field(default_factory=dict)  # optional declared types (RecBole)


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------

def _detect(path: Path) -> bool:
    return (path / "interactions.tsv").is_file()


@register_reader("canonical", detect=_detect, priority=0,
                 looks_for="interactions.tsv (plus optional test.tsv, valid.tsv, items.tsv, dataset.yaml, features/)")
def read_canonical(path: str | Path, *, on_unseen: str = "drop", verify_media: bool = False,
                   text_columns: list[str] | None = None) -> Dataset:
    """Read a canonical directory (see the module docstring for the rules)."""
    return read_layout(path, ".tsv", on_unseen=on_unseen, verify_media=verify_media, text_columns=text_columns)


def read_layout(path: str | Path, suffix: str, *, on_unseen: str = "drop", verify_media: bool = False,
                text_columns: list[str] | None = None) -> Dataset:
    """The canonical layout with tables ending in ``suffix`` (``.tsv``; the CSV reader: ``.csv``).

    ``text_columns``: the item columns joined into each item's text, in this order, instead of
    ``dataset.yaml``'s ``text_columns`` or the default (every column that reads as text: an
    all-numeric column such as a year is left out unless named here).
    """
    check_on_unseen(on_unseen)
    root = Path(path)
    if not root.is_dir():
        raise DataError("not a directory", file=root)
    meta_file = root / "dataset.yaml"
    meta = read_meta(meta_file)
    if text_columns is not None:
        if not isinstance(text_columns, list) or not all(isinstance(c, str) and c for c in text_columns):
            raise ConfigError(f"text_columns must be a list of column names, not {text_columns!r}")
        meta = dataclasses.replace(meta, text_columns=list(text_columns))
    train = read_table(root / f"interactions{suffix}", named(INTERACTION_COLUMNS), required=("user", "item"),
                       int_ids=("user", "item"))
    held = {s: read_table(root / f"{s}{suffix}", named(INTERACTION_COLUMNS), required=("user", "item"))
            for s in HELD_OUT if (root / f"{s}{suffix}").is_file()}
    items = read_item_rows(root / f"items{suffix}") if (root / f"items{suffix}").is_file() else None
    exposures = None
    if (root / f"exposures{suffix}").is_file():
        exposures = read_table(root / f"exposures{suffix}", _exposure_spec, required=("user", "item"))
    return assemble(name=meta.name or root.resolve().name, root=root, train=train, held_out=held, items=items,
                    exposures=exposures, meta=meta, meta_file=meta_file, on_unseen=on_unseen,
                    verify_media=verify_media, features_dir=root / "features")


def _exposure_spec(h: str) -> tuple[str, str]:
    if h in ("user", "item", "scenario", "behavior"):
        return h, ID
    if h == "timestamp":
        return h, TIME
    return f"label:{h}", FLOAT


def read_meta(path: Path) -> DatasetMeta:
    """Parse ``dataset.yaml`` (absent: defaults); wrong keys or types name the file and field."""
    if not path.is_file():
        return DatasetMeta()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"invalid YAML: {e}", file=path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte {e.start + 1} of the file)", file=path) from None
    if not isinstance(raw, dict):
        raise DataError("top level must be a mapping", file=path)
    try:
        meta = from_dict(DatasetMeta, raw)
    except ConfigError as e:
        raise DataError(str(e), file=path) from None
    for key in ("behaviors", "text_columns", "scenarios"):
        value = getattr(meta, key)
        if value is not None:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise DataError("expected a list of non-empty strings", file=path, field=key)
            if len(set(value)) != len(value):
                raise DataError("names must be unique", file=path, field=key)
    for key in ("name", "target"):
        value = getattr(meta, key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"expected a string, got {value!r}", file=path, field=key)
    return meta


def read_item_rows(path: Path, id_field: str = "item") -> ItemRows:
    """Read ``items.tsv`` with a CSV reader (fields with quotes are quoted)."""
    header = read_header(path)
    if id_field not in header:
        raise DataError(f"missing column '{id_field}' (header has: {', '.join(header)})",
                        file=path, line=1, field=id_field)
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise DataError(f"column '{dup}' appears twice in the header", file=path, line=1, field=dup)
    k = header.index(id_field)
    cols: list[list[str]] = [[] for _ in header]
    lines: list[int] = []
    seen: dict[str, int] = {}
    for line, row in iter_rows(path):
        if len(row) != len(header):
            f = header[len(row)] if len(row) < len(header) else header[-1]
            raise DataError(f"row has {len(row)} fields but the header has {len(header)}",
                            file=path, line=line, field=f)
        key = row[k]
        if key == "":
            raise DataError("empty item id", file=path, line=line, field=id_field)
        if key in seen:
            raise DataError(f"item '{key}' is listed twice (first on line {seen[key]})",
                            file=path, line=line, field=id_field)
        seen[key] = line
        lines.append(line)
        for j, v in enumerate(row):
            cols[j].append(v)
    return ItemRows(path, cols[k], {h: cols[j] for j, h in enumerate(header) if j != k}, lines)


def assemble(*, name: str, root: Path, train: Table, held_out: dict[str, Table], items: ItemRows | None,
             exposures: Table | None, meta: DatasetMeta, meta_file: Path | None, on_unseen: str,
             verify_media: bool = False, features_dir: Path | None = None) -> Dataset:
    """Build a Dataset from parsed tables (shared by the canonical and RecBole readers)."""
    check_on_unseen(on_unseen)
    if train.n_rows == 0:
        raise DataError("no interaction rows (the file has only a header)", file=train.path, line=2)
    report: dict[str, Any] = {}
    ignored = {t.path.name: list(t.ignored) for t in (train, *held_out.values()) if t.ignored}
    if ignored:
        report["ignored_columns"] = ignored
        warnings.warn(f"ignoring unknown column(s): {ignored}", stacklevel=3)
    # Encoding ids is most of the work; numpy and arrow release the GIL, so use the cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        users_job = pool.submit(encode, train.columns["user"])
        items_job = pool.submit(encode, train.columns["item"])
        behaviors, target, behavior = _train_behaviors(train, meta, meta_file)
        user_codes, user_uniques = users_job.result()
        item_codes, item_uniques = items_job.result()
    users = _ordered(user_uniques)
    user = _remap(user_codes, user_uniques, users)
    listed = pa.array(items.ids, pa.string()) if items is not None else None
    all_items = pc.unique(pa.concat_arrays([listed, item_uniques])) if listed is not None else item_uniques
    item_set = _ordered(all_items)
    item = _remap(item_codes, item_uniques, item_set)

    tables = [train, *held_out.values()] + ([exposures] if exposures is not None else [])
    scenarios, scenario_set = _scenarios(tables, meta.scenarios)

    train_rows = _rows_of(train, user, item, behavior, scenario_set)
    splits: dict[str, Interactions] = {}
    unseen: dict[str, dict[str, int]] = {}
    for split, table in held_out.items():
        splits[split], unseen[split] = _held_out(table, users, item_set, behaviors, target, scenario_set, on_unseen)
    exposure_rows = None
    if exposures is not None:
        exposure_rows, unseen["exposures"] = _held_out(exposures, users, item_set, behaviors, target,
                                                       scenario_set, on_unseen)
    if unseen:
        report["unseen"] = unseen

    item_ids = item_set.to_pylist()
    content = item_content(root, items, item_ids, meta, meta_file, verify_media, report,
                           features_dir)
    counts = np.bincount(item, minlength=len(item_ids))
    cold = np.flatnonzero(counts == 0)
    return Dataset(
        name=name, behaviors=behaviors, target=target,
        user_ids=np.array(users.to_pylist(), dtype=object), item_ids=np.array(item_ids, dtype=object),
        train=train_rows, valid=splits.get("valid"), test=splits.get("test"),
        scenarios=scenarios, items=content, exposures=exposure_rows,
        cold_items=cold if len(cold) else None, root=str(root),
        split="fixed" if splits else None, report=report,
    )


def _ordered(ids: pa.Array) -> pa.Array:
    order = id_order(ids)
    return ids if order is None else ids.take(pa.array(order))


def _remap(codes: np.ndarray, uniques: pa.Array, final: pa.Array) -> np.ndarray:
    """Codes into ``uniques`` -> positions in ``final`` (which contains every unique)."""
    if final is uniques:
        return codes
    pos = index_in(uniques, final)
    if np.array_equal(pos, np.arange(len(pos))):
        return codes
    return pos[codes]


def _train_behaviors(train: Table, meta: DatasetMeta, meta_file: Path | None) -> tuple[list[str], str, np.ndarray]:
    if train.has("behavior"):
        codes, names_pa = encode(train.columns["behavior"], few=True)
        names = names_pa.to_pylist()
    else:
        codes, names = np.zeros(train.n_rows, dtype=np.int64), [DEFAULT_BEHAVIOR]
        if meta.behaviors and DEFAULT_BEHAVIOR not in meta.behaviors:
            raise DataError(f"no behavior column, so every row is '{DEFAULT_BEHAVIOR}', which dataset.yaml's "
                            f"behaviors {meta.behaviors} do not list", file=train.path, line=1, field="behavior")
    if meta.behaviors:
        behaviors = list(meta.behaviors)
        for k, nm in enumerate(names):
            if nm not in behaviors:
                row = int(np.argmax(codes == k))
                raise train.error(row, "behavior", f"behavior '{nm}' is not one of dataset.yaml's behaviors "
                                                   f"{behaviors}")
    else:
        behaviors = cascade_order(names) or names
    target = meta.target or behaviors[-1]
    if target not in behaviors:
        raise DataError(f"target '{target}' is not one of the behaviors {behaviors}",
                        file=meta_file if meta.target else train.path, field="target")
    pos = np.array([behaviors.index(n) for n in names], dtype=np.int64)
    behavior = codes if np.array_equal(pos, np.arange(len(pos))) else pos[codes]
    if not np.any(behavior == behaviors.index(target)):
        raise DataError(f"the target behavior '{target}' has no training rows (behaviors found: "
                        f"{', '.join(names)})", file=train.path, field="behavior")
    return behaviors, target, behavior


def _scenarios(tables: Sequence[Table], listed: list[str] | None) -> tuple[list[str] | None, pa.Array | None]:
    """Scenario names: dataset.yaml's order when given, else numeric / first-appearance order."""
    with_col = [t for t in tables if t.has("scenario")]
    if not with_col:
        return None, None
    if listed is not None:
        names = pa.array(listed, pa.string())
        for t in with_col:
            pos = index_in(t.columns["scenario"], names)
            if (pos < 0).any():
                row = int(np.argmax(pos < 0))
                raise t.error(row, "scenario", f"scenario '{t.columns['scenario'][row].as_py()}' is not one of "
                                               f"dataset.yaml's scenarios {listed}")
        return list(listed), names
    uniques = pc.unique(pa.chunked_array([pc.unique(t.columns["scenario"]) for t in with_col],
                                         pa.string()).combine_chunks())
    uniques = _ordered(uniques)
    return uniques.to_pylist(), uniques


def _optional(table: Table, keep: np.ndarray | None = None) -> dict[str, Any]:
    """timestamp / rating / label columns (and exposures' label columns) as numpy."""
    out: dict[str, Any] = {"labels": {}}
    for name in ("timestamp", "rating"):
        if table.has(name):
            out[name] = as_numpy(table.columns[name])
    for name, col in table.columns.items():
        if name == "label":
            out["labels"]["label"] = as_numpy(col)
        elif name.startswith("label:"):
            out["labels"][name[len("label:"):]] = as_numpy(col)
    if keep is not None:
        out = {k: ({n: a[keep] for n, a in v.items()} if k == "labels" else v[keep]) for k, v in out.items()}
    return out


def _rows_of(table: Table, user: np.ndarray, item: np.ndarray, behavior: np.ndarray,
             scenario_set: pa.Array | None) -> Interactions:
    scenario = index_in(table.columns["scenario"], scenario_set) if table.has("scenario") else None
    return Interactions(user, item, behavior, scenario=scenario, **_optional(table))


def _held_behaviors(table: Table, behaviors: list[str], target: str) -> np.ndarray:
    if not table.has("behavior"):
        return np.full(table.n_rows, behaviors.index(target), dtype=np.int64)
    codes, names_pa = encode(table.columns["behavior"], few=True)
    names = names_pa.to_pylist()
    for k, nm in enumerate(names):
        if nm not in behaviors:
            raise table.error(int(np.argmax(codes == k)), "behavior",
                              f"behavior '{nm}' is not one of the behaviors {behaviors}")
    return np.array([behaviors.index(n) for n in names], dtype=np.int64)[codes]


def _held_out(table: Table, users: pa.Array, items: pa.Array, behaviors: list[str], target: str,
              scenario_set: pa.Array | None, on_unseen: str) -> tuple[Interactions, dict[str, int]]:
    """Rows of a held-out (or exposure) file mapped onto the training index."""
    u = index_in(table.columns["user"], users)
    i = index_in(table.columns["item"], items)
    bad = (u < 0) | (i < 0)
    report = {"users": 0, "items": 0, "rows": int(bad.sum())}
    if bad.any():
        report["users"] = len(pc.unique(table.columns["user"].filter(pa.array(u < 0))))
        report["items"] = len(pc.unique(table.columns["item"].filter(pa.array(i < 0))))
        if on_unseen == "error":
            row = int(np.argmax(bad))
            name = "user" if u[row] < 0 else "item"
            value = table.columns[name][row].as_py()
            where = "the training interactions" + (" or items.tsv" if name == "item" else "")
            raise table.error(row, name, f"{name} '{value}' does not appear in {where} "
                                         f"(on_unseen='error'; 'drop' skips and counts such rows)")
        warnings.warn(f"{table.path}: dropped {report['rows']} of {table.n_rows} rows whose user or item is not "
                      f"in the training data ({report['users']} unseen users, {report['items']} unseen items); "
                      f"counted in Dataset.report['unseen']", stacklevel=4)
    behavior = _held_behaviors(table, behaviors, target)
    scenario = index_in(table.columns["scenario"], scenario_set) if table.has("scenario") else None
    keep = ~bad
    opt = _optional(table, keep)
    return Interactions(u[keep], i[keep], behavior[keep],
                        scenario=scenario[keep] if scenario is not None else None, **opt), report


# ---------------------------------------------------------------------------
# item content
# ---------------------------------------------------------------------------

def default_text_columns(columns: dict[str, list[str]]) -> list[str]:
    """Columns that read as text: not media, not all-numeric, not 0/1 flags, not empty."""
    out = []
    for name, values in columns.items():
        if name in MEDIA_COLUMNS or name.lower().startswith("has_"):
            continue
        filled = [v for v in values if v != ""]
        if not filled:
            continue
        if all(v.lower() in _FLAGS for v in filled) or all(_NUMERIC.fullmatch(v) for v in filled):
            continue
        out.append(name)
    return out


def item_content(root: Path, items: ItemRows | None, item_ids: list[str], meta: DatasetMeta,
                 meta_file: Path | None, verify_media: bool, report: dict[str, Any],
                 features_dir: Path | None) -> ItemContent:
    """Text, media paths and precomputed features, one entry per item of the index."""
    content = ItemContent()
    rows = None
    if items is not None:
        where = {x: r for r, x in enumerate(items.ids)}
        rows = [where.get(x, -1) for x in item_ids]
        if meta.text_columns is not None:
            for c in meta.text_columns:
                if c not in items.columns:
                    raise DataError(f"text column '{c}' is not a column of {items.path.name} "
                                    f"(columns: {', '.join(items.columns)})", file=meta_file, field="text_columns")
            text_cols = list(meta.text_columns)
        else:
            text_cols = default_text_columns(items.columns)
        for c in text_cols:
            values = items.columns[c]
            content.text[c] = [values[r] if r >= 0 else "" for r in rows]
    missing: dict[str, int] = {}
    unreadable: dict[str, int] = {}
    for kind, exts in (("image", IMAGE_EXTS), ("audio", AUDIO_EXTS)):
        outside: list[int] = []
        paths = _media_paths(root, kind, exts, items, rows, item_ids, outside)
        if paths is None:
            continue
        if outside:  # never read a file the dataset does not hold (items.tsv may come from anyone)
            report.setdefault("unsafe_media", {})[kind] = len(outside)
            warnings.warn(f"{items.path}: {len(outside)} {kind} path(s) point outside {root} (absolute or '..'), "
                          f"e.g. line {outside[0]}; refused, those items have no {kind} (masked)", stacklevel=3)
        entries, n_missing, n_bad = _check_media(paths, kind, verify_media)
        setattr(content, kind, entries)
        if n_missing:
            missing[kind] = n_missing
        if n_bad:
            unreadable[kind] = n_bad
    if missing:
        report["missing_media"] = missing
        warnings.warn(f"{root}: missing media files {missing}; those items have no such content (masked)",
                      stacklevel=3)
    if unreadable:
        report["unreadable_media"] = unreadable
        warnings.warn(f"{root}: media files that do not decode {unreadable}; masked", stacklevel=3)
    if features_dir is not None:
        content.features = load_feature_dir(features_dir, item_ids)
    return content


def _outside(value: str) -> bool:
    """Whether a media path leaves the dataset directory: absolute, a drive, or ``..`` past the root.

    Lexical on purpose: symlinks inside the directory were put there by its owner and are
    followed; a path in a data file is not trusted to climb out.
    """
    p = value.replace("\\", "/")
    if p.startswith("/") or re.match(r"[A-Za-z]:", p):
        return True
    depth = 0
    for part in p.split("/"):
        depth += -1 if part == ".." else int(part not in ("", "."))
        if depth < 0:
            return True
    return False


def _media_paths(root: Path, kind: str, exts: tuple[str, ...], items: ItemRows | None,
                 rows: list[int] | None, item_ids: list[str],
                 outside: list[int] | None = None) -> list[tuple[str, Path | None, bool]] | None:
    """Per item: (id, path or None, whether the data says the file should exist).

    Column paths that leave ``root`` (:func:`_outside`) are refused: None, and their
    ``items.tsv`` line goes to ``outside``.
    """
    if items is not None and kind in items.columns:
        values = items.columns[kind]
        out = []
        for x, r in zip(item_ids, rows):
            v = values[r] if r >= 0 else ""
            if v and _outside(v):
                if outside is not None:
                    outside.append(items.lines[r])
                out.append((x, None, False))
                continue
            out.append((x, (root / v) if v else None, bool(v)))
        return out
    folder = root / ("images" if kind == "image" else "audio")
    if not folder.is_dir():
        return None
    found: dict[str, Path] = {}
    with os.scandir(folder) as it:
        for e in it:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() in exts and e.is_file():
                prev = found.get(stem)
                if prev is None or exts.index(ext.lower()) < exts.index(prev.suffix.lower()):
                    found[stem] = Path(e.path)
    flags = items.columns.get(f"has_{kind}") if items is not None else None
    out = []
    for j, x in enumerate(item_ids):
        p = found.get(x)
        expected = flags is not None and rows[j] >= 0 and flags[rows[j]].strip().lower() in ("1", "true", "yes")
        out.append((x, p if p is not None else (folder / f"{x}{exts[0]}" if expected else None), expected))
    return out


def _check_media(paths: list[tuple[str, Path | None, bool]], kind: str,
                 verify: bool) -> tuple[list[str | None], int, int]:
    entries: list[str | None] = []
    missing = bad = 0
    for _, p, expected in paths:
        if p is None:
            entries.append(None)
        elif not p.is_file():
            missing += int(expected)
            entries.append(None)
        elif verify and not _decodes(p, kind):
            bad += 1
            entries.append(None)
        else:
            entries.append(str(p.absolute()))
    return entries, missing, bad


def _decodes(path: Path, kind: str) -> bool:
    """Whether an image decodes (PIL verify) or a wav header parses."""
    try:
        if kind == "image":
            from PIL import Image
            with Image.open(path) as im:
                im.verify()
            return True
        if path.suffix.lower() == ".wav":
            with wave.open(str(path), "rb") as w:
                return w.getnframes() > 0 and w.getframerate() > 0
        return path.stat().st_size > 0
    except Exception:
        return False


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------

def write_canonical(data: Dataset, out: str | Path, *, overwrite: bool = False) -> None:
    """Write ``data`` as a canonical directory, atomically.

    Everything is written into a temporary directory beside ``out`` and renamed at
    the end, so an interrupted write never leaves a directory that looks complete.
    An existing ``out`` is replaced when it is empty or holds only what this function
    writes (an earlier output); any other non-empty directory only with ``overwrite=True``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError("output exists and is not a directory", file=out)
    if out.is_dir() and not overwrite:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in WRITTEN_NAMES)
        if foreign:
            raise DataError(f"output directory holds files this writer did not make ({', '.join(foreign[:5])}); "
                            f"pass overwrite=True to replace it", file=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _write_all(data, tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_all(data: Dataset, out: Path) -> None:
    users = pa.array([str(x) for x in data.user_ids], pa.string())
    items = pa.array([str(x) for x in data.item_ids], pa.string())
    behaviors = pa.array(list(data.behaviors), pa.string())
    scenarios = pa.array([str(s) for s in data.scenarios], pa.string()) if data.scenarios else None
    lost = sorted(set(data.train.labels) - {"label"})
    if lost:
        warnings.warn(f"training labels {lost} have no column in the canonical format and are not written",
                      stacklevel=3)
    n_without = data.n_users - len(np.unique(data.train.user))
    if n_without:
        warnings.warn(f"{n_without} users have no training interactions; the canonical format lists users "
                      f"through interactions.tsv, so they will not exist when read back", stacklevel=3)
    _write_rows(out / "interactions.tsv", data.train, users, items, behaviors, scenarios)
    for split in HELD_OUT:
        rows = getattr(data, split)
        if rows is not None:
            _write_rows(out / f"{split}.tsv", rows, users, items, behaviors, scenarios)
    if data.exposures is not None:
        _write_rows(out / "exposures.tsv", data.exposures, users, items, None, scenarios, all_labels=True)
    text_cols = _write_items(out, data)
    meta: dict[str, Any] = {"name": data.name, "behaviors": list(data.behaviors), "target": data.target}
    if text_cols:
        meta["text_columns"] = text_cols
    if data.scenarios:
        meta["scenarios"] = [str(x) for x in data.scenarios]
    (out / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False, allow_unicode=True), encoding="utf-8")
    for modality, table in data.items.features.items():
        write_features(out / "features" / f"{modality}.safetensors", table, [str(x) for x in data.item_ids])


def _numbers(values: np.ndarray) -> pa.Array:
    """Integral floats as int64 so files say 881250949, not 881250949.0."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and len(values) and np.all(np.isfinite(values)) \
            and np.all(values == np.round(values)) and np.abs(values).max() < 2 ** 53:
        values = values.astype(np.int64)
    return pa.array(values)


def _write_rows(path: Path, rows: Interactions, users: pa.Array, items: pa.Array, behaviors: pa.Array | None,
                scenarios: pa.Array | None, all_labels: bool = False) -> None:
    cols: dict[str, pa.Array] = {"user": users.take(pa.array(rows.user)), "item": items.take(pa.array(rows.item))}
    if behaviors is not None:
        cols["behavior"] = behaviors.take(pa.array(rows.behavior))
    if rows.timestamp is not None:
        cols["timestamp"] = _numbers(rows.timestamp)
    if rows.rating is not None:
        cols["rating"] = _numbers(rows.rating)
    if rows.scenario is not None:
        if scenarios is None:
            raise DataError("rows have a scenario index but the dataset has no scenario names", field="scenario")
        cols["scenario"] = scenarios.take(pa.array(rows.scenario))
    for name, values in rows.labels.items():
        if all_labels or name == "label":
            if not re.fullmatch(r"[A-Za-z0-9_.:-]+", name) or name in cols:
                raise DataError(f"label name '{name}' cannot be a column name", field=name)
            cols[name] = _numbers(values)
    write_tsv(path, pa.table(cols))


def write_tsv(path: Path, table: pa.Table) -> None:
    """Tab-separated with a plain header; strings are quoted only if some value needs it."""
    needs_quotes = any(
        pa.types.is_string(col.type) and len(col) and
        pc.any(pc.match_substring_regex(col, '[\t"\r\n]')).as_py()
        for col in table.columns)
    with open(path, "wb") as f:
        f.write(("\t".join(table.column_names) + "\n").encode("utf-8"))
        pcsv.write_csv(table, f, write_options=pcsv.WriteOptions(
            include_header=False, delimiter="\t", quoting_style="needed" if needs_quotes else "none"))


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}")


def _file_stem(item_id: str, index: int) -> str:
    return item_id if _SAFE_NAME.fullmatch(item_id) else f"item-{index}"


def _image_ext(data: bytes) -> str:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:
        raise DataError("image bytes are not an image file PIL can read", field="image") from None
    return {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}.get(fmt, f".{fmt or 'png'}")


def _write_items(out: Path, data: Dataset) -> list[str]:
    """items.tsv (every item, so cold items survive), media files; returns the text columns."""
    content = data.items
    ids = [str(x) for x in data.item_ids]
    text_cols = list(content.text)
    for c in text_cols:
        if c in ("item", *MEDIA_COLUMNS):
            raise DataError(f"text column name '{c}' collides with a reserved items.tsv column", field=c)
    header = ["item", *text_cols]
    media: dict[str, list[str]] = {}
    for kind in MEDIA_COLUMNS:
        entries = getattr(content, kind)
        if entries is None:
            continue
        folder = out / ("images" if kind == "image" else "audio")
        folder.mkdir(exist_ok=True)
        column = []
        for i, entry in enumerate(entries):  # once: entries may be rendered lazily
            if entry is None:
                column.append("")
                continue
            stem = _file_stem(ids[i], i)
            if isinstance(entry, (bytes, bytearray, memoryview)):
                raw = bytes(entry)
                name = stem + (_image_ext(raw) if kind == "image" else ".wav")
                (folder / name).write_bytes(raw)
            else:
                src = Path(entry)
                if not src.is_file():
                    raise DataError(f"{kind} of item '{ids[i]}' not found", file=src, field=kind)
                name = stem + src.suffix.lower()
                shutil.copyfile(src, folder / name)
            column.append(f"{folder.name}/{name}")
        if not any(column):
            folder.rmdir()
            continue
        media[kind] = column
        header.append(kind)
    with open(out / "items.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        w.writerow(header)
        for i, x in enumerate(ids):
            w.writerow([x, *(content.text[c][i] or "" for c in text_cols), *(media[k][i] for k in media)])
    return text_cols
