"""Fast typed reading of tab-separated files (comma-separated for ``*.csv``), with exact error locations.

Good files take the fast path: pyarrow's multithreaded CSV parser (ids as strings,
since '007' != '7'), vectorised checks, and vectorised id encoding. Only when a
check fails is the file scanned line by line with Python's ``csv`` module, to name
the exact line (1-based, header = line 1) and field; good files pay nothing for
good messages.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from mmrec.errors import DataError

# Column kinds.
ID = "id"        # non-empty string
TEXT = "text"    # any string
FLOAT = "float"  # finite float64
INT = "int"      # int64
TIME = "time"    # int64 when every value is an integer, else finite float64

ColumnSpec = Callable[[str], "tuple[str, str] | None"]  # header name -> (canonical name, kind)


def named(kinds: dict[str, str]) -> ColumnSpec:
    """Spec for files whose header names are the canonical names."""
    return lambda h: (h, kinds[h]) if h in kinds else None


@dataclass
class Table:
    """Typed columns of one file, by canonical name, plus what is needed to point at a line."""

    path: Path
    header: list[str]
    columns: dict[str, pa.ChunkedArray]
    fields: dict[str, str]          # canonical name -> header name (for messages)
    n_rows: int
    ignored: list[str] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return name in self.columns

    def line_of(self, row: int) -> int:
        """1-based line of data row ``row`` (0-based, blank lines not counted)."""
        for i, (line, _) in enumerate(iter_rows(self.path)):
            if i == row:
                return line
        raise IndexError(row)

    def error(self, row: int, name: str, message: str) -> DataError:
        return DataError(message, file=self.path, line=self.line_of(row), field=self.fields.get(name, name))


def delimiter_of(path: str | Path) -> str:
    """``,`` for ``*.csv`` files (the ``csv`` reader), a tab for everything else."""
    return "," if Path(path).suffix.lower() == ".csv" else "\t"


def read_header(path: Path) -> list[str]:
    """The header row; an absent or empty file is a DataError."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    for line, row in iter_rows(path, header=True):
        return [h.strip() for h in row]
    raise DataError("empty file: expected a header row", file=path, line=1)


def read_table(path: str | Path, spec: ColumnSpec, required: Sequence[str] = (),
               int_ids: Sequence[str] = ()) -> Table:
    """Read the columns that ``spec`` names; anything malformed is a DataError at its line.

    ``int_ids``: id columns (canonical names) to try reading as integers (see
    :func:`_parse_int_ids`); they come back as int64 only when every value in them is
    a canonical non-negative integer, so the result means the same as the string read.
    """
    path = Path(path)
    header = read_header(path)
    seen: set[str] = set()
    for h in header:
        if h in seen:
            raise DataError(f"column '{h}' appears twice in the header", file=path, line=1, field=h)
        seen.add(h)
    wanted: dict[str, tuple[str, str]] = {}
    ignored = []
    for h in header:
        m = spec(h)
        if m is None:
            ignored.append(h)
        else:
            wanted[h] = m
    names = {canon for canon, _ in wanted.values()}
    for r in required:
        if r not in names:
            raise DataError(f"missing column '{r}' (header has: {', '.join(header) or 'nothing'})",
                            file=path, line=1, field=r)
    columns = None
    if int_ids and not ignored:
        columns = _parse_int_ids(path, header, wanted, [h for h, (c, k) in wanted.items() if c in int_ids and k == ID])
    if columns is None:
        columns = _parse(path, header, wanted)
    n_rows = len(next(iter(columns.values()))) if columns else 0
    fields = {canon: h for h, (canon, _) in wanted.items()}
    table = Table(path, header, {wanted[h][0]: col for h, col in columns.items()}, fields, n_rows, ignored)
    kinds = {canon: kind for canon, kind in wanted.values()}
    _validate(table, kinds)
    for name, kind in kinds.items():  # times like 1.6e9 or 100.0 that are whole numbers: int64 after all
        col = table.columns[name]
        if kind == TIME and pa.types.is_floating(col.type) and n_rows \
                and pc.all(pc.equal(col, pc.round(col))).as_py() and pc.max(pc.abs(col)).as_py() < 2 ** 53:
            table.columns[name] = col.cast(pa.int64())
    return table


