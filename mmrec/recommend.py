"""Serving a trained run: top-K original item ids per original user id.

``Recommender.load(RUN)`` rebuilds what ``mmrec train`` saw — the run's config, its data
loaded and split with the run's seed (:func:`mmrec.train.run.prepare_data`), the model
with the selected weights — and ranks every item for batches of users with the model's
own ``score_all``. Items the user already has are masked exactly as the full-ranking
evaluator masks them for the test split (:func:`mmrec.eval.protocols.evaluate_full`):
the user's target-behavior positives in train, plus those in valid when the run has a
valid split. Cold items are scored like any other item (through the run's content
features, for content models), so they appear whenever the model ranks them high.

Memory stays bounded by ``batch_size x n_items`` scores whatever the number of users:
users are scored batch by batch and only each batch's top-K is kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from mmrec.datasets.schema import Dataset
from mmrec.errors import ConfigError, DataError, MMRecError
from mmrec.io import atomic_path
from mmrec.progress import progress_bar

__all__ = ["Recommender", "Recommendations", "RecommendConfig", "RecommendReport", "COLUMNS", "check_run_data",
           "read_user_file", "read_recommendations", "write_recommendations", "unknown_users_path", "run_recommend"]

#: Output columns (one row per recommended item; rank 1 is the best).
COLUMNS = ("user", "rank", "item", "score")
#: Output suffix -> writer format.
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv", ".txt": "tsv"}


@dataclass
class Recommendations:
    """Top-K per user as a long table (``user, rank, item, score``), plus the ids not in the run's data."""

    frame: pd.DataFrame
    unknown_users: list[str] = field(default_factory=list)

    def items(self, user: str) -> list[str]:
        """The ranked item ids of one user."""
        return self.frame.loc[self.frame["user"] == user, "item"].tolist()


