"""Frozen feature extraction (`mmrec extract`), the multi-table feature file, features on demand."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmrec.datasets.features import (FUSED, feature_file_metadata, load_feature_dir, load_feature_file,
                                     read_feature_tables, read_features, write_feature_tables, write_features)
from mmrec.datasets.schema import Dataset, FeatureTable, Interactions, ItemContent
from mmrec.encoders import create_encoder
from mmrec.errors import DataError
from mmrec.pretrain import extract as ex
from mmrec.pretrain.artifacts import save_encoders
from mmrec.pretrain.extract import extract_features, partial_dir
from mmrec.train import features_on_demand as fod
from tests.conftest import shared_data_dir

TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_encoders(embed_dim: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Small random-init encoders of the three modalities (seeded: same seed, same weights)."""
    torch.manual_seed(seed)
    encs = {"image": create_encoder("image", "test_vit", pretrained=None, embed_dim=embed_dim),
            "text": create_encoder("text", "bert", pretrained=None, embed_dim=embed_dim,
                                   tokenizer="all-MiniLM-L6-v2", config=TINY_TEXT),
            "audio": create_encoder("audio", "logmel-cnn", pretrained=None, embed_dim=embed_dim,
                                    channels=(8, 16), n_mels=32)}
    return {m: e.eval() for m, e in encs.items()}


@pytest.fixture(scope="module")
def world() -> Dataset:
    from mmrec.datasets.synthetic import make_world
    return make_world("tiny")


@pytest.fixture(scope="module")
def encoders() -> dict[str, Any]:
    return tiny_encoders()


def _quiet(*_: Any) -> None:
    pass


def same_file(a: Path, b: Path) -> bool:
    """Same tensors (bit for bit) and metadata; bytes may differ: safetensors writes metadata in hash order."""
    from safetensors import safe_open
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def _crash(chunk: int, n_chunks: int) -> None:
    raise KeyboardInterrupt  # the process dies right after the first chunk is on disk


def subset(data: Dataset, n: int, **content: Any) -> Dataset:
    """The first ``n`` items of ``data`` (content lists cut to n), with content overrides."""
    items = data.items
    new = ItemContent(text={c: list(v[:n]) for c, v in items.text.items()},
                      image=[items.image[i] for i in range(n)], audio=[items.audio[i] for i in range(n)])
    for k, v in content.items():
        setattr(new, k, v)
    return data.replace(item_ids=data.item_ids[:n], items=new)


# -- extraction -----------------------------------------------------------------------
def test_extract_shapes_and_masks_on_tiny(world, encoders, tmp_path):
    out = tmp_path / "tiny.safetensors"
    report = extract_features(world, encoders, out, batch_size=32, chunk_size=64, progress=False, log=_quiet)
    assert report.items_encoded == 200 and report.chunks == 4 and report.bad_media == {}
    tables, ids = read_feature_tables(out)
    assert ids == [f"i{i}" for i in range(200)]
    # backbone features: test_vit 64-d, tiny BERT 32-d, small log-mel CNN 16-d; sizes differ -> no fused table
    assert {m: tuple(t.features.shape) for m, t in tables.items()} == {
        "image": (200, 64), "text": (200, 32), "audio": (200, 16)}
    assert FUSED in report.skipped
    for m, t in tables.items():
        assert t.mask.all() and torch.isfinite(t.features).all()
        assert t.features.std(0).mean() > 0  # distinct items give distinct rows
        assert t.meta["kind"] == "backbone"
    # a row equals the encoder's own backbone features for that item
    img = encoders["image"]
    with torch.no_grad():
        direct = img.encode(img.preprocess([world.items.image[70]]))
    torch.testing.assert_close(tables["image"].features[70:71], direct, rtol=1e-4, atol=1e-5)
    assert not partial_dir(out).exists()
    assert json.loads(feature_file_metadata(out)["bad_media"]) == {}


