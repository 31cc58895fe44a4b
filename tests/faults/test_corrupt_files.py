"""Damaged (not malicious) files: a cut-short or overwritten checkpoint / weights file, and a WAV
whose header declares more audio than mmrec will read (docs/reliability.md, section 12).

A damaged ``checkpoint.pt`` / ``best.safetensors`` must be one ``MMRecError`` naming the file and
saying what to do, never torch's zip-reader message; a payload keeps its own refusal
(tests/faults/test_untrusted_files.py). A WAV over the bound is refused from its header, before
its samples are read, as ``too_large`` (the image decompression-bomb design).
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrec.cli import main
from tests.faults.fresh_process import load_in_fresh_process
from mmrec.encoders.audio import MAX_WAV_BYTES, MAX_WAV_SECONDS, LogMelCNNEncoder, load_waveform
from mmrec.encoders.robust import BadMedia, preprocess_robust
from mmrec.errors import DataError, MMRecError
from mmrec.train.checkpoint import load_state, load_weights, safe_torch_load, save_state, save_weights

DAMAGE_RE = r"checkpoint\.pt is damaged or incomplete and cannot be loaded \(.+\); .*delete it to start the run fresh"


def _state_bytes(tmp: Path) -> bytes:
    """A real trainer state (model, Adam, RNGs, selection), as `mmrec train` writes it."""
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 16)).sum().backward()
    opt.step()
    save_state(tmp, model=model, optimizer=opt, epoch=2, rng=np.random.default_rng(0),
               selection={"best": 0.5, "best_epoch": 2, "bad_evals": 0, "valid": {}}, history=[])
    return (tmp / "checkpoint.pt").read_bytes()


def _rezip(data: bytes, drop) -> bytes:
    """The same zip archive without the members ``drop`` picks (a well-formed zip, a record gone)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if not drop(name):
                dst.writestr(name, src.read(name))
    return out.getvalue()


CUTS = (1, 4, 100, 1000, "half", -22, -1)  # -22: inside the zip's end-of-central-directory record


def _damage(data: bytes, case: str) -> bytes:
    if case.startswith("cut at byte "):
        n = case[len("cut at byte "):]
        return data[: len(data) // 2 if n == "half" else int(n)]
    return {
        "zero-length": lambda: b"",
        "random bytes": lambda: np.random.default_rng(0).bytes(4096),  # its first byte is no pickle GLOBAL
        "a text file": lambda: b"not a checkpoint\n",
        "a zip missing a tensor's data record": lambda: _rezip(data, lambda n: n.endswith("/data/0")),
        "a zip missing its data.pkl record": lambda: _rezip(data, lambda n: n.endswith("/data.pkl")),
        "a zip missing its end-of-central-directory record": lambda: data[: data.rfind(b"PK\x05\x06")],
    }[case]()


DAMAGE = ["zero-length", *(f"cut at byte {n}" for n in CUTS), "random bytes", "a text file",
          "a zip missing a tensor's data record", "a zip missing its data.pkl record",
          "a zip missing its end-of-central-directory record"]


@pytest.fixture(scope="module")
def state_bytes(tmp_path_factory) -> bytes:
    return _state_bytes(tmp_path_factory.mktemp("state"))


def test_the_intact_state_loads(tmp_path, state_bytes):
    """Control: the bytes the cases below damage load as the trainer's state."""
    (tmp_path / "checkpoint.pt").write_bytes(state_bytes)
    assert load_state(tmp_path)["epoch"] == 2


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_checkpoint_is_one_clear_error(tmp_path, state_bytes, case):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_damage(state_bytes, case))
    with pytest.raises(MMRecError, match=DAMAGE_RE) as err:
        load_state(tmp_path)  # what `mmrec train --resume` reads
    assert str(path) in str(err.value) and "refusing" not in str(err.value)
    assert "internal miniz error" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MMRecError, match=DAMAGE_RE):
        safe_torch_load(path)  # what `mmrec pretrain --resume` reads


