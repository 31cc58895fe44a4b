"""Fault injection: files from elsewhere must not run code, escape the dataset, or exhaust memory.

Each payload would leave a marker file if it ran; every test asserts the marker is absent
and that the error names the offending file. Fault classes and counts: docs/reliability.md.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tests.faults.fresh_process import load_in_fresh_process
from mmrec.config import apply_overrides, load_yaml
from mmrec.datasets.canonical import read_canonical, read_meta
from mmrec.datasets.loading import load_dataset
from mmrec.datasets.readers.mbgmn import load_pickle
from mmrec.encoders.image import load_image
from mmrec.encoders.robust import BadMedia, preprocess_robust
from mmrec.errors import ConfigError, DataError, MMRecError
from mmrec.train.checkpoint import load_state, safe_torch_load, save_state
from mmrec.train.run import load_run_config

REPO = Path(__file__).resolve().parents[2]


# -- payloads ---------------------------------------------------------------------------------
class _Reduce:
    """An object whose unpickling calls ``fn(*args)``: the classic pickle exploit."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, object]:
    """Pickle exploits, each of which creates ``marker`` when loaded by a plain unpickler."""
    cmd = f"touch {marker}"
    return {
        "os.system": _Reduce(os.system, cmd),
        "subprocess.call": _Reduce(subprocess.call, ["touch", str(marker)]),
        "builtins.eval": _Reduce(builtins.eval, f"__import__('os').system({cmd!r})"),
        "builtins.exec": _Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        # hidden inside an otherwise valid object: a dict holding a real sparse matrix
        "nested in a dict": {"ok": sp.csr_matrix(np.eye(2)), "evil": _Reduce(os.system, cmd)},
    }


PAYLOADS = list(_payloads(Path("unused")))


def _sparse(rows, shape=(3, 4)):
    return sp.csr_matrix((np.ones(len(rows)), tuple(zip(*rows))), shape=shape)


def test_a_plain_unpickler_would_run_the_payload(tmp_path):
    """Control: the payload is live, so its absence below means the loader refused it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_payloads(marker)["os.system"]))
    assert marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_mbgmn_pickle_that_runs_code_is_refused(tmp_path, payload):
    marker = tmp_path / "ran"
    data = tmp_path / "data"
    data.mkdir()
    for name, m in (("trn_pv", _sparse([(0, 1), (1, 2), (2, 3)])), ("trn_buy", _sparse([(0, 1)]))):
        (data / name).write_bytes(pickle.dumps(m))
    (data / "tst_int").write_bytes(pickle.dumps(_payloads(marker)[payload]))
    with pytest.raises(DataError, match=r"tst_int.*refusing to load") as err:
        load_dataset(data, format="mbgmn")
    assert str(data / "tst_int") in str(err.value)
    assert not marker.exists()


def test_mbgmn_safe_unpickler_still_reads_real_data(tmp_path):
    """The refusal is not blanket: numpy arrays, sparse matrices, None and containers load."""
    path = tmp_path / "x.pkl"
    obj = {"m": _sparse([(0, 1), (2, 3)]), "a": np.arange(3), "l": [3, None, np.int64(2)]}
    path.write_bytes(pickle.dumps(obj))
    back = load_pickle(path)
    assert (back["m"] != obj["m"]).nnz == 0 and back["a"].tolist() == [0, 1, 2] and back["l"] == [3, None, 2]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_checkpoint_that_runs_code_is_refused(tmp_path, payload):
    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1, "extra": _payloads(marker)[payload]},
               tmp_path / "checkpoint.pt")
    with pytest.raises(MMRecError, match="refusing to load") as err:
        load_state(tmp_path)  # what `mmrec train --resume` reads
    assert str(tmp_path / "checkpoint.pt") in str(err.value)
    assert re.search(r"\(it would load ([\w]+\.)*(system|call|eval|exec|csr_matrix)\)", str(err.value))  # names it
    with pytest.raises(MMRecError, match="refusing to load"):
        safe_torch_load(tmp_path / "checkpoint.pt")  # what `mmrec pretrain` resume reads
    assert not marker.exists()


def test_training_state_round_trips_under_weights_only(tmp_path):
    """The trainer's own state (EvalResult in selection/history, numpy RNG) loads with weights_only=True."""
    from mmrec.eval.protocols import EvalResult
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    valid = EvalResult({"Recall@20": 0.5}, protocol="full", split="valid", n_users=3, n_pairs=4)
    rng = np.random.default_rng(3)
    save_state(tmp_path, model=model, optimizer=opt, epoch=2, rng=rng,
               selection={"best": 0.5, "best_epoch": 2, "bad_evals": 0, "valid": valid},
               history=[{"epoch": 2, "loss": np.float32(0.25), "valid": valid}])
    state = load_state(tmp_path)
    assert state["selection"]["valid"] == {"Recall@20": 0.5} and state["history"][0]["loss"] == 0.25
    assert state["numpy_rng"] == rng.bit_generator.state and state["epoch"] == 2
    legacy = {"numpy": np.random.RandomState(0).get_state()}  # pre-training's legacy RNG state: an ndarray
    torch.save(legacy, tmp_path / "legacy.pt")
    assert np.array_equal(safe_torch_load(tmp_path / "legacy.pt")["numpy"][1], legacy["numpy"][1])