def test_run_embeddings_are_projected_and_fused(world, tmp_path):
    from mmrec.pretrain.artifacts import load_encoders
    run = tmp_path / "run"
    encs = tiny_encoders(embed_dim=16, seed=1)
    save_encoders(run, encs)
    data = subset(world, 48)
    out = tmp_path / "aligned.safetensors"
    report = extract_features(data, load_encoders(run), out, project=True, batch_size=16, progress=False, log=_quiet)
    assert report.projected and set(report.tables) == {"image", "text", "audio", FUSED}
    tables, _ = read_feature_tables(out)
    assert all(t.features.shape == (48, 16) and t.meta.get("kind", "projected") == "projected"
               for t in tables.values())
    with torch.no_grad():
        direct = encs["text"](encs["text"].preprocess([data.items.item_text(5)]))
    torch.testing.assert_close(tables["text"].features[5:6], direct, rtol=1e-4, atol=1e-5)
    expected = sum(F.normalize(tables[m].features, dim=-1) for m in ("image", "text", "audio")) / 3
    torch.testing.assert_close(tables[FUSED].features, expected)
    # single-table readers get the fused table
    fused, ids = read_features(out)
    assert torch.equal(fused.features, tables[FUSED].features) and len(ids) == 48


def _wav_bytes(seconds: float = 0.2, rate: int = 16000) -> bytes:
    from scipy.io import wavfile
    buf = io.BytesIO()
    wavfile.write(buf, rate, (np.sin(np.arange(int(seconds * rate)) / 5) * 3000).astype(np.int16))
    return buf.getvalue()


def test_bad_media_is_masked_and_counted(world, encoders, tmp_path):
    n = 40
    base = subset(world, n)
    image = list(base.items.image)
    image[3] = b"\x89PNG but not really an image"
    image[5] = None
    text = {c: list(v) for c, v in base.items.text.items()}
    for c in text:
        text[c][7] = ""
    audio = list(base.items.audio)
    audio[9] = _wav_bytes()[:900]           # header says more samples than there are: truncated
    audio[11] = b"RIFF garbage"
    audio[13] = _wav_bytes()                # an ordinary good clip
    data = subset(world, n, image=image, text=text, audio=audio)
    out = tmp_path / "bad.safetensors"
    report = extract_features(data, encoders, out, batch_size=16, progress=False, log=_quiet)
    expected = {"audio/corrupt": 2, "image/corrupt": 1, "image/missing": 1, "text/missing": 1}
    assert report.bad_media == expected
    assert json.loads(feature_file_metadata(out)["bad_media"]) == expected
    tables, _ = read_feature_tables(out)
    masked = {m: sorted(torch.nonzero(~t.mask).flatten().tolist()) for m, t in tables.items()}
    assert masked == {"image": [3, 5], "text": [7], "audio": [9, 11]}
    for m, t in tables.items():
        assert (t.features[~t.mask] == 0).all()
        assert torch.isfinite(t.features).all()
    assert "i3" in report.bad_examples["image/corrupt"]


def test_one_wav_reader_strict_about_truncation_only():
    """Extraction and the encoders share ``load_waveform``: a cut file is an error, an unknown chunk is not."""
    import struct

    from mmrec.encoders.audio import load_waveform
    good = _wav_bytes()
    assert load_waveform(good, 16000).shape == (3200,)
    with pytest.raises(DataError, match="truncated WAV"):
        load_waveform(good[:900], 16000, index=9)
    extra = good + b"abcd" + struct.pack("<I", 4) + b"\0\0\0\0"   # an unknown chunk after the data
    extra = extra[:4] + struct.pack("<I", len(extra) - 8) + extra[8:]
    with pytest.warns(UserWarning, match="not understood"):
        assert np.array_equal(load_waveform(extra, 16000), load_waveform(good, 16000))
    assert not hasattr(ex, "_decode_wav")  # no second decoder to drift from the first