def test_a_checkpoint_without_the_trainer_state_is_damaged(tmp_path):
    """A file torch loads that is not a trainer state (a list, a dict missing keys)."""
    path = tmp_path / "checkpoint.pt"
    for obj, lacking in (([1, 2], "model, optimizer, epoch, numpy_rng, torch_rng, selection"),
                         ({"model": {}, "epoch": 1}, "optimizer, numpy_rng, torch_rng, selection")):
        torch.save(obj, path)
        with pytest.raises(MMRecError, match=DAMAGE_RE) as err:
            load_state(tmp_path)
        assert f"(ValueError: it holds no {lacking})" in str(err.value)


def test_damaged_best_weights_are_one_clear_error(tmp_path):
    model = torch.nn.Linear(4, 2)
    path = save_weights(model, tmp_path)
    data = path.read_bytes()
    for bad in (b"", data[:6], data[:40], data[: len(data) // 2], data[:-1], np.random.default_rng(1).bytes(512)):
        path.write_bytes(bad)
        with pytest.raises(MMRecError, match=r"best\.safetensors is damaged or incomplete .*retrain the run") as err:
            load_weights(model, tmp_path)
        assert str(path) in str(err.value)
    path.write_bytes(data)
    load_weights(model, tmp_path)  # control


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("mmrec: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_train_resume_from_a_damaged_checkpoint(tmp_path, capsys, state_bytes):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(state_bytes[: len(state_bytes) // 2])
    train = ["train", "--data", "synthetic:tiny", "--model", "bprmf", "--out", str(run), "--epochs", "1",
             "--set", "model.dim=8"]
    assert main([*train, "--resume"]) == 2
    line = _one_line_error(capsys)
    assert f"{run / 'checkpoint.pt'} is damaged or incomplete" in line and "delete it" in line
    # the advice works: without the file, --resume starts fresh
    (run / "checkpoint.pt").unlink()
    assert main([*train, "--resume"]) == 0
    capsys.readouterr()
    # and a damaged best.safetensors stops `mmrec evaluate` the same way
    best = run / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    assert main(["evaluate", "--run", str(run)]) == 2
    line = _one_line_error(capsys)
    assert f"{best} is damaged or incomplete" in line and "retrain the run" in line


def test_cli_pretrain_resume_from_a_damaged_checkpoint(tmp_path, capsys):
    from tests.faults.test_nan_policy import PRETRAIN_SETS
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    argv = ["pretrain", "--data", "synthetic:tiny", "--out", str(run), "--resume", "--no-progress"]
    for s in PRETRAIN_SETS:
        argv += ["--set", s]
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert f"{run / 'checkpoint.pt'} is damaged or incomplete" in line and "delete it" in line


# -- audio: a size bound from the WAV header ---------------------------------------------------
def _wav(seconds: float = 0.1, rate: int = 16000) -> bytes:
    from scipy.io import wavfile
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    wavfile.write(buf, rate, (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16))
    return buf.getvalue()


def _forged(data_bytes: int, rate: int = 16000, channels: int = 1, bits: int = 16, rf64: bool = False) -> bytes:
    """A WAV header (PCM) declaring ``data_bytes`` of samples, followed by only 200 real bytes."""
    align = channels * bits // 8
    fmt = b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * align) & 0xFFFFFFFF, align, bits)
    if not rf64:
        return b"RIFF" + struct.pack("<I", min(data_bytes + 36, 0xFFFFFFFF)) + b"WAVE" + fmt + \
            b"data" + struct.pack("<I", data_bytes) + bytes(200)
    ds64 = b"ds64" + struct.pack("<IQQQI", 28, data_bytes + 72, data_bytes, data_bytes // align, 0)
    return b"RF64" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + ds64 + fmt + \
        b"data" + struct.pack("<I", 0xFFFFFFFF) + bytes(200)


FORGED = {  # what the header declares -> which bound it breaks
    "2 GiB of 16 kHz mono (bytes and minutes)": _forged(0x7FFFFFFF),
    "11 minutes of 16 kHz mono, 21 MB (minutes)": _forged(11 * 60 * 16000 * 2),
    "300 MiB at a forged 4 GHz rate, 0.04 s (bytes)": _forged(300 * 2**20, rate=4_000_000_000),
    "1 TiB in an RF64 ds64 chunk": _forged(2**40, rf64=True),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_wav_declaring_too_much_audio_is_refused(tmp_path, case):
    data = FORGED[case]
    path = tmp_path / "huge.wav"
    path.write_bytes(data)
    assert len(data) < 400
    for raw in (path, str(path), data):
        with pytest.raises(DataError, match=r"audio of item 7 is too large to read safely: its header declares") as err:
            load_waveform(raw, 16000, 7)
        assert err.value.reason == "too_large" and err.value.field == "audio"
        assert err.value.file == (str(path) if not isinstance(raw, bytes) else None)


def test_wav_at_the_bounds_is_not_too_large():
    """Exactly MAX_WAV_SECONDS declared is within the bound: the tiny file is then only truncated."""
    assert MAX_WAV_SECONDS * 16000 * 2 <= MAX_WAV_BYTES
    with pytest.raises(DataError) as err:
        load_waveform(_forged(int(MAX_WAV_SECONDS * 16000) * 2), 16000)
    assert getattr(err.value, "reason", "corrupt") == "corrupt" and "truncated WAV" in str(err.value)
    with pytest.raises(DataError) as err:
        load_waveform(_forged(int(MAX_WAV_SECONDS * 16000) * 2 + 2), 16000)
    assert err.value.reason == "too_large"


def test_streamed_wav_of_unknown_length_is_bounded_by_its_real_size(tmp_path):
    """``data`` size 0xFFFFFFFF (written before the length was known): scipy reads to the end of the
    file, so the bound applies to the bytes there, not to the 4 GiB marker."""
    good = _wav(0.5)
    stream = good[:40] + struct.pack("<I", 0xFFFFFFFF) + good[44:]
    assert np.array_equal(load_waveform(stream, 16000), load_waveform(good, 16000))
    path = tmp_path / "stream.wav"
    with open(path, "wb") as f:
        f.write(stream)
        f.truncate(len(stream) + 300 * 2**20)  # sparse: 300 MiB of zero samples really there
    with pytest.raises(DataError, match="too large to read safely") as err:
        load_waveform(path, 16000)
    assert err.value.reason == "too_large"


@pytest.mark.parametrize("rate", [16000, 44100])
def test_normal_wavs_still_load(tmp_path, rate):
    data = _wav(0.5, rate)
    path = tmp_path / "ok.wav"
    path.write_bytes(data)
    for raw in (path, data):
        wav = load_waveform(raw, 16000)
        assert wav.shape == (8000,) and np.abs(wav).max() > 0.2


def test_too_large_wav_is_a_counted_bad_media_item():
    """Extraction / pre-training keep going: the item is masked and counted as audio/too_large."""
    enc = LogMelCNNEncoder(embed_dim=8, channels=(4,), n_mels=16)
    bad = BadMedia()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch, ok = preprocess_robust(enc, [_wav(), FORGED["2 GiB of 16 kHz mono (bytes and minutes)"],
                                            _wav()[:30], None], "audio", bad, ["a", "huge", "cut", "none"])
    assert ok.tolist() == [True, False, False, False] and batch["input_features"].shape[0] == 1
    assert bad.as_dict() == {"audio/corrupt": 1, "audio/missing": 1, "audio/too_large": 1}
    assert bad.examples["audio/too_large"].startswith("huge: DataError")


def test_huge_wav_is_refused_without_reading_it(tmp_path):
    """In a fresh process: a real (sparse) 1 GiB WAV is refused without the memory reading it takes."""
    path = tmp_path / "big.wav"
    size = 2**30
    with open(path, "wb") as f:
        f.write(_forged(size)[:44])
        f.truncate(44 + size)  # sparse: no disk blocks, but scipy would read every byte
    error, reason, mib = load_in_fresh_process("mmrec.encoders.audio", "load_waveform", path, 16000)
    assert (error, reason) == ("DataError", "too_large")
    assert mib < 64  # MiB of peak-RSS growth; reading it would take 1 GiB (and 2 GiB as float32)