#: Canonical columns with a handful of distinct values (read dictionary-encoded on the fast path).
FEW_VALUES = ("behavior",)
_POW10 = np.array([10 ** k for k in range(19)], dtype=np.int64)


def _decimal_length_sum(values: np.ndarray) -> int:
    """Total characters of non-negative int64s written in canonical decimal ('0', '7', '12').

    A number has 1 + #{k >= 1 : v >= 10^k} digits; one cheap comparison pass per digit
    of the largest value beats a per-element logarithm or search.
    """
    if len(values) == 0:
        return 0
    total, top = len(values), int(values.max())
    for p in _POW10[1:]:
        if p > top:
            break
        total += int(np.count_nonzero(values >= p))
    return total


_DIGITS = re.compile(rb"(0|[1-9][0-9]{0,17})")


def _first_row_has_int_ids(path: Path, header: list[str], int_headers: list[str]) -> bool:
    """Cheap pre-check on the first data row, so string-id files skip a doomed integer parse.

    Only a hint: a True here still goes through the byte-count proof below.
    """
    with open(path, "rb") as f:
        f.readline()
        row = f.readline().rstrip(b"\r\n").split(delimiter_of(path).encode())
    if len(row) != len(header):
        return False
    return all(_DIGITS.fullmatch(row[header.index(h)]) for h in int_headers)