def test_one_chunk_is_assembled_in_memory(world, encoders, tmp_path, monkeypatch):
    """Nothing to resume in a one-chunk job: no partial directory, no weight hashing; same file."""
    data = subset(world, 40)
    staged = tmp_path / "staged.safetensors"
    extract_features(data, encoders, staged, batch_size=16, chunk_size=16, progress=False, log=_quiet)

    def no_hash(*a: Any, **k: Any) -> None:
        raise AssertionError("a one-chunk extraction hashed the weights")

    monkeypatch.setattr(ex, "extraction_fingerprint", no_hash)
    out = tmp_path / "one.safetensors"
    seen = []
    report = extract_features(data, encoders, out, batch_size=16, chunk_size=64, progress=False, log=_quiet,
                              on_chunk=lambda c, n: seen.append((c, n, partial_dir(out).exists())))
    assert seen == [(0, 1, False)] and report.chunks == 1
    assert same_file(out, staged)


def test_resume_after_interruption_gives_the_same_file(world, encoders, tmp_path):
    data = subset(world, 96)
    whole = tmp_path / "whole.safetensors"
    extract_features(data, encoders, whole, batch_size=16, chunk_size=32, progress=False, log=_quiet)

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        extract_features(data, encoders, out, batch_size=16, chunk_size=32, progress=False, log=_quiet,
                         on_chunk=_crash)
    partial = partial_dir(out)
    assert not out.exists()  # nothing partial looks complete
    assert sorted(p.name for p in partial.iterdir()) == ["chunk-00000.safetensors", "manifest.json"]

    seen: list[int] = []
    report = extract_features(data, encoders, out, batch_size=16, chunk_size=32, progress=False, log=_quiet,
                              on_chunk=lambda c, n: seen.append(c))
    assert seen == [1, 2] and report.chunks_reused == 1 and report.items_encoded == 96 - 32
    assert same_file(out, whole)
    assert not partial.exists()


def test_partial_results_of_another_extraction_are_discarded(world, tmp_path):
    data = subset(world, 40)
    encs = {"text": tiny_encoders()["text"]}
    out = tmp_path / "t.safetensors"
    with pytest.raises(KeyboardInterrupt):
        extract_features(data, encs, out, batch_size=8, chunk_size=16, progress=False, log=_quiet, on_chunk=_crash)
    logs: list[str] = []
    other = {"text": tiny_encoders(seed=5)["text"]}  # other weights: chunk 0 must not be reused
    report = extract_features(data, other, out, batch_size=8, chunk_size=16, progress=False, log=logs.append)
    assert report.chunks_reused == 0 and any("discarding" in line for line in logs)
    ref = tmp_path / "ref.safetensors"
    extract_features(data, other, ref, batch_size=8, chunk_size=16, progress=False, log=_quiet)
    assert same_file(out, ref)


def test_random_init_backbones_are_deterministic(world, tmp_path):
    data = subset(world, 24)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path in (a, b):
        encs = ex.frozen_encoders(["audio"], seed=3)  # logmel-cnn: no shipped weights, built from the seed
        extract_features(data, encs, path, batch_size=8, progress=False, log=_quiet)
    assert same_file(a, b)
    c = tmp_path / "c.safetensors"
    extract_features(data, ex.frozen_encoders(["audio"], seed=4), c, batch_size=8, progress=False, log=_quiet)
    assert not torch.equal(read_feature_tables(a)[0]["audio"].features, read_feature_tables(c)[0]["audio"].features)


def test_worker_processes_give_the_same_features(world, encoders, tmp_path):
    """Media decoding in DataLoader workers changes where preprocessing runs, not the numbers."""
    data = subset(world, 24)
    encs = {m: encoders[m] for m in ("text", "audio")}
    a, b = tmp_path / "w0.safetensors", tmp_path / "w1.safetensors"
    extract_features(data, encs, a, batch_size=8, progress=False, log=_quiet)
    extract_features(data, encs, b, batch_size=8, workers=1, progress=False, log=_quiet)
    assert same_file(a, b)


