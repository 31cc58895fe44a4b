"""Fuzzed ``users.tsv``, ``exposures.tsv`` and media files (hypothesis, deterministic), as test_fuzz_readers.py.

* ``users.tsv`` is read on demand by the heads (``mmrec.datasets.users.read_users``: a scenario
  column through ``derive_tasks``, one-hot side features through ``user_side_features``).
* ``exposures.tsv`` is read by the canonical loader and labelled by the ``exposures`` task rule.
* Images and audio go through ``mmrec.encoders``' one decoder each (``load_image``,
  ``load_waveform``) and ``preprocess_robust``, the path of pre-training and extraction.

Each case ends in an :class:`MMRecError` naming the file (and its line / field where the
fault has one; the item for media), or loads with every row accounted for (rows used +
rows counted as skipped == rows written; a bad media item masked and counted in
``BadMedia``). Any other exception fails the test. Outcomes are tallied in ``OUTCOMES`` and
printed at the end (``-s``); docs/reliability.md quotes them.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmrec.datasets.loading import load_dataset
from mmrec.errors import DataError, MMRecError
from tests.faults.test_fuzz_readers import FUZZ, INTERESTING, N_USERS, canonical_files, _text_rows

OUTCOMES: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    total = sum(sum(c.values()) for c in OUTCOMES.values())
    print(f"\nfuzz cases (users, exposures, media): {total}")
    for name, c in sorted(OUTCOMES.items()):
        print(f"  {name}: {sum(c.values())} cases, {dict(sorted(c.items()))}")


# ---------------------------------------------------------------------------
# users.tsv
# ---------------------------------------------------------------------------

AGES = ["1", "18", "25", "35", "45", "50", "56", "30", ""]  # "": an unknown age is allowed
USERS = ("user\tage\tgender\toccupation\n" + "".join(
    f"u{u}\t{AGES[u]}\t{'FM'[u % 2]}\t{u % 4}\n" for u in range(N_USERS))).encode()
EXPOSURES = ("user\titem\tclick\tconvert\n" + "".join(
    f"u{r % N_USERS}\t{(r * 7) % 12}\t{r % 2}\t{int(r % 6 == 0)}\n" for r in range(36))).encode()


def _base_files() -> dict[str, bytes]:
    files = canonical_files()
    files["users.tsv"] = USERS
    files["exposures.tsv"] = EXPOSURES
    return files


@pytest.fixture(scope="module")
def users_world(tmp_path_factory):
    """One loaded dataset whose users.tsv each case rewrites (the loader does not read users.tsv)."""
    root = tmp_path_factory.mktemp("users")
    for rel, data in _base_files().items():
        (root / rel).write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(root, format="canonical")


def _users_case(data, fault: str, content: bytes) -> Any:
    """Write ``content`` as users.tsv, read it the two ways the heads do; the table or the MMRecError."""
    from mmrec.datasets.users import read_users
    from mmrec.heads.tasks import derive_tasks
    from mmrec.train.heads import user_side_features
    path = Path(data.root) / "users.tsv"
    path.write_bytes(content)
    try:
        table = read_users(data.root, list(data.user_ids))
        derive_tasks(data, {"rule": "exposures", "scenario": "age"})
        derive_tasks(data, {"rule": "exposures", "scenario": "gender"})
        side = user_side_features(data, ["age", "occupation"])
        assert side.shape[0] == data.n_users and bool((side.sum(1) == 2).all())  # one group per column each
    except MMRecError as e:
        assert isinstance(e, DataError) and e.file == str(path), f"error does not name users.tsv: {e!r}"
        OUTCOMES[fault]["error"] += 1
        return e
    # every written row is a user of the dataset or an unknown user, counted; no row lost
    written = _text_rows(content.replace(b"\xef\xbb\xbf", b"", 1), "\t")
    assert int((table.lines > 0).sum()) + table.unknown_users == written
    assert table.missing_users == data.n_users - int((table.lines > 0).sum())
    OUTCOMES[fault]["loaded"] += 1
    return table


@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255))),
                      min_size=1, max_size=4))
@settings(FUZZ, max_examples=60)
def test_users_byte_flips(users_world, flips):
    content = bytearray(USERS)
    for where, byte in flips:
        content[int(where * len(content))] = byte
    _users_case(users_world, "users.tsv: byte flips", bytes(content))


@given(cut=st.floats(0, 1, exclude_max=True))
@settings(FUZZ, max_examples=20)
def test_users_truncation(users_world, cut):
    _users_case(users_world, "users.tsv: truncation", USERS[: int(cut * len(USERS))])


def _users_row(row: int, edit) -> tuple[bytes, int]:
    lines = USERS.split(b"\n")
    k = 1 + row % N_USERS
    lines[k] = edit(lines[k])
    return b"\n".join(lines), k + 1


@given(row=st.integers(0, 100), delta=st.sampled_from([-3, -2, -1, 1, 2]))
@settings(FUZZ, max_examples=15)
def test_users_wrong_column_count(users_world, row, delta):
    def edit(line: bytes) -> bytes:
        fields = line.split(b"\t")
        return b"\t".join(fields[:delta] if delta < 0 else fields + [b"x"] * delta)

    content, line = _users_row(row, edit)
    out = _users_case(users_world, "users.tsv: wrong column count", content)
    assert isinstance(out, DataError) and out.line == line and "expected 4 fields" in str(out)


@given(row=st.integers(0, 100), bad=st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80abc"]),
       at=st.floats(0, 1))
@settings(FUZZ, max_examples=15)
def test_users_non_utf8(users_world, row, bad, at):
    content, line = _users_row(row, lambda s: s[:int(at * len(s))] + bad + s[int(at * len(s)):])
    out = _users_case(users_world, "users.tsv: non-UTF-8", content)
    assert isinstance(out, DataError) and out.line == line and "not valid UTF-8" in str(out)


@given(row=st.integers(0, 100), value=st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "-1", "-30", "151",
                                                       "1e30", "abc", "3,5", "18 years"]))
@settings(FUZZ, max_examples=20)
def test_users_bad_ages(users_world, row, value):
    def edit(line: bytes) -> bytes:
        fields = line.split(b"\t")
        fields[1] = value.encode()
        return b"\t".join(fields)

    content, line = _users_row(row, edit)
    out = _users_case(users_world, "users.tsv: NaN / huge / negative ages", content)
    assert isinstance(out, DataError) and (out.line, out.field) == (line, "age"), out
    assert f"age '{value}'" in str(out)


@given(rows=st.lists(st.integers(0, 100), min_size=1, max_size=4))
@settings(FUZZ, max_examples=10)
def test_users_duplicate_rows(users_world, rows):
    lines = [x for x in USERS.split(b"\n") if x]
    content = b"\n".join(lines + [lines[1 + r % N_USERS] for r in rows]) + b"\n"
    out = _users_case(users_world, "users.tsv: duplicate rows", content)
    assert isinstance(out, DataError) and out.line == N_USERS + 2 and out.field == "user"
    assert "appears twice (first on line" in str(out)


@given(extra=st.lists(st.sampled_from(["u99", "U1", " u1", "u1 ", "", "1e3", "-1", "u" + "9" * 30]),
                      min_size=1, max_size=5, unique=True))
@settings(FUZZ, max_examples=10)
def test_users_unknown_users(users_world, extra):
    """Rows of users the dataset lacks are skipped and counted (ids are matched exactly, as strings)."""
    content = USERS + "".join(f"{u}\t30\tF\t1\n" for u in extra).encode()
    out = _users_case(users_world, "users.tsv: unknown users", content)
    assert not isinstance(out, MMRecError), out
    assert out.unknown_users == len(extra) and out.missing_users == 0


# ---------------------------------------------------------------------------
# exposures.tsv
# ---------------------------------------------------------------------------

def _exposures_case(fault: str, content: bytes) -> tuple[Any, Path]:
    """A dataset with ``content`` as exposures.tsv: loaded and labelled, or the MMRecError (naming the file)."""
    from mmrec.heads.tasks import derive_tasks
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    files = _base_files()
    files["exposures.tsv"] = content
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    path = root / "exposures.tsv"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_dataset(root, format="canonical")
            table = derive_tasks(data, {"rule": "exposures", "scenario": "gender"})
        exp = data.exposures
        written = _text_rows(content, "\t")
        skipped = data.report.get("unseen", {}).get("exposures", {}).get("rows", 0)
        assert len(exp) + skipped == written  # every written exposure is used or counted as skipped
        assert len(table.user) == len(exp)
        OUTCOMES[fault]["loaded"] += 1
        return table, path
    except MMRecError as e:
        assert isinstance(e, DataError) and e.file == str(path), f"error does not name exposures.tsv: {e!r}"
        OUTCOMES[fault]["error"] += 1
        return e, path
    finally:
        tmp.cleanup()


@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255))),
                      min_size=1, max_size=4))
@settings(FUZZ, max_examples=60)
def test_exposures_byte_flips(flips):
    content = bytearray(EXPOSURES)
    for where, byte in flips:
        content[int(where * len(content))] = byte
    _exposures_case("exposures.tsv: byte flips", bytes(content))


@given(cut=st.floats(0, 1, exclude_max=True))
@settings(FUZZ, max_examples=20)
def test_exposures_truncation(cut):
    _exposures_case("exposures.tsv: truncation", EXPOSURES[: int(cut * len(EXPOSURES))])


def _exposures_row(row: int, edit) -> tuple[bytes, int]:
    lines = EXPOSURES.split(b"\n")
    k = 1 + row % 36
    lines[k] = edit(lines[k])
    return b"\n".join(lines), k + 1


@given(row=st.integers(0, 100), delta=st.sampled_from([-3, -2, -1, 1, 2]))
@settings(FUZZ, max_examples=15)
def test_exposures_wrong_column_count(row, delta):
    def edit(line: bytes) -> bytes:
        fields = line.split(b"\t")
        return b"\t".join(fields[:delta] if delta < 0 else fields + [b"1"] * delta)

    content, line = _exposures_row(row, edit)
    out, path = _exposures_case("exposures.tsv: wrong column count", content)
    assert isinstance(out, DataError) and (out.file, out.line) == (str(path), line)
    assert "fields but the header has" in str(out)


@given(row=st.integers(0, 100), bad=st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80abc"]),
       at=st.floats(0, 1))
@settings(FUZZ, max_examples=15)
def test_exposures_non_utf8(row, bad, at):
    content, line = _exposures_row(row, lambda s: s[:int(at * len(s))] + bad + s[int(at * len(s)):])
    out, path = _exposures_case("exposures.tsv: non-UTF-8", content)
    assert isinstance(out, DataError) and (out.file, out.line) == (str(path), line)
    assert "UTF-8" in str(out)


@given(row=st.integers(0, 100), col=st.sampled_from([2, 3]),
       value=st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "-1", "2", "0.5", "1e30", "", "abc", "yes"]))
@settings(FUZZ, max_examples=30)
def test_exposures_bad_labels(row, col, value):
    def edit(line: bytes) -> bytes:
        fields = line.split(b"\t")
        fields[col] = value.encode()
        return b"\t".join(fields)

    content, line = _exposures_row(row, edit)
    out, path = _exposures_case("exposures.tsv: NaN / huge / negative labels", content)
    name = ["click", "convert"][col - 2]
    assert isinstance(out, DataError), out
    assert out.field is not None and name in out.field
    if out.line is not None:  # a value the reader cannot parse: at its line
        assert out.line == line
    else:  # parsed but not 0/1: the task rule names the value, the user and the item
        assert f"label values must be 0 or 1" in str(out) and "user 'u" in str(out)


@given(rows=st.lists(st.integers(0, 100), min_size=1, max_size=6))
@settings(FUZZ, max_examples=10)
def test_exposures_duplicate_rows(rows):
    """A repeated exposure is data (shown twice): all rows are kept and labelled."""
    lines = [x for x in EXPOSURES.split(b"\n") if x]
    content = b"\n".join(lines + [lines[1 + r % 36] for r in rows]) + b"\n"
    out, _ = _exposures_case("exposures.tsv: duplicate rows", content)
    assert not isinstance(out, MMRecError), out
    assert len(out.user) == 36 + len(rows)


@given(extra=st.lists(st.tuples(st.sampled_from(["u99", "U1", "u1 ", "u0", "1e3"]), st.sampled_from(["3", "99", "x"])),
                      min_size=1, max_size=5))
@settings(FUZZ, max_examples=10)
def test_exposures_unknown_users_and_items(extra):
    """Exposures of users / items the training data lacks are dropped and counted in report['unseen']."""
    content = EXPOSURES + "".join(f"{u}\t{i}\t1\t0\n" for u, i in extra).encode()
    out, _ = _exposures_case("exposures.tsv: unknown users / items", content)
    assert not isinstance(out, MMRecError), out
    known = sum(1 for u, i in extra if u == "u0" and i == "3")  # ids match exactly, as strings
    assert len(out.user) == 36 + known


def test_exposures_with_an_empty_id_is_an_error_at_its_line():
    out, path = _exposures_case("exposures.tsv: unknown users / items", EXPOSURES + b"\t3\t1\t0\n")
    assert isinstance(out, DataError) and (out.file, out.line, out.field) == (str(path), 38, "user"), out


# ---------------------------------------------------------------------------
# media: images and audio through mmrec.encoders
# ---------------------------------------------------------------------------

def _png(fmt: str = "PNG") -> bytes:
    from PIL import Image
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _wav() -> bytes:
    from scipy.io import wavfile
    buf = io.BytesIO()
    t = np.arange(1600) / 16000
    wavfile.write(buf, 16000, (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16))
    return buf.getvalue()


MEDIA = {"png": _png("PNG"), "jpeg": _png("JPEG"), "wav": _wav()}


@pytest.fixture(scope="module")
def media_encoders():
    import torch

    from mmrec.encoders import create_encoder
    torch.manual_seed(0)
    return {"image": create_encoder("image", "test_vit", pretrained=None, embed_dim=None).eval(),
            "audio": create_encoder("audio", "logmel-cnn", pretrained=None, embed_dim=None, channels=(8, 16),
                                    n_mels=32).eval()}


def _media_case(encoders, fault: str, kind: str, raw: Any) -> bool:
    """Decode ``raw`` (bytes or a path) with the loader, then in a batch beside a good item through
    preprocess_robust. Returns whether it decoded; a failure must be a DataError (field image/audio,
    naming the file for a path) and, in the batch, a masked and counted item."""
    from mmrec.encoders.audio import load_waveform
    from mmrec.encoders.image import load_image
    from mmrec.encoders.robust import BadMedia, preprocess_robust
    modality = "audio" if kind == "wav" else "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if modality == "image":
                load_image(raw, 7)
            else:
                load_waveform(raw, 16000, 7)
        decoded = True
    except DataError as e:
        assert e.field == modality and "item 7" in str(e), e
        if isinstance(raw, (str, Path)):
            assert e.file == str(raw), e
        decoded = False
    bad = BadMedia()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch, ok = preprocess_robust(encoders[modality], [MEDIA[kind], raw], modality, bad, ids=["good", "x"])
    assert batch is not None and bool(ok[0])  # the good item is never lost with the bad one
    empty = isinstance(raw, (bytes, bytearray)) and len(raw) == 0
    if decoded and not empty:
        assert bool(ok[1]) and bad.total() == 0
    else:  # masked and counted: missing (no bytes), corrupt or too_large
        assert not bool(ok[1]) and bad.total() == 1
        (key,) = bad.counts
        assert key.split("/")[0] == modality and key.split("/")[1] in ("missing", "corrupt", "too_large")
    OUTCOMES[fault]["loaded" if decoded and not empty else "masked"] += 1
    return decoded


@pytest.mark.parametrize("kind", sorted(MEDIA))
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                st.one_of(st.sampled_from(INTERESTING), st.integers(0, 255))),
                      min_size=1, max_size=4))
@settings(FUZZ, max_examples=25)
def test_media_byte_flips(media_encoders, kind, flips):
    data = bytearray(MEDIA[kind])
    for where, byte in flips:
        data[int(where * len(data))] = byte
    _media_case(media_encoders, f"media byte flips: {kind}", kind, bytes(data))


@pytest.mark.parametrize("kind", sorted(MEDIA))
@given(cut=st.floats(0, 1, exclude_max=True))
@settings(FUZZ, max_examples=12)
def test_media_truncation(media_encoders, kind, cut):
    data = MEDIA[kind]
    decoded = _media_case(media_encoders, f"media truncation: {kind}", kind, data[: int(cut * len(data))])
    if kind in ("png", "wav") and cut < 0.9:  # a PNG cut in its pixel data, a WAV cut anywhere before the end
        assert not decoded


BAD_FILES = {
    "a text file named .jpg": ("x.jpg", "jpeg", b"this is not an image\n"),
    "an empty .jpg": ("x.jpg", "jpeg", b""),
    "an HTML error page named .png": ("x.png", "png", b"<html><body>404 Not Found</body></html>"),
    "a JPEG cut after its header": ("x.jpg", "jpeg", MEDIA["jpeg"][:200]),
    "a PNG cut mid-data": ("x.png", "png", MEDIA["png"][: len(MEDIA["png"]) // 2]),
    # the IDAT length off by a few bytes: PIL reads a chunk type from pixel data and raises SyntaxError
    "a PNG whose data chunk length is wrong": ("x.png", "png", MEDIA["png"][:36] + b"\x01" + MEDIA["png"][37:]),
    "a zero-length .wav": ("x.wav", "wav", b""),
    "a WAV with a bad RIFF tag": ("x.wav", "wav", b"RIFX" + MEDIA["wav"][4:]),
    "a WAV whose fmt chunk claims 0 channels": ("x.wav", "wav", MEDIA["wav"][:22] + b"\0\0" + MEDIA["wav"][24:]),
    "a WAV header with no data": ("x.wav", "wav", MEDIA["wav"][:44]),
    "a WAV whose data chunk id is damaged": ("x.wav", "wav", MEDIA["wav"][:36] + b"dXta" + MEDIA["wav"][40:]),
    "a WAV whose header claims 2 GiB": ("x.wav", "wav", MEDIA["wav"][:4] + b"\xff\xff\xff\x7f" + MEDIA["wav"][8:40]
                                        + b"\xff\xff\xff\x7f" + MEDIA["wav"][44:]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_media_files(media_encoders, tmp_path, case):
    name, kind, content = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    assert not _media_case(media_encoders, "media files: " + case, kind, path)
    assert not _media_case(media_encoders, "media bytes: " + case, kind, content)


def test_the_good_media_decode(media_encoders, tmp_path):
    """Control: the unbroken files decode and are kept (so a mask above is the fault's doing)."""
    for kind, content in MEDIA.items():
        path = tmp_path / f"ok.{kind}"
        path.write_bytes(content)
        assert _media_case(media_encoders, "media: controls", kind, content)
        assert _media_case(media_encoders, "media: controls", kind, path)