def test_no_unsafe_loader_in_the_source():
    """grep: YAML only through safe_load, torch.load only with weights_only=True, no bare pickle.load."""
    offenders = []
    for path in sorted((REPO / "mmrec").rglob("*.py")):
        text = path.read_text()
        for pattern in (r"yaml\.load\(", r"yaml\.unsafe_load", r"yaml\.(Full|Unsafe)?Loader\b",
                        r"weights_only\s*=\s*False", r"pickle\.loads?\("):
            offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in re.finditer(pattern, text)]
        for m in re.finditer(r"torch\.load\(", text):  # the call and its continuation line
            call = "".join(text[m.start():].splitlines(keepends=True)[:2])
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.relative_to(REPO)}: {call.strip()}")
    assert offenders == []


# -- YAML -----------------------------------------------------------------------------------------
def _yaml_exploit(marker: Path) -> str:
    return f"model: bprmf\nepochs: !!python/object/apply:os.system ['touch {marker}']\n"


def test_yaml_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "ran"
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(_yaml_exploit(marker))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: invalid YAML.*python/object"):
        load_yaml(cfg)  # --config FILE of every command, pipeline configs
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(_yaml_exploit(marker))
    with pytest.raises(ConfigError, match=r"config\.yaml: invalid YAML"):
        load_run_config(run)  # what evaluate / recommend / export read
    (tmp_path / "dataset.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(DataError, match=r"dataset\.yaml: invalid YAML"):
        read_meta(tmp_path / "dataset.yaml")
    assert not marker.exists()


def test_set_override_with_a_python_tag_stays_a_string(tmp_path):
    marker = tmp_path / "ran"
    raw = f"!!python/object/apply:os.system ['touch {marker}']"
    out = apply_overrides({}, [f"train.epochs={raw}"])
    assert out == {"train": {"epochs": raw}} and not marker.exists()


# -- media paths ------------------------------------------------------------------------------------
def _png(width: int = 2, height: int = 2) -> bytes:
    """A PNG whose header declares ``width x height`` (the data is a few bytes whatever the size)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    n_rows = height if width * height <= 10**6 else 2  # real pixels for small images, a stub for bombs
    rows = zlib.compress(b"".join(b"\x00" + b"\x80" * 3 * width for _ in range(n_rows)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


ESCAPES = ["../secret.png", "/etc/hostname", "a/../../secret.png", "..\\secret.png", "C:/secret.png",
           "./../secret.png"]


def _media_dataset(root: Path, values: list[str], kind: str = "image") -> Path:
    root.mkdir(parents=True)
    (root / "media").mkdir()
    (root / "media" / "ok.png").write_bytes(_png())
    (root.parent / "secret.png").write_bytes(_png())  # exists: refused for where it is, not for being absent
    items = [f"i{j}" for j in range(len(values))]
    (root / "interactions.tsv").write_text("user\titem\n" + "".join(f"u{j % 3}\t{x}\n" for j, x in enumerate(items)))
    (root / "items.tsv").write_text(f"item\t{kind}\n" + "".join(f"{x}\t{v}\n" for x, v in zip(items, values)))
    return root


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_media_paths_cannot_escape_the_dataset(tmp_path, kind):
    values = ["media/ok.png", "media/../media/ok.png", *ESCAPES]
    root = _media_dataset(tmp_path / "data", values, kind)
    with pytest.warns(UserWarning, match=rf"items\.tsv: {len(ESCAPES)} {kind} path\(s\) point outside.*line 4"):
        d = read_canonical(root)
    entries = getattr(d.items, kind)
    assert d.report["unsafe_media"] == {kind: len(ESCAPES)}
    assert entries[2:] == [None] * len(ESCAPES)  # masked: never opened
    inside = [Path(e).resolve() for e in entries[:2]]
    assert inside == [(root / "media" / "ok.png").resolve()] * 2


# -- decompression bombs ------------------------------------------------------------------------
BOMBS = [(10_000, 10_000), (20_000, 20_000), (100_000, 100_000), (65_535, 1)]


@pytest.mark.parametrize("size", BOMBS[:3])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(*size))
    assert path.stat().st_size < 1000  # a tiny file declaring up to 10^10 pixels
    with pytest.raises(DataError, match=r"bomb\.png.*too large to decode safely") as err:
        load_image(path, 7)
    assert err.value.reason == "too_large"
    with pytest.raises(DataError, match="too large"):
        load_image(path.read_bytes(), 7)  # bytes (webdataset shards, in-memory media)


def test_small_and_wide_images_still_load():
    assert load_image(_png(*BOMBS[3])).size == (65_535, 1)
    assert load_image(_png(4, 3)).size == (4, 3)


class _ImageOnly:
    """The preprocessing half of an image encoder (load_image + to-tensor), no weights."""

    modality = "image"

    def preprocess(self, raw):
        return {"pixel_values": torch.stack([torch.from_numpy(np.asarray(load_image(x, i), dtype=np.float32))
                                             .permute(2, 0, 1)[:, :2, :2] for i, x in enumerate(raw)])}


def test_bomb_is_a_counted_bad_media_item():
    """Extraction / pre-training keep going: the bomb is masked and counted as image/too_large."""
    bad = BadMedia()
    batch, ok = preprocess_robust(_ImageOnly(), [_png(), _png(20_000, 20_000), b"\x89PNG broken", None],
                                  "image", bad, ["a", "bomb", "broken", "none"])
    assert ok.tolist() == [True, False, False, False] and batch["pixel_values"].shape[0] == 1
    assert bad.as_dict() == {"image/corrupt": 1, "image/missing": 1, "image/too_large": 1}
    assert bad.examples["image/too_large"].startswith("bomb:")


def test_bomb_in_a_dataset_is_unreadable_media_when_verified(tmp_path):
    root = _media_dataset(tmp_path / "data", ["media/ok.png", "media/bomb.png"])
    (root / "media" / "bomb.png").write_bytes(_png(30_000, 30_000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = read_canonical(root, verify_media=True)
    assert d.report["unreadable_media"] == {"image": 1} and d.items.image[1] is None


def test_bomb_stays_within_a_memory_bound(tmp_path):
    """In a fresh process: loading the bomb raises without the ~1.2 GB its pixels would take."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(20_000, 20_000))
    error, reason, mib = load_in_fresh_process("mmrec.encoders.image", "load_image", path)
    assert (error, reason) == ("DataError", "too_large")
    assert mib < 64  # MiB of peak-RSS growth; decoding would need 20000 * 20000 * 3 bytes