# -- the file format ------------------------------------------------------------------------
@pytest.mark.parametrize("ids", [["3", "1", "2", "10"], ["a", "007", "c d", "x"]])
def test_multi_table_round_trip(tmp_path, ids):
    g = torch.Generator().manual_seed(0)
    tables = {"image": FeatureTable(torch.randn(4, 5, generator=g), torch.tensor([True, False, True, True]),
                                    {"encoder": "vit"}),
              "text": FeatureTable(torch.randn(4, 3, generator=g), torch.ones(4, dtype=torch.bool)),
              FUSED: FeatureTable(torch.randn(4, 2, generator=g), torch.tensor([True, True, False, True]))}
    path = tmp_path / "multi.safetensors"
    write_feature_tables(path, tables, ids, {"created_by": "test"})
    back, back_ids = read_feature_tables(path)
    assert back_ids == ids and set(back) == set(tables)
    for name, t in tables.items():
        assert torch.equal(back[name].features, t.features) and torch.equal(back[name].mask, t.mask)
    assert back["image"].meta["encoder"] == "vit" and back["image"].meta["path"] == str(path)
    assert feature_file_metadata(path)["created_by"] == "test"
    fused, _ = read_features(path)  # old single-table readers: the fused table
    assert torch.equal(fused.features, tables[FUSED].features)
    # aligned to a dataset whose items come in another order, one of them unknown to the file
    order = [ids[2], "missing", ids[0]]
    aligned = load_feature_file(path, order)
    assert aligned["image"].mask.tolist() == [True, False, True]
    assert torch.equal(aligned["text"].features[2], tables["text"].features[0])
    assert set(load_feature_dir(tmp_path, order)) == {"image", "text", FUSED}


def test_single_table_files_still_read_as_before(tmp_path):
    t = FeatureTable(torch.randn(3, 4), torch.tensor([True, True, False]), {"model": "m"})
    write_features(tmp_path / "image.safetensors", t, ["1", "2", "3"])
    tables, ids = read_feature_tables(tmp_path / "image.safetensors")
    assert list(tables) == ["image"] and ids == ["1", "2", "3"] and tables["image"].meta["model"] == "m"
    two = {"image": t, "text": FeatureTable(torch.randn(3, 2), torch.ones(3, dtype=torch.bool))}
    write_feature_tables(tmp_path / "nofused.safetensors", two, ["1", "2", "3"])
    with pytest.raises(DataError, match="read_feature_tables"):
        read_features(tmp_path / "nofused.safetensors")
    write_feature_tables(tmp_path / "one.safetensors", {"text": two["text"]}, ["1", "2", "3"])
    assert torch.equal(read_features(tmp_path / "one.safetensors")[0].features, two["text"].features)


def test_extracted_file_feeds_a_content_model(world, encoders, tmp_path):
    """What ``--features FILE`` does: the tables land in data.items.features, models use the modalities."""
    from mmrec.fusion.content import build_item_content, feature_tables
    out = tmp_path / "f.safetensors"
    data = subset(world, 40)
    extract_features(data, encoders, out, fuse="none", progress=False, log=_quiet)
    data.items.features = load_feature_file(out, list(data.item_ids))
    assert sorted(feature_tables(data)) == ["audio", "image", "text"]
    content = build_item_content(data, 8, type("C", (), {"fusion": "sum"})())
    assert content().shape == (40, 8)