def _parse_int_ids(path: Path, header: list[str], wanted: dict[str, tuple[str, str]],
                   int_headers: list[str]) -> dict[str, pa.ChunkedArray] | None:
    """Read ``int_headers`` as int64 when that loses nothing; None = use the string path.

    Integers parse and hash several times faster than strings, but the parser also
    accepts '007' and ' 7', which as ids differ from '7'. Every such non-canonical
    spelling is *longer* than the canonical one, so the file's byte count proves the
    absence of all of them at once: the data bytes must equal the canonical lengths of
    the integer fields plus the exact lengths of the other fields plus one separator per
    field. Quotes, CR-LF endings, blank lines or padding all break the equality and
    send the file down the string path, which reads it exactly as before.
    """
    if not int_headers or not _first_row_has_int_ids(path, header, int_headers):
        return None
    types = {h: (pa.int64() if h in int_headers else pa.string()) for h in wanted}
    for h, (canon, kind) in wanted.items():
        if kind == TIME and h not in int_headers:
            types[h] = pa.int64()
        elif canon in FEW_VALUES:  # behaviors, scenarios: dictionary-encoded while parsing, in parallel
            types[h] = pa.dictionary(pa.int32(), pa.string())
    size = os.path.getsize(path)
    block = int(min(max(size // (4 * (os.cpu_count() or 1)), 1 << 20), 16 << 20))
    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(column_names=header, skip_rows=1, block_size=block),
            parse_options=pcsv.ParseOptions(delimiter=delimiter_of(path)),
            convert_options=pcsv.ConvertOptions(column_types=types, include_columns=list(wanted), null_values=[],
                                                strings_can_be_null=False, quoted_strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError):
        return None
    n = table.num_rows
    if n == 0:
        return None
    with open(path, "rb") as f:
        first = f.readline()
        f.seek(size - 1)
        trailing_newline = f.read(1) == b"\n"
    if not first.endswith(b"\n") or first.endswith(b"\r\n"):
        return None
    total = n * len(header) - (0 if trailing_newline else 1)   # tabs and newlines
    for h in wanted:
        col = table.column(h)
        if pa.types.is_integer(col.type):
            for chunk in col.chunks:
                values = chunk.to_numpy()
                if len(values) and (values.min() < 0 or values.max() >= _POW10[-1]):
                    return None  # negative ids are not plain integers on the string path either
                total += _decimal_length_sum(values)
        elif pa.types.is_dictionary(col.type):
            for chunk in col.chunks:
                counts = np.bincount(chunk.indices.to_numpy(), minlength=len(chunk.dictionary))
                total += int(counts @ pc.binary_length(chunk.dictionary).to_numpy().astype(np.int64))
        else:
            total += int(pc.sum(pc.binary_length(col)).as_py() or 0)
    if total != size - len(first):
        return None
    out: dict[str, pa.ChunkedArray] = {}
    for h, (_, kind) in wanted.items():
        col = table.column(h)
        if pa.types.is_dictionary(col.type):
            col = col.unify_dictionaries()
        if kind == FLOAT:
            try:
                col = col.cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return None
        out[h] = col
    return out


def _arrow_type(kind: str) -> pa.DataType:
    return {ID: pa.string(), TEXT: pa.string(), FLOAT: pa.float64(), INT: pa.int64(), TIME: pa.int64()}[kind]


def _parse(path: Path, header: list[str], wanted: dict[str, tuple[str, str]]) -> dict[str, pa.ChunkedArray]:
    types = {h: _arrow_type(kind) for h, (_, kind) in wanted.items()}
    for h, (canon, kind) in wanted.items():
        if canon in FEW_VALUES and kind == ID:
            types[h] = pa.dictionary(pa.int32(), pa.string())
    size = os.path.getsize(path)
    # A few blocks per core: enough to use every core, few enough to keep per-block overhead low.
    block = int(min(max(size // (4 * (os.cpu_count() or 1)), 1 << 20), 16 << 20))
    for attempt in range(2):
        try:
            table = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(column_names=header, skip_rows=1, block_size=block),
                parse_options=pcsv.ParseOptions(delimiter=delimiter_of(path)),
                convert_options=pcsv.ConvertOptions(
                    column_types=types, include_columns=list(wanted), null_values=[],
                    strings_can_be_null=False, quoted_strings_can_be_null=False),
            )
            return {h: (table.column(h).unify_dictionaries() if pa.types.is_dictionary(table.column(h).type)
                        else table.column(h)) for h in wanted}
        except pa.ArrowInvalid as e:
            # A TIME column of non-integers is fine: read it again as float.
            m = re.search(r"column #(\d+)", str(e))
            col = header[int(m.group(1))] if m and int(m.group(1)) < len(header) else None
            if attempt == 0 and col in wanted and wanted[col][1] == TIME and "int64" in str(e):
                types[col] = pa.float64()
                continue
            raise _locate(path, header, wanted, str(e)) from None
    raise AssertionError("unreachable")


def _validate(table: Table, kinds: dict[str, str]) -> None:
    """Vectorised checks; any failure is located by the slow scan."""
    for name, kind in kinds.items():
        col = table.columns[name]
        bad = None
        if kind == ID and table.n_rows and pa.types.is_dictionary(col.type):
            bad = any(pc.any(pc.equal(pc.binary_length(c.dictionary), 0)).as_py() for c in col.chunks if len(c))
        elif kind == ID and table.n_rows and not pa.types.is_integer(col.type):
            bad = pc.any(pc.equal(pc.binary_length(col), 0)).as_py()
        elif kind in (FLOAT, TIME) and pa.types.is_floating(col.type) and table.n_rows:
            bad = not pc.all(pc.is_finite(col)).as_py()
        if bad:
            wanted = {table.fields[n]: (n, k) for n, k in kinds.items()}
            raise _locate(table.path, table.header, wanted, f"bad value in column '{table.fields[name]}'")


def iter_rows(path: Path, header: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank row after the header (or of the header)."""
    lines = _decoded_lines(path)
    reader = csv.reader(lines, delimiter=delimiter_of(path))
    first = True
    for row in _csv_rows(reader, path):
        if first:
            first = False
            if header:
                if row:
                    row[0] = row[0].lstrip("\ufeff")
                yield reader.line_num, row
                return
            continue
        if row:
            yield reader.line_num, row


def _csv_rows(reader: Any, path: Path) -> Iterator[list[str]]:
    """Rows of ``reader``; what the csv module cannot split (a bare CR in a field) is a DataError."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"cannot split the line into fields: {e}", file=path, line=reader.line_num) from None
        yield row


def _decoded_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (byte {e.start + 1} of the line)", file=path, line=n) from None


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INT = re.compile(r"-?\d+")  # the int64 parser takes no "+"


def _locate(path: Path, header: list[str], wanted: dict[str, tuple[str, str]], reason: str) -> DataError:
    """Scan line by line for the first bad row; fall back to the parser's own message."""
    n = len(header)
    index = {h: i for i, h in enumerate(header)}
    for line, row in iter_rows(path):
        if len(row) != n:
            if len(row) < n:
                return DataError(f"row has {len(row)} fields but the header has {n} "
                                 f"(missing '{header[len(row)]}')", file=path, line=line, field=header[len(row)])
            return DataError(f"row has {len(row)} fields but the header has {n} "
                             f"(extra value '{row[n]}' after '{header[-1]}')", file=path, line=line, field=header[-1])
        for h, (_, kind) in wanted.items():
            v = row[index[h]]
            if kind == ID and v == "":
                return DataError("empty value", file=path, line=line, field=h)
            if kind in (FLOAT, TIME) and not _NUMBER.fullmatch(v):
                return DataError(f"'{v}' is not a number", file=path, line=line, field=h)
            if kind in (FLOAT, TIME) and not math.isfinite(float(v)):
                return DataError(f"'{v}' is too large for a 64-bit float", file=path, line=line, field=h)
            if kind == INT and not _INT.fullmatch(v):
                return DataError(f"'{v}' is not an integer", file=path, line=line, field=h)
            if kind in (INT, TIME) and _INT.fullmatch(v) and not -2 ** 63 <= int(v) < 2 ** 63:
                return DataError(f"'{v}' is outside the 64-bit integer range", file=path, line=line, field=h)
    return DataError(f"cannot parse: {reason}", file=path)


# ---------------------------------------------------------------------------
# id encoding: string column -> contiguous codes in first-appearance order
# ---------------------------------------------------------------------------

_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


def encode(col: pa.ChunkedArray | pa.Array, few: bool = False) -> tuple[np.ndarray, pa.Array]:
    """Codes (int64, first appearance = 0, 1, ...) and the distinct strings in that order.

    Hashing strings is the slow part of loading, so ids of up to 15 bytes are first
    packed, exactly and reversibly (bytes plus length), into one or two 64-bit words,
    which hash faster than strings. ``few=True`` (behaviors, scenarios: a handful of
    values) hashes the strings directly, which is cheapest when the table stays in cache.
    """
    if isinstance(col, pa.Array):
        col = pa.chunked_array([col])
    if len(col) == 0:
        return np.zeros(0, dtype=np.int64), pa.array([], pa.string())
    if pa.types.is_integer(col.type):
        return _encode_ints(col)
    if pa.types.is_dictionary(col.type):  # unified dictionary: already in first-appearance order
        col = col.unify_dictionaries()
        codes = np.concatenate([c.indices.to_numpy() for c in col.chunks if len(c)]).astype(np.int64)
        return codes, col.chunks[0].dictionary.cast(pa.string())
    if col.type != pa.string():
        col = col.cast(pa.string())
    chunks = [c for c in col.chunks if len(c)]
    longest = 16 if few else max(pc.max(pc.binary_length(c)).as_py() or 0 for c in chunks)
    if longest <= 15:
        words = 1 if longest <= 7 else 2
        keys = np.empty((len(col), words), dtype=np.uint64)
        start = 0
        for c in chunks:
            keys[start:start + len(c)] = _pack(c, words)
            start += len(c)
        if words == 1:
            arr = pa.array(keys.reshape(-1).view(np.int64))
        else:
            arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(keys), [None, pa.py_buffer(keys)])
        del keys
        codes = pc.dictionary_encode(arr).indices.to_numpy()
        # The dictionary holds packed keys: take each distinct string from its first row instead.
        uniques = col.take(pa.array(_first_occurrences(codes))).combine_chunks()
        return codes.astype(np.int64), uniques
    enc = pc.dictionary_encode(col.combine_chunks())
    return enc.indices.to_numpy().astype(np.int64), enc.dictionary


def _encode_ints(col: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Codes of canonical integer ids in *numeric* order, and the ids as strings.

    Numeric order is what :func:`id_order` gives such ids on the string path, so the
    final indices agree. Dense ranges (the usual 0..n-1 ids) are ranked with a
    presence table in O(n + range), others by sorting.
    """
    values = np.concatenate([c.to_numpy() for c in col.chunks]) if col.num_chunks > 1 else col.chunks[0].to_numpy()
    lo, hi = int(values.min()), int(values.max())
    if hi - lo <= 8 * len(values) + (1 << 20):
        present = np.zeros(hi - lo + 1, dtype=bool)
        shifted = values - lo
        present[shifted] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        codes = rank[shifted]
        uniques = np.flatnonzero(present) + lo
    else:
        uniques, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64, copy=False), pa.array(uniques, pa.int64()).cast(pa.string())


def _pack(arr: pa.StringArray, words: int) -> np.ndarray:
    """[n, words] uint64 holding each string's bytes and its length, so equal keys = equal strings.

    One word (strings of at most 7 bytes): the bytes shifted to the top, the length
    in the low byte. Two words (at most 15 bytes): the first 8 bytes, then the rest
    with the length in the top byte.
    """
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=4 * arr.offset).astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    pad = np.empty(hi - lo + 8 * words + 8, dtype=np.uint8)
    pad[: hi - lo] = data[lo:hi]
    pad[hi - lo:] = 0
    # Every unaligned 8-byte window of the bytes, as one little-endian uint64 (a strided view, no copy).
    win = np.ndarray(shape=(len(pad) - 7,), dtype="<u8", buffer=pad, strides=(1,))
    starts = offsets[:-1]
    starts -= lo
    length = np.diff(offsets).astype(np.uint64)
    out = np.empty((n, words), dtype=np.uint64)
    if words == 1:
        # Shifting left by 64 - 8*len drops the bytes past the end and frees the low byte for the
        # length; empty strings (a shift of 64) all get the all-zero word, which no other string gets.
        shift = np.minimum(np.uint64(64) - (length << np.uint64(3)), np.uint64(63))
        out[:, 0] = (win[starts] << shift) | length
        if length.min() == 0:
            out[length == 0, 0] = 0
        return out
    out[:, 0] = win[starts] & _MASKS[np.minimum(length, 8).astype(np.int64)]
    rest = np.clip(length.astype(np.int64) - 8, 0, 8)
    out[:, 1] = (win[starts + 8] & _MASKS[rest]) | (length << np.uint64(56))
    return out


def _first_occurrences(codes: np.ndarray) -> np.ndarray:
    """Row of the first occurrence of each code, for codes numbered by first appearance."""
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64)
    running = np.maximum.accumulate(codes)
    new = np.empty(len(codes), dtype=bool)
    new[0] = True
    new[1:] = codes[1:] > running[:-1]
    return np.flatnonzero(new)


_CANONICAL_INT = r"^(0|[1-9][0-9]{0,17})$"


def id_order(ids: pa.Array) -> np.ndarray | None:
    """Permutation sorting ids numerically when every id is a plain integer, else None.

    Integer ids then keep their numbers as indices (id 5 -> index 5 when ids are
    0..n-1), which makes peers' files line up; other ids keep first-appearance order.
    '007' is not a plain integer, so such ids stay strings in file order.
    """
    if len(ids) == 0 or not pc.all(pc.match_substring_regex(ids, _CANONICAL_INT)).as_py():
        return None
    values = pc.cast(ids, pa.int64()).to_numpy()
    order = np.argsort(values, kind="stable")
    return None if np.array_equal(order, np.arange(len(order))) else order


def index_in(values: pa.ChunkedArray | pa.Array, id_set: pa.Array) -> np.ndarray:
    """Position of each value in ``id_set`` (int64), -1 where absent."""
    idx = pc.index_in(values, value_set=id_set)
    idx = pc.fill_null(idx, -1)
    if isinstance(idx, pa.ChunkedArray):
        return np.concatenate([c.to_numpy() for c in idx.chunks]).astype(np.int64) if idx.num_chunks else \
            np.zeros(0, np.int64)
    return idx.to_numpy().astype(np.int64)


def as_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """A column as one numpy array (TIME columns stay int64 when they parsed as int)."""
    if col.num_chunks == 0:
        return np.zeros(0, dtype=col.type.to_pandas_dtype())
    return col.to_numpy()