class Recommender:
    """Top-K recommendations from a trained run (the serving API; the *model* base class is
    :class:`mmrec.models.base.Recommender`).

    >>> rec = Recommender.load("runs/bprmf")                     # doctest: +SKIP
    >>> rec.recommend(["u1", "u7"], k=10).frame                 # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, data: Dataset, *, batch_size: int = 1024,
                 run_dir: str | Path | None = None) -> None:
        self.model = model
        self.data = data
        self.batch_size = int(batch_size)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._index: dict[str, int] | None = None
        self._seen: sp.csr_matrix | None = None
        self._str_cache: dict[str, np.ndarray] = {}
        self._prepared = False

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, run: str | Path, data: str | None = None, device: str | None = None,
             batch_size: int | None = None, cold_items: str | None = None) -> "Recommender":
        """Rebuild a finished run: config, data as the run saw it, model, selected weights.

        ``data`` overrides where the run's data is read from (it moved); it must hold the
        same users and items, which is checked against the ids recorded in ``metrics.json``.
        ``cold_items="aligned:PRETRAIN_RUN"``: items without training interactions are ranked by
        their aligned content vectors (mmrec/cold_items.py).
        """
        from mmrec.train.checkpoint import BEST, load_weights
        from mmrec.train.run import METRICS, build_model, load_run_config, prepare_data
        from mmrec.train.trainer import resolve_device

        run_dir = Path(run)
        if not run_dir.is_dir():
            raise MMRecError(f"run directory {run_dir} does not exist")
        cfg = load_run_config(run_dir)
        for name, why in ((METRICS, "was the run trained to completion?"), (BEST, "no selected weights")):
            if not (run_dir / name).exists():
                raise MMRecError(f"{run_dir} has no {name}: {why}")
        if data is not None:
            cfg.data = data
        from mmrec.rundir import check_provenance
        check_provenance(run_dir, cfg.data)  # warns when the data changed since training (ids are checked below)
        ds = prepare_data(cfg)
        check_run_data(run_dir / METRICS, ds)
        # a head run (--head) is its backbone plus a head; it ranks items by the backbone's scores
        model = build_model(cfg, ds, resolve_device(device or cfg.device), train_backbone=False)
        model.fit(ds)
        try:
            load_weights(model, run_dir)
        except RuntimeError as e:  # shape mismatch inside load_state_dict
            raise MMRecError(f"{run_dir / BEST} does not fit model '{cfg.model}' built from {cfg.data}: "
                             f"was the run trained on other data? ({str(e).splitlines()[0]})") from e
        if cold_items:
            from mmrec.cold_items import attach_cold_items
            attach_cold_items(model, ds, cold_items)
        return cls(model, ds, batch_size=batch_size or cfg.train.eval_batch_size, run_dir=run_dir)

    # -- ids ------------------------------------------------------------------------------
    @property
    def user_ids(self) -> np.ndarray:
        return self.data.user_ids

    @property
    def item_ids(self) -> np.ndarray:
        return self.data.item_ids

    def resolve_users(self, user_ids: Iterable[str]) -> tuple[np.ndarray, list[str], list[str]]:
        """Original ids -> (indices, known ids in order, unknown ids); duplicates keep their first place."""
        if self._index is None:
            self._index = {str(u): i for i, u in enumerate(self.data.user_ids)}
        index, known, unknown, seen = [], [], [], set()
        for u in user_ids:
            u = str(u)
            if u in seen:
                continue
            seen.add(u)
            i = self._index.get(u)
            if i is None:
                unknown.append(u)
            else:
                index.append(i)
                known.append(u)
        return np.asarray(index, dtype=np.int64), known, unknown

    def seen_matrix(self) -> sp.csr_matrix:
        """Binary users x items of what is masked: target-behavior positives in train (+ valid)."""
        if self._seen is None:
            seen = self.data.matrix(split="train")
            if self.data.valid is not None:
                seen = seen + self.data.matrix(split="valid")
            self._seen = sp.csr_matrix(seen, dtype=np.bool_)
        return self._seen

    # -- scoring ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Eval mode, history for sequence models (train + valid, as for test), ``prepare_eval`` once."""
        if self._prepared:
            return
        self.model.eval()
        if hasattr(self.model, "use_history"):
            self.model.use_history(self.data, ("train", "valid") if self.data.valid is not None else ("train",))
        with torch.no_grad():
            self.model.prepare_eval()
        self._prepared = True

    def top_k(self, users: np.ndarray, k: int = 20, include_seen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(item indices, scores), each [len(users), min(k, n_items)], best first, for one batch.

        Masked (seen) items get score ``-inf``; they are ranked last and never returned by
        :meth:`recommend`.
        """
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        self._prepare()
        device = getattr(self.model, "device", torch.device("cpu"))
        n_items = self.data.n_items
        with torch.no_grad():
            scores = self.model.score_all(torch.from_numpy(users).to(device))
            if tuple(scores.shape) != (len(users), n_items):
                raise MMRecError(f"model.score_all returned shape {tuple(scores.shape)}, "
                                 f"expected {(len(users), n_items)}")
            if not include_seen:
                sub = self.seen_matrix()[users]
                if sub.nnz:
                    if scores._base is not None or scores.requires_grad:
                        scores = scores.clone()  # never write into the model's own storage
                    rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
                    scores[torch.from_numpy(rows).to(device),
                           torch.from_numpy(sub.indices.astype(np.int64)).to(device)] = float("-inf")
            values, index = torch.topk(scores, min(k, n_items), dim=1)
        if torch.isnan(values).any():
            raise MMRecError("model.score_all returned NaN scores")
        return index.cpu(), values.float().cpu()

    def iter_recommend(self, user_ids: Sequence[str] | None = None, k: int = 20, include_seen: bool = False,
                       batch_size: int | None = None, progress: bool = False) -> Iterator[pd.DataFrame]:
        """One ``user, rank, item, score`` frame per batch of users (the streaming form).

        ``user_ids=None``: every user of the run's data. Unknown ids are skipped here:
        call :meth:`resolve_users` (or :meth:`recommend`) to get them.
        """
        if user_ids is None:
            index = np.arange(self.data.n_users, dtype=np.int64)
        else:
            index = self.resolve_users(user_ids)[0]
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ConfigError(f"batch_size must be at least 1, got {bs}")
        starts = range(0, len(index), bs)
        for start in progress_bar(starts, enabled=progress, desc="recommend", unit="batch", leave=False):
            users = index[start:start + bs]
            top, values = self.top_k(users, k, include_seen)
            yield self._frame(users, top.numpy(), values.numpy())

    def recommend(self, user_ids: Sequence[str] | None = None, k: int = 20, include_seen: bool = False,
                  batch_size: int | None = None) -> Recommendations:
        """Top-``k`` original item ids (with scores) per original user id.

        Seen items (train, plus valid positives) are excluded unless ``include_seen``; a
        user with fewer than ``k`` unseen items gets fewer rows. Unknown user ids are
        returned in ``unknown_users``, never dropped silently.
        """
        unknown: list[str] = []
        if user_ids is not None:
            _, user_ids, unknown = self.resolve_users(user_ids)
        frames = list(self.iter_recommend(user_ids, k, include_seen, batch_size))
        frame = pd.concat(frames, ignore_index=True) if frames else _empty_frame()
        return Recommendations(frame, unknown)

    def _str_ids(self, what: str) -> np.ndarray:
        """The data's user or item ids as an object array of ``str``, converted once.

        Built once so that each batch's frame only gathers references (a per-batch
        ``astype(str)`` was a tenth of the ranking time, bench/recommend.py).
        """
        if what not in self._str_cache:
            ids = self.data.user_ids if what == "users" else self.data.item_ids
            if not all(type(i) is str for i in ids):
                ids = np.asarray([str(i) for i in ids], dtype=object)
            self._str_cache[what] = ids
        return self._str_cache[what]

    def _frame(self, users: np.ndarray, top: np.ndarray, values: np.ndarray) -> pd.DataFrame:
        k = top.shape[1]
        score = values.ravel().astype(np.float32, copy=False)
        user = np.repeat(self._str_ids("users")[users], k)
        rank = np.tile(np.arange(1, k + 1, dtype=np.int32), len(users))
        item = self._str_ids("items")[top.ravel()]
        keep = score != -np.inf  # masked (seen) items are never recommended
        if not keep.all():
            user, rank, item, score = user[keep], rank[keep], item[keep], score[keep]
        return pd.DataFrame({"user": user, "rank": rank, "item": item, "score": score}, copy=False)


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({"user": pd.Series([], dtype=str), "rank": pd.Series([], dtype=np.int32),
                         "item": pd.Series([], dtype=str), "score": pd.Series([], dtype=np.float32)})


def check_run_data(metrics_path: Path, data: Dataset) -> None:
    """The data rebuilt from the run's config must be the data it was trained on (same ids, same order)."""
    from mmrec.train.run import id_digest

    try:
        saved = json.loads(metrics_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MMRecError(f"cannot read {metrics_path}: {e}") from e
    for what, n in (("users", data.n_users), ("items", data.n_items)):
        expected = saved.get(f"n_{what}")
        if expected is not None and int(expected) != n:
            raise DataError(f"the run was trained on {expected:,} {what}, but its data '{data.name}' "
                            f"now has {n:,}: a different dataset (pass the run's data with --data)",
                            file=metrics_path, field=f"n_{what}")
    ids = saved.get("ids") or {}
    for what, current in (("users", data.user_ids), ("items", data.item_ids)):
        if what in ids and ids[what] != id_digest(current):
            raise DataError(f"the {what[:-1]} ids of data '{data.name}' do not match those the run was "
                            f"trained on: a different dataset (pass the run's data with --data)",
                            file=metrics_path, field=f"ids.{what}")


# -- files ----------------------------------------------------------------------------------

def read_user_file(path: str | Path) -> list[str]:
    """One original user id per line; a first line ``user`` is a header; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("users file does not exist", file=path)
    ids: list[str] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            value = line.strip()
            if not value or (n == 1 and value == "user"):
                continue
            if "\t" in value:
                raise DataError(f"expected one user id per line, got '{value}'", file=path, line=n, field="user")
            ids.append(value)
    if not ids:
        raise DataError("no user ids (one per line, optional header 'user')", file=path)
    return ids


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {path}: unknown output format '{suffix}'; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def unknown_users_path(out: str | Path) -> Path:
    """``recs.parquet`` -> ``recs.unknown_users.txt`` (beside the output)."""
    out = Path(out)
    return out.with_name(out.with_suffix("").name + ".unknown_users.txt")


def write_recommendations(frames: Iterable[pd.DataFrame], out: str | Path) -> int:
    """Stream frames into ``out`` (``.parquet`` or ``.tsv``) atomically; returns the row count."""
    kind = output_format(out)
    n = 0
    with atomic_path(out) as tmp:
        if kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            schema = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()),
                                ("score", pa.float32())])
            with pq.ParquetWriter(str(tmp), schema) as writer:
                for frame in frames:
                    writer.write_table(pa.Table.from_pandas(frame[list(COLUMNS)], schema=schema,
                                                            preserve_index=False))
                    n += len(frame)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write("\t".join(COLUMNS) + "\n")
                for frame in frames:
                    frame[list(COLUMNS)].to_csv(f, sep="\t", header=False, index=False, lineterminator="\n")
                    n += len(frame)
    return n


def read_recommendations(path: str | Path) -> pd.DataFrame:
    """Read a file written by :func:`write_recommendations` (ids stay strings)."""
    if output_format(path) == "parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, sep="\t", dtype={"user": str, "item": str, "rank": np.int32, "score": np.float32},
                       keep_default_na=False)


# -- the command as a library call -------------------------------------------------------------

@dataclass
class RecommendConfig:
    """``mmrec recommend`` options (``--config`` YAML keys, ``--set`` overrides)."""

    run: str | None = None
    out: str | None = None
    users: str | None = None       # file: one original user id per line (header 'user' allowed)
    all: bool = False              # every user of the run's data (the default without users)
    k: int = 20
    include_seen: bool = False
    batch_size: int | None = None  # users scored at once; default: the run's train.eval_batch_size
    data: str | None = None        # the run's data moved: read it from here (ids must match)
    device: str | None = None      # default: the run's device
    progress: bool = True          # a bar over user batches when stderr is a terminal
    cold_items: str | None = None  # aligned:PRETRAIN_RUN (mmrec/cold_items.py)


@dataclass
class RecommendReport:
    out: Path
    n_requested: int
    n_users: int
    unknown: list[str]
    unknown_path: Path | None
    n_rows: int
    seconds: float


def run_recommend(cfg: RecommendConfig) -> RecommendReport:
    """Load the run, rank items for the requested users, write ``cfg.out`` (+ the unknown-users list)."""
    if not cfg.run:
        raise ConfigError("recommend needs --run RUN")
    if not cfg.out:
        raise ConfigError("recommend needs --out FILE (.parquet or .tsv)")
    if cfg.users and cfg.all:
        raise ConfigError("give either --users FILE or --all, not both")
    if cfg.k < 1:
        raise ConfigError(f"--k must be at least 1, got {cfg.k}")
    output_format(cfg.out)  # fail before the (slow) load
    requested = read_user_file(cfg.users) if cfg.users else None
    t0 = time.perf_counter()
    rec = Recommender.load(cfg.run, data=cfg.data, device=cfg.device, batch_size=cfg.batch_size,
                           cold_items=cfg.cold_items)
    unknown: list[str] = []
    users: list[str] | None = None
    if requested is not None:
        _, users, unknown = rec.resolve_users(requested)
    unknown_path = unknown_users_path(cfg.out)
    if unknown:
        with atomic_path(unknown_path) as tmp:
            tmp.write_text("".join(f"{u}\n" for u in unknown), encoding="utf-8")
    elif unknown_path.exists():
        unknown_path.unlink()  # a stale list from an earlier call would mislead
    if users is not None and not users:
        raise DataError(f"none of the {len(unknown):,} user ids is in the run's data (listed in {unknown_path})",
                        file=cfg.users)
    n_rows = write_recommendations(rec.iter_recommend(users, cfg.k, cfg.include_seen, progress=cfg.progress),
                                   cfg.out)
    n_users = len(users) if users is not None else rec.data.n_users
    return RecommendReport(out=Path(cfg.out), n_requested=n_users + len(unknown), n_users=n_users, unknown=unknown,
                           unknown_path=unknown_path if unknown else None, n_rows=n_rows,
                           seconds=time.perf_counter() - t0)