# -- features on demand ------------------------------------------------------------------------
def test_features_on_demand_extract_once_then_cache(world, tmp_path, monkeypatch):
    calls: list[str] = []
    real = fod.extract_features

    def counting(data, encs, out, **kw):
        calls.append(str(out))
        return real(data, encs, out, **kw)

    monkeypatch.setattr(fod, "extract_features", counting)
    monkeypatch.setenv(fod.CACHE_ENV, str(tmp_path / "cache"))
    cfg = {"model_args": {"use_features": True, "features": ["audio"]}, "device": "cpu"}
    logs: list[str] = []
    data = subset(world, 30)
    first = fod.ensure_features(data, cfg, progress=False, log=logs.append)
    assert list(first["extracted"]) == ["audio"] and first["cached"] == {}
    path = Path(first["extracted"]["audio"]["path"])
    assert path.is_file() and str(path).startswith(str(tmp_path / "cache"))
    assert any(line.startswith("extracting audio features with logmel-cnn into") and line.endswith("(once)")
               for line in logs)
    table = data.items.features["audio"]
    assert table.features.shape[0] == 30 and table.mask.all()
    mtime = path.stat().st_mtime_ns

    again = subset(world, 30)  # a fresh load of the same dataset: no features attached yet
    second = fod.ensure_features(again, cfg, progress=False, log=logs.append)
    assert second["extracted"] == {} and second["cached"] == {"audio": str(path)}
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    assert torch.equal(again.items.features["audio"].features, table.features)

    # user --features files override; a model that reads no content triggers nothing
    assert fod.ensure_features(subset(world, 30), {"features": ["x.safetensors"]}, log=_quiet)["skipped"]
    assert fod.ensure_features(subset(world, 30), {"model_args": {}}, log=_quiet)["needed"] == []
    # stored features are used as they are
    assert fod.ensure_features(world, cfg, log=_quiet)["present"] == ["audio"]
    assert len(calls) == 1


def test_on_demand_cache_key_depends_on_data_and_encoder(world, tmp_path):
    a = fod.cache_file(subset(world, 30), "text", "all-MiniLM-L6-v2", tmp_path)
    assert a == fod.cache_file(subset(world, 30), "text", "all-MiniLM-L6-v2", tmp_path)
    assert a != fod.cache_file(subset(world, 31), "text", "all-MiniLM-L6-v2", tmp_path)
    assert a != fod.cache_file(subset(world, 30), "text", "bert", tmp_path)
    # a writable dataset directory keeps its cache beside the data; synthetic data goes to the user cache
    assert fod.default_cache_dir(world.replace(root=str(tmp_path))) == tmp_path / ".mmrec-cache" / "features"


# -- the command ---------------------------------------------------------------------------------
def test_cli_extract(tmp_path, capsys, monkeypatch):
    from mmrec.cli import main
    run = tmp_path / "run"
    save_encoders(run, {m: e for m, e in tiny_encoders(embed_dim=8).items() if m != "image"})
    out = tmp_path / "cli.safetensors"
    rc = main(["extract", "--run", str(run), "--data", "synthetic:tiny", "--out", str(out), "--device", "cpu",
               "--modalities", "text,audio", "--no-progress", "--set", "batch_size=50"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fused  dim     8  present 200 of 200" in text and f"wrote {out}" in text
    assert set(read_feature_tables(out)[0]) == {"text", "audio", FUSED}
    rc = main(["extract", "--run", str(run), "--data", "synthetic:tiny", "--out", str(out), "--modalities", "image"])
    assert rc == 2 and "no encoder for ['image']" in capsys.readouterr().err


# -- real data -----------------------------------------------------------------------------------
def test_minilm_reproduces_ml100k_text_features(tmp_path):
    import pandas as pd
    root = shared_data_dir("ml100k-mm")
    df = pd.read_csv(root / "items.tsv", sep="\t", keep_default_na=False, dtype=str).head(20)
    # the recipe of ml100k-mm's README: "<title> (<year>). Genres: <g1>, <g2>. <plot>"
    texts = [f"{r.title} ({r.year}). Genres: {', '.join(r.genres.split('|'))}. {r['plot']}" for _, r in df.iterrows()]
    ids = list(df["item"])
    data = Dataset(name="ml100k-20", behaviors=["interact"], target="interact", user_ids=np.array(["u"]),
                   item_ids=np.array(ids, dtype=object), train=Interactions.empty(),
                   items=ItemContent(text={"text": texts}))
    out = tmp_path / "text.safetensors"
    extract_features(data, ex.frozen_encoders(["text"]), out, batch_size=8, progress=False, log=_quiet)
    mine = load_feature_file(out, ids)["text"]
    stored = load_feature_file(root / "features" / "text.safetensors", ids)["text"]
    assert mine.mask.all() and stored.mask.all()
    assert (mine.features - stored.features).abs().max() < 1e-5
