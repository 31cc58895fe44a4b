"""Fuzzed bad input for every reader and the feature store (hypothesis, deterministic).

Each generated directory must either raise an :class:`mmrec.errors.MMRecError` whose
message names a file of the dataset (and the line / field where the case has one), or
load with every row accounted for: rows loaded + rows the reader reports as skipped ==
rows written. Any other exception (pandas / pyarrow / numpy / pickle / safetensors
escaping) fails the test with its traceback. The outcome of every case is tallied in
``OUTCOMES`` and printed at the end of the module (run with ``-s``); docs/reliability.md
quotes the numbers.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safetensors.torch import save_file

from mmrec.datasets.features import write_features
from mmrec.datasets.loading import load_dataset
from mmrec.datasets.schema import FeatureTable
from mmrec.errors import DataError, MMRecError

#: outcome tallies per fault class: {class: Counter(error=..., loaded=...)}
OUTCOMES: dict[str, Counter] = defaultdict(Counter)

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(sum(c.values()) for c in OUTCOMES.values())
    print(f"\nfuzz cases: {total}")
    for name, c in sorted(OUTCOMES.items()):
        print(f"  {name}: {sum(c.values())} cases, {dict(sorted(c.items()))}")


# ---------------------------------------------------------------------------
# well-formed datasets of every format (as {relative path: bytes})
# ---------------------------------------------------------------------------

N_USERS, N_ITEMS = 9, 12


def _pairs(n: int = 40, seed: int = 0) -> list[tuple[int, int, str, int, float]]:
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n):
        u, i = r % N_USERS, int(rng.integers(N_ITEMS))
        rows.append((u, i, "buy" if r % 3 else "view", 1000 + r, float(rng.integers(1, 6))))
    return rows


def canonical_files(sep: str = "\t", ext: str = "tsv") -> dict[str, bytes]:
    rows = _pairs()
    lines = [sep.join(["user", "item", "behavior", "timestamp", "rating"])]
    lines += [sep.join([f"u{u}", str(i), b, str(t), f"{r:g}"]) for u, i, b, t, r in rows]
    test = [sep.join(["user", "item"])] + [sep.join([f"u{u}", str((u * 5) % N_ITEMS)]) for u in range(N_USERS)]
    items = [sep.join(["item", "title"])] + [sep.join([str(i), f"title {i}"]) for i in range(N_ITEMS)]
    return {f"interactions.{ext}": ("\n".join(lines) + "\n").encode(),
            f"test.{ext}": ("\n".join(test) + "\n").encode(),
            f"items.{ext}": ("\n".join(items) + "\n").encode(),
            "dataset.yaml": b"name: fuzz\nbehaviors: [view, buy]\n"}


def mmrec_files() -> dict[str, bytes]:
    rows = _pairs()
    lines = ["userID\titemID\trating\ttimestamp\tx_label"]
    lines += [f"{u}\t{i}\t{r:g}\t{t}\t{k % 5 == 4 and 2 or 0}" for k, (u, i, _, t, r) in enumerate(rows)]
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(1).normal(size=(N_ITEMS, 4)).astype(np.float32))
    return {"fuzz.inter": ("\n".join(lines) + "\n").encode(), "image_feat.npy": buf.getvalue()}


def recbole_files() -> dict[str, bytes]:
    rows = _pairs()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"u{u}\t{i}\t{r:g}\t{t}" for u, i, _, t, r in rows]
    items = ["item_id:token\ttitle:token_seq"] + [f"{i}\ttitle {i}" for i in range(N_ITEMS)]
    return {"fuzz.inter": ("\n".join(lines) + "\n").encode(), "fuzz.item": ("\n".join(items) + "\n").encode()}


def _matrix(behavior: str) -> sp.csr_matrix:
    rows = [(u, i) for u, i, b, _, _ in _pairs() if b == behavior]
    u, i = np.array(rows).T
    return sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(N_USERS, N_ITEMS))


def mbgmn_files() -> dict[str, bytes]:
    tst = [(u * 5) % N_ITEMS if u % 2 else None for u in range(N_USERS)]
    return {"trn_view": pickle.dumps(_matrix("view")), "trn_buy": pickle.dumps(_matrix("buy")),
            "tst_int": pickle.dumps(tst)}


def sslrec_files() -> dict[str, bytes]:
    test = sp.csr_matrix((np.ones(N_USERS), (np.arange(N_USERS), np.arange(N_USERS) % N_ITEMS)),
                         shape=(N_USERS, N_ITEMS))
    return {"train_mat_view.pkl": pickle.dumps(_matrix("view")), "train_mat_buy.pkl": pickle.dumps(_matrix("buy")),
            "test_mat.pkl": pickle.dumps(test)}


def features_bytes(n_rows: int = N_ITEMS, ids: list[str] | None = None, nan_row: int | None = None) -> bytes:
    feats = torch.arange(n_rows * 3, dtype=torch.float32).reshape(n_rows, 3)
    if nan_row is not None:
        feats[nan_row, 1] = float("nan")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        if ids == []:  # a file without item_ids: rows are items by position
            save_file({"features": feats, "mask": torch.ones(n_rows, dtype=torch.bool)}, str(path))
            return path.read_bytes()
        write_features(path, FeatureTable(feats, torch.ones(n_rows, dtype=torch.bool)),
                       ids if ids is not None else [str(i) for i in range(n_rows)])
        return path.read_bytes()


def canonical_with_features() -> dict[str, bytes]:
    files = canonical_files()
    files["features/image.safetensors"] = features_bytes()
    return files


FORMATS: dict[str, tuple[Callable[[], dict[str, bytes]], str | None]] = {
    "canonical": (canonical_files, "canonical"),
    "csv": (lambda: canonical_files(",", "csv"), "csv"),
    "mmrec": (mmrec_files, "mmrec"),
    "recbole": (recbole_files, "recbole"),
    "mbgmn": (mbgmn_files, "mbgmn"),
    "sslrec": (sslrec_files, "mbgmn"),
    "features": (canonical_with_features, "canonical"),
}
BASE = {name: make() for name, (make, _) in FORMATS.items()}


# ---------------------------------------------------------------------------
# loading and checking
# ---------------------------------------------------------------------------

def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _load(fault: str, fmt: str, files: dict[str, bytes], **opts: Any) -> tuple[Any, Path]:
    """Write ``files`` into a fresh directory and load it: a Dataset, or the MMRecError it raised.

    Only MMRecError is caught: anything else escapes and fails the test.
    """
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    _write(root, files)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out: Any = load_dataset(root, format=FORMATS[fmt][1], **opts)
        OUTCOMES[fault]["loaded"] += 1
    except MMRecError as e:
        assert str(root) in str(e), f"error does not name a file of the dataset: {e}"
        OUTCOMES[fault]["error"] += 1
        out = e
    finally:
        tmp.cleanup()
    return out, root


def _text_rows(data: bytes, sep: str) -> int:
    """Non-blank data rows, read the way the readers' line locator reads them (Python's csv)."""
    text = data.decode("utf-8", errors="surrogateescape")  # bytes in a column no reader decodes
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=sep) if r]
    return max(len(rows) - 1, 0)


def _check_accounting(fmt: str, files: dict[str, bytes], data: Any) -> None:
    """Rows loaded + rows reported skipped == rows written (text formats)."""
    if fmt in ("canonical", "csv", "features"):
        ext, sep = ("csv", ",") if fmt == "csv" else ("tsv", "\t")
        assert len(data.train) == _text_rows(files[f"interactions.{ext}"], sep)
        test_written = _text_rows(files[f"test.{ext}"], sep)
        skipped = data.report.get("unseen", {}).get("test", {}).get("rows", 0)
        assert (len(data.test) if data.test is not None else 0) + skipped == test_written
    elif fmt == "mmrec":
        n = sum(len(s) for s in (data.train, data.valid, data.test) if s is not None)
        assert n == _text_rows(files["fuzz.inter"], "\t")
    elif fmt == "recbole":
        assert len(data.train) == _text_rows(files["fuzz.inter"], "\t")


# ---------------------------------------------------------------------------
# 1. byte flips and truncation of every file of every format
# ---------------------------------------------------------------------------

FILE_CHOICES = [(fmt, rel) for fmt, files in BASE.items() for rel in files
                if not (fmt == "features" and not rel.startswith("features/"))]
INTERESTING = [0, 9, 10, 13, 34, 44, 0x80, 0xC3, 0xFF, ord("-"), ord("9"), ord("e"), ord("n")]


@given(choice=st.sampled_from(FILE_CHOICES),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255))),
                      min_size=1, max_size=4))
@settings(FUZZ, max_examples=420)
def test_byte_flips(choice, flips):
    fmt, rel = choice
    files = dict(BASE[fmt])
    data = bytearray(files[rel])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    files[rel] = bytes(data)
    out, _ = _load(f"byte flips: {fmt}", fmt, files)
    if not isinstance(out, MMRecError):
        _check_accounting(fmt, files, out)


@given(choice=st.sampled_from(FILE_CHOICES), cut=st.floats(0, 1, exclude_max=True))
@settings(FUZZ, max_examples=160)
def test_truncation(choice, cut):
    fmt, rel = choice
    files = dict(BASE[fmt])
    files[rel] = files[rel][: int(cut * len(files[rel]))]
    out, _ = _load(f"truncation: {fmt}", fmt, files)
    if not isinstance(out, MMRecError):
        _check_accounting(fmt, files, out)


# ---------------------------------------------------------------------------
# 2. structured faults in text files: exact file, line and field
# ---------------------------------------------------------------------------

TEXT_FORMATS = {"canonical": ("interactions.tsv", "\t"), "csv": ("interactions.csv", ","),
                "mmrec": ("fuzz.inter", "\t"), "recbole": ("fuzz.inter", "\t")}


def _edit_row(fmt: str, row: int, edit: Callable[[list[str]], list[str]] | None = None,
              raw: Callable[[bytes], bytes] | None = None) -> tuple[dict[str, bytes], str, int]:
    """Apply ``edit`` to data row ``row`` (0-based) of the main interaction file; returns (files, name, line)."""
    name, sep = TEXT_FORMATS[fmt]
    files = dict(BASE[fmt])
    lines = files[name].split(b"\n")
    k = 1 + row % (len([x for x in lines if x]) - 1)
    if edit is not None:
        lines[k] = sep.join(edit(lines[k].decode().split(sep))).encode()
    if raw is not None:
        lines[k] = raw(lines[k])
    files[name] = b"\n".join(lines)
    return files, name, k + 1


@given(fmt=st.sampled_from(sorted(TEXT_FORMATS)), row=st.integers(0, 100), delta=st.sampled_from([-3, -2, -1, 1, 2]))
@settings(FUZZ, max_examples=60)
def test_wrong_column_count(fmt, row, delta):
    def edit(fields: list[str]) -> list[str]:
        return fields[:delta] if delta < 0 else fields + ["x"] * delta

    files, name, line = _edit_row(fmt, row, edit)
    out, root = _load("wrong column count", fmt, files)
    assert isinstance(out, DataError), out
    assert (out.file, out.line) == (str(root / name), line)
    assert "fields but the header has" in str(out)


@given(fmt=st.sampled_from(sorted(TEXT_FORMATS)), row=st.integers(0, 100),
       bad=st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80abc", b"\xf0\x28\x8c\x28"]),
       at=st.floats(0, 1))
@settings(FUZZ, max_examples=60)
def test_non_utf8(fmt, row, bad, at):
    def raw(line: bytes) -> bytes:
        k = int(at * len(line))
        return line[:k] + bad + line[k:]

    files, name, line = _edit_row(fmt, row, raw=raw)
    out, root = _load("non-UTF-8", fmt, files)
    assert isinstance(out, DataError), out
    assert (out.file, out.line) == (str(root / name), line)
    assert "UTF-8" in str(out)


RATING_FIELD = {"canonical": 4, "csv": 4, "mmrec": 2, "recbole": 2}


@given(fmt=st.sampled_from(sorted(TEXT_FORMATS)), row=st.integers(0, 100),
       value=st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "", "abc", "1e999", "-1e400", "1,5"]))
@settings(FUZZ, max_examples=80)
def test_nan_ratings(fmt, row, value):
    if fmt == "csv" and value == "1,5":
        value = "1;5"

    def edit(fields: list[str]) -> list[str]:
        fields[RATING_FIELD[fmt]] = value
        return fields

    files, name, line = _edit_row(fmt, row, edit)
    out, root = _load("NaN / non-numeric ratings", fmt, files)
    assert isinstance(out, DataError), out
    assert (out.file, out.line) == (str(root / name), line)
    assert out.field is not None and out.field.startswith("rating")


@given(fmt=st.sampled_from(sorted(TEXT_FORMATS)), rows=st.lists(st.integers(0, 100), min_size=1, max_size=8))
@settings(FUZZ, max_examples=60)
def test_duplicate_rows(fmt, rows):
    """Duplicate interactions are data (repeat purchases): all of them load, none is lost."""
    name, _ = TEXT_FORMATS[fmt]
    files = dict(BASE[fmt])
    lines = [x for x in files[name].split(b"\n") if x]
    lines += [lines[1 + r % (len(lines) - 1)] for r in rows]
    files[name] = b"\n".join(lines) + b"\n"
    out, _ = _load("duplicate rows", fmt, files)
    assert not isinstance(out, MMRecError), out
    _check_accounting(fmt, files, out)


@given(row=st.integers(0, 100), extra=st.integers(1, 3))
@settings(FUZZ, max_examples=20)
def test_duplicate_item_rows(row, extra):
    files = dict(BASE["canonical"])
    lines = [x for x in files["items.tsv"].split(b"\n") if x]
    k = 1 + row % (len(lines) - 1)
    lines.insert(k + 1, lines[k])
    files["items.tsv"] = b"\n".join(lines) + b"\n"
    out, root = _load("duplicate rows", "canonical", files)
    assert isinstance(out, DataError), out
    assert (out.file, out.line) == (str(root / "items.tsv"), k + 2)


# ---------------------------------------------------------------------------
# 3. huge or negative ids
# ---------------------------------------------------------------------------

HUGE = ["99999999999999999999999", str(2 ** 63), str(2 ** 63 - 1), str(2 ** 40), "1e30", "-1", "-9223372036854775808",
        "000000000000000000000007", "+5"]


@given(fmt=st.sampled_from(["canonical", "csv", "recbole"]), row=st.integers(0, 100), value=st.sampled_from(HUGE),
       column=st.sampled_from([0, 1]))
@settings(FUZZ, max_examples=60)
def test_huge_or_negative_ids_string_formats(fmt, row, value, column):
    """Ids are strings in these formats: any spelling is a distinct id, nothing is lost."""
    def edit(fields: list[str]) -> list[str]:
        fields[column] = value
        return fields

    files, _, _ = _edit_row(fmt, row, edit)
    out, _ = _load("huge or negative ids", fmt, files)
    assert not isinstance(out, MMRecError), out
    _check_accounting(fmt, files, out)
    ids = out.user_ids if column == 0 else out.item_ids
    assert value in set(ids)


@given(row=st.integers(0, 100), value=st.sampled_from(HUGE), column=st.sampled_from([0, 1]))
@settings(FUZZ, max_examples=40)
def test_huge_or_negative_ids_mmrec(row, value, column):
    """MMRec ids are indices (count = largest + 1): a negative or absurd one is an error at its line."""
    def edit(fields: list[str]) -> list[str]:
        fields[column] = value
        return fields

    files, name, line = _edit_row("mmrec", row, edit)
    out, root = _load("huge or negative ids", "mmrec", files)
    if value == "000000000000000000000007":  # the integer 7
        assert not isinstance(out, MMRecError), out
        return
    assert isinstance(out, DataError), out
    assert out.file == str(root / name) and out.line == line


@given(fmt=st.sampled_from(["mbgmn", "sslrec"]), n_users=st.sampled_from([N_USERS, 10 ** 7, 2 ** 40]),
       n_items=st.sampled_from([N_ITEMS, 10 ** 8, 2 ** 40]), bad_index=st.sampled_from([None, -1, 10 ** 6, 2 ** 31 - 1]))
@settings(FUZZ, max_examples=40)
def test_huge_shapes_and_indices_in_pickles(fmt, n_users, n_items, bad_index):
    """A matrix claiming 10^12 users, or an index outside its shape, is an error, not an allocation."""
    m = _matrix("buy")
    if bad_index is not None:
        m.indices = m.indices.copy()
        m.indices[0] = bad_index  # unpickling sets the arrays as they are: scipy does not check them
    m._shape = (n_users, n_items)
    files = dict(BASE[fmt])
    files["trn_buy" if fmt == "mbgmn" else "train_mat_buy.pkl"] = pickle.dumps(m)
    out, root = _load("huge or negative ids", fmt, files)
    if (n_users, n_items, bad_index) == (N_USERS, N_ITEMS, None):  # the control: a well-formed matrix
        assert not isinstance(out, MMRecError), out
        assert len(out.train) == len(_matrix("view").data) + len(_matrix("buy").data)
        return
    assert isinstance(out, DataError), out
    assert out.file == str(root / ("trn_buy" if fmt == "mbgmn" else "train_mat_buy.pkl"))


# ---------------------------------------------------------------------------
# 4. feature files whose rows disagree with the items
# ---------------------------------------------------------------------------

@given(case=st.sampled_from(["fewer rows", "more rows", "unknown ids", "duplicate ids", "nan", "shuffled"]),
       k=st.integers(1, 5))
@settings(FUZZ, max_examples=60)
def test_features_disagree_with_items(case, k):
    files = dict(BASE["canonical"])
    ids = [str(i) for i in range(N_ITEMS)]
    expect_error = True
    if case == "fewer rows":
        blob = features_bytes(N_ITEMS - k, ids=[]) if k % 2 else features_bytes(N_ITEMS - k, ids[: N_ITEMS - k])
        expect_error = k % 2 == 1  # without ids the rows cannot be matched; with ids the rest are masked
    elif case == "more rows":
        blob = features_bytes(N_ITEMS + k, ids=ids + [f"new{j}" for j in range(k)])
        expect_error = False
    elif case == "unknown ids":
        blob = features_bytes(N_ITEMS, ids=ids[:-k] + [f"x{j}" for j in range(k)])
        expect_error = False
    elif case == "duplicate ids":
        blob = features_bytes(N_ITEMS, ids=ids[:-1] + [ids[k]])
    elif case == "nan":
        blob = features_bytes(N_ITEMS, nan_row=k)
    else:
        blob = features_bytes(N_ITEMS, ids=ids[k:] + ids[:k])
        expect_error = False
    files["features/image.safetensors"] = blob
    out, root = _load("features disagree with items", "canonical", files)
    if expect_error:
        assert isinstance(out, DataError), out
        assert out.file == str(root / "features" / "image.safetensors")
        return
    assert not isinstance(out, MMRecError), out
    table = out.items.features["image"]
    n_file = {"fewer rows": N_ITEMS - k, "more rows": N_ITEMS + k}.get(case, N_ITEMS)
    unmatched = int(table.meta.get("unmatched_rows", 0))
    assert int(table.mask.sum()) + unmatched == n_file  # every file row: used, or counted as unmatched
    if case == "shuffled":
        row = out.item_ids.tolist().index(ids[0])
        assert torch.equal(table.features[row], torch.arange(3.0) + 3 * (N_ITEMS - k))


# ---------------------------------------------------------------------------
# 5. held-out rows that the reader skips are counted
# ---------------------------------------------------------------------------

@given(fmt=st.sampled_from(["canonical", "csv"]),
       unseen=st.lists(st.tuples(st.integers(0, 100), st.sampled_from(["user", "item", "both"])), max_size=6))
@settings(FUZZ, max_examples=40)
def test_unseen_held_out_rows_are_counted(fmt, unseen):
    ext, sep = ("csv", ",") if fmt == "csv" else ("tsv", "\t")
    files = dict(BASE[fmt])
    lines = [x for x in files[f"test.{ext}"].split(b"\n") if x]
    for r, what in unseen:
        u, i = lines[1 + r % (len(lines) - 1)].split(sep.encode())
        lines.append((b"ghost" if what != "item" else u) + sep.encode() + (b"999" if what != "user" else i))
    files[f"test.{ext}"] = b"\n".join(lines) + b"\n"
    out, _ = _load("unseen held-out rows", fmt, files)
    assert not isinstance(out, MMRecError), out
    _check_accounting(fmt, files, out)
    assert out.report.get("unseen", {}).get("test", {}).get("rows", 0) == len(unseen)


def test_fuzz_case_count():
    """Runs last (file order): the whole module ran at least 1,000 cases."""
    total = sum(sum(c.values()) for c in OUTCOMES.values())
    if len(OUTCOMES) < 8:
        pytest.skip("only part of the module ran")
    assert total >= 1000, dict(OUTCOMES)
    print(json.dumps({k: dict(v) for k, v in OUTCOMES.items()}, sort_keys=True))


class _DtypeWithState:
    """Pickles as numpy.dtype('f8') with a given BUILD state (what a flipped byte produces)."""

    def __init__(self, state: tuple) -> None:
        self.state = state

    def __reduce__(self):
        return np.dtype, ("f8", False, True), self.state


@pytest.mark.parametrize("flags", [1, 63, -1])
def test_pickled_dtype_with_forged_flags_is_refused(tmp_path, flags):
    """Found by the byte flips: numpy applies a dtype's pickled flags unchecked (corrupting numpy)."""
    from mmrec.datasets.readers.mbgmn import load_pickle
    path = tmp_path / "trn_buy"
    path.write_bytes(pickle.dumps(_DtypeWithState((3, "<", None, None, None, -1, -1, flags))))
    with pytest.raises(DataError, match="non-standard state") as e:
        load_pickle(path)
    assert e.value.file == str(path)
    blob = pickle.dumps([np.arange(3, dtype=">f8"), np.dtype(">i4"), np.dtype("<i4"), np.zeros(2, bool)])
    path.write_bytes(blob)
    loaded, plain = load_pickle(path), pickle.loads(blob)  # the states numpy itself writes still load
    assert [x.dtype if isinstance(x, np.ndarray) else x for x in loaded] == \
        [x.dtype if isinstance(x, np.ndarray) else x for x in plain]
    assert loaded[1] == np.dtype(">i4") and loaded[0].tolist() == [0.0, 1.0, 2.0]
