"""Encoders: every registered one builds and runs; shipped weights load offline and
give the features and classes they should; bad weights are clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmrec.encoders import WeightsError, WeightsNotFoundError, create_encoder, list_encoders
from mmrec.encoders.weights import LOCAL_WEIGHTS, map_by_order, read_state_dict
from mmrec.errors import ConfigError, DataError
from tests.conftest import shared_data_dir

# transformers' own AST extractor defaults (128 mel filters over 257 FFT bins) warn about one empty filter
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")

TINY_CLIP = dict(clip_embed_dim=16,
                 vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_AST = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_length=128)
TINY_W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
TINY_WHISPER = dict(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_source_positions=100, num_mel_bins=80)


def _images() -> list:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(40, 30, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return [Image.fromarray(arr), buf.getvalue(), arr[:20]]


def _texts() -> list[str]:
    return ["a red dress with flowers", "wireless headphones, noise cancelling", ""]


def _waves() -> list:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(16000).astype(np.float32), (rng.standard_normal(4000).astype(np.float32), 8000)]


# (registry key, name, kwargs, raw inputs); every registered key needs at least one case
CASES = [
    ("image/timm", "test_vit", {}, _images),
    ("image/timm", "test_efficientnet", {"head": "mlp"}, _images),
    ("image/open_clip", "open_clip:ViT-B-32", TINY_CLIP, _images),
    ("text/hf", "bert", {"config": TINY_BERT, "tokenizer": "all-MiniLM-L6-v2", "max_length": 32}, _texts),
    ("text/open_clip", "open_clip:ViT-B-32", TINY_CLIP, _texts),
    ("audio/hf", "ast", {"config": TINY_AST, "feature_extractor": {"max_length": 128}}, _waves),
    ("audio/hf", "wav2vec2", {"config": TINY_W2V}, _waves),
    ("audio/hf", "whisper", {"config": TINY_WHISPER, "feature_extractor": {"chunk_length": 2}}, _waves),
    ("audio/logmel-cnn", "logmel-cnn", {"channels": (8, 16)}, _waves),
    ("behavior/id", "id", {"num_items": 7, "dim": 8}, lambda: [0, 3, 6]),
    ("behavior/run", "run", {}, lambda: [0, 2]),
]


def test_cases_cover_every_registered_encoder():
    assert {c[0] for c in CASES} == set(list_encoders())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("run")
    emb = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    save_file({"embeddings": emb, "item_ids": torch.tensor([10, 11, 12, 13])}, str(d / "item_embeddings.safetensors"))
    return d


@pytest.mark.parametrize("key,name,kw,raw", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_encoder_builds_and_runs(key, name, kw, raw, run_dir):
    modality = key.split("/")[0]
    if key == "behavior/run":
        kw = {"run": run_dir}
    torch.manual_seed(0)
    enc = create_encoder(modality, name, pretrained=None, embed_dim=12, **kw)
    assert isinstance(enc, torch.nn.Module) and enc.modality == modality
    batch = enc.preprocess(raw())
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    n = len(raw())
    with torch.no_grad():
        z_eval = enc.eval()(batch)
        h = enc.encode(batch)
    assert z_eval.shape == (n, 12) and torch.isfinite(z_eval).all()
    assert h.shape == (n, enc.backbone_dim) and torch.isfinite(h).all()
    # deterministic: the same seed builds the same weights and gives the same numbers
    torch.manual_seed(0)
    again = create_encoder(**enc.spec).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch), z_eval)
    # usable for end-to-end training: gradients reach the head and the backbone
    z = enc.train()(batch)
    assert z.shape == (n, 12) and torch.isfinite(z).all()
    z.square().sum().backward()
    assert all(p.grad is not None for p in enc.head.parameters())
    trainable = [p for p in enc.backbone_parameters() if p.requires_grad]
    assert key == "behavior/run" or any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


# -- shipped weights: EfficientNet-Lite0 ------------------------------------------------

@pytest.fixture(scope="module")
def effnet():
    return create_encoder("image", "efficientnet_lite0", pretrained=True, embed_dim=None, keep_classifier=True).eval()


def test_efficientnet_mapping_loads_every_key():
    import timm
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    path = LOCAL_WEIGHTS.get("image/efficientnet_lite0").path()
    mapped = map_by_order(read_state_dict(path), model.state_dict(), path)
    result = model.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(mapped) == list(model.state_dict())


def _top5(effnet, img) -> list[str]:
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    with torch.no_grad():
        logits = effnet.backbone(effnet.preprocess([img])["pixel_values"])
    return [info.index_to_description(int(i)) for i in logits[0].topk(5).indices]


def test_efficientnet_classifies_sample_photos(effnet):
    from sklearn.datasets import load_sample_image
    china = _top5(effnet, load_sample_image("china.jpg"))  # a Chinese temple / palace
    buildings = ("palace", "monastery", "pagoda", "church", "bell cote", "stupa", "boathouse")
    assert any(china[0].startswith(b) for b in buildings), china
    flower = _top5(effnet, load_sample_image("flower.jpg"))  # a close-up of a flower
    assert any(c.startswith("daisy") for c in flower), flower


def test_efficientnet_matches_shared_poster_features(effnet):
    from safetensors.torch import load_file
    root = shared_data_dir("ml100k-mm")
    ref = load_file(str(root / "features" / "image.safetensors"))
    ids = ref["item_ids"].tolist()
    items = [1, 50, 181, 1000]
    with torch.no_grad():
        got = effnet.encode(effnet.preprocess([root / "images" / f"{i}.jpg" for i in items]))
    want = ref["features"][[ids.index(i) for i in items]]
    assert got.shape == want.shape == (4, 1280)
    assert (got - want).abs().max().item() < 1e-4
    assert torch.nn.functional.cosine_similarity(got, want).min().item() > 0.9999


# -- shipped weights: all-MiniLM-L6-v2 --------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        yield create_encoder("text", embed_dim=None).eval()  # the default text encoder
    finally:
        mp.undo()


def test_minilm_loads_offline_and_ranks_paraphrases(minilm):
    assert minilm.backbone_dim == 384
    with torch.no_grad():
        h = minilm.encode(minilm.preprocess(["A cat sits on the mat.", "A kitten is lying on a rug.",
                                             "Stock markets fell sharply on Monday."]))
    assert torch.allclose(h.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert h[0] @ h[1] > h[0] @ h[2] + 0.3


def test_minilm_matches_shared_text_features(minilm):
    import pandas as pd
    from safetensors.torch import load_file
    root = shared_data_dir("ml100k-mm")
    items = pd.read_csv(root / "items.tsv", sep="\t", keep_default_na=False)
    ref = load_file(str(root / "features" / "text.safetensors"))
    ids = ref["item_ids"].tolist()
    rows = items[items["item"].isin([1, 2, 267, 563, 1001])]
    texts = [f"{r['title']} ({r['year']}). Genres: {', '.join(r['genres'].split('|'))}. {r['plot']}"
             for _, r in rows.iterrows()]
    with torch.no_grad():
        got = minilm.encode(minilm.preprocess(texts))
    want = ref["features"][[ids.index(int(i)) for i in rows["item"]]]
    assert (got - want).abs().max().item() < 1e-4
    assert torch.nn.functional.cosine_similarity(got, want).min().item() > 0.9999


# -- weights errors ---------------------------------------------------------------------

def test_missing_weights_are_clear_errors(tmp_path):
    missing = tmp_path / "nope.safetensors"
    for modality, name, kw in [("image", "test_vit", {}), ("image", "open_clip:ViT-B-32", TINY_CLIP),
                               ("text", "bert", {"config": TINY_BERT, "tokenizer": "minilm"}),
                               ("audio", "logmel-cnn", {})]:
        with pytest.raises(FileNotFoundError, match="nope.safetensors"):
            create_encoder(modality, name, pretrained=missing, **kw)
    with pytest.raises(WeightsNotFoundError, match="no local weights are known.*resnet18"):
        create_encoder("image", "resnet18", pretrained=True)
    with pytest.raises(WeightsNotFoundError, match="model type 'bert' has no local weights"):
        create_encoder("text", "bert", pretrained=True, config=TINY_BERT, tokenizer="minilm")
    with pytest.raises(ConfigError, match="never downloads"):
        create_encoder("text", "sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_encoder("image", "resnet18x")


def test_mismatched_weights_are_clear_errors(tmp_path):
    import timm
    from safetensors.torch import save_file
    # another timm architecture's state dict
    resnet = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(resnet))
    with pytest.raises(WeightsError, match="resnet18.safetensors.*do not fit"):
        create_encoder("image", "test_vit", pretrained=resnet)
    # same names, another shape
    sd = timm.create_model("test_vit").state_dict()
    sd["head.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(WeightsError, match=r"bad.pt.*another shape.*head.weight"):
        create_encoder("image", "test_vit", pretrained=bad)
    # a headless checkpoint is fine (the classifier is dropped anyway) and really loads
    del sd["head.weight"], sd["head.bias"]
    ok = tmp_path / "headless.pth"
    torch.save({"state_dict": sd}, ok)
    enc = create_encoder("image", "test_vit", pretrained=ok)
    torch.testing.assert_close(enc.backbone.state_dict()["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    # by-order mapping checks every shape
    with pytest.raises(WeightsError, match="tensor #0"):
        map_by_order({"a": torch.zeros(2)}, {"b": torch.zeros(3)}, "file.pth")
    with pytest.raises(WeightsError, match="2 tensors in the file, the model has 1"):
        map_by_order({"a": torch.zeros(2), "c": torch.zeros(1)}, {"b": torch.zeros(2)}, "file.pth")
    # a transformers state dict for a model of another size
    bert = create_encoder("text", "bert", pretrained=None, config=TINY_BERT, tokenizer="minilm")
    f = tmp_path / "bert.safetensors"
    save_file({k: v.contiguous() for k, v in bert.backbone.state_dict().items()}, str(f))
    with pytest.raises(WeightsError, match="bert.safetensors"):
        create_encoder("text", "bert", pretrained=f, config={**TINY_BERT, "hidden_size": 16}, tokenizer="minilm")
    again = create_encoder("text", "bert", pretrained=f, config=TINY_BERT, tokenizer="minilm")
    torch.testing.assert_close(again.backbone.state_dict(), bert.backbone.state_dict())
    # not a state dict at all
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        create_encoder("image", "test_vit", pretrained=junk)


def test_open_clip_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    enc = create_encoder("image", "open_clip:ViT-B-32", pretrained=None, **TINY_CLIP).eval()
    import open_clip
    full = open_clip.create_model("ViT-B-32", pretrained=None, pretrained_text=False,
                                  **{k: v for k, v in TINY_CLIP.items() if k != "clip_embed_dim"}, embed_dim=16)
    full.visual.load_state_dict(enc.backbone.state_dict())
    ckpt = tmp_path / "clip.pt"
    torch.save({"state_dict": full.state_dict()}, ckpt)
    loaded = create_encoder("image", "open_clip:ViT-B-32", pretrained=ckpt, **TINY_CLIP).eval()
    batch = loaded.preprocess(_images())
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(batch), enc.encode(batch))
    wider = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "width": 64}}
    with pytest.raises(WeightsError, match="clip.pt"):
        create_encoder("image", "open_clip:ViT-B-32", pretrained=ckpt, **wider)
    with pytest.raises(FileNotFoundError, match="openai"):  # a hub tag is not a local file
        create_encoder("image", "open_clip:ViT-B-32", pretrained="openai", **TINY_CLIP)


# -- behavior, inputs, heads ------------------------------------------------------------

def test_run_embeddings_follow_dataset_item_order(run_dir):
    enc = create_encoder("behavior", "run", run=run_dir, item_ids=["12", "10", "13", "11"], embed_dim=None)
    assert enc.backbone_dim == 3 and not enc.table.weight.requires_grad
    torch.testing.assert_close(enc(enc.preprocess([0, 1])), torch.tensor([[6.0, 7, 8], [0, 1, 2]]))
    torch.testing.assert_close(enc(enc.preprocess(["11"])), torch.tensor([[3.0, 4, 5]]))
    with pytest.raises(WeightsError, match="1 of the data.s 2 items have no embedding"):
        create_encoder("behavior", "run", run=run_dir, item_ids=["10", "99"])
    with pytest.raises(FileNotFoundError, match="item_embeddings.safetensors"):
        create_encoder("behavior", "run", run=run_dir / "missing")
    with pytest.raises(IndexError, match="out of range"):
        enc.preprocess([4])
    table = create_encoder("behavior", "id", pretrained=run_dir / "item_embeddings.safetensors", embed_dim=None)
    assert table.table.weight.requires_grad and table.table.weight.shape == (4, 3)


def test_bad_inputs_are_clear_errors(tmp_path):
    enc = create_encoder("image", "test_vit", pretrained=None)
    with pytest.raises(DataError, match="item 1"):
        enc.preprocess([_images()[0], b"not an image"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match="broken.jpg"):
        enc.preprocess([broken])
    with pytest.raises(DataError, match="no image"):
        enc.preprocess([None])
    with pytest.raises(TypeError):
        enc.preprocess("one string is not a list")


def test_wav_files_are_read_and_resampled(tmp_path):
    from scipy.io import wavfile
    t = np.arange(8000) / 8000.0
    wavfile.write(tmp_path / "tone.wav", 8000, (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16))
    enc = create_encoder("audio", pretrained=None, channels=(8,))
    batch = enc.preprocess([tmp_path / "tone.wav", np.zeros(8000, np.float32)])
    assert batch["input_features"].shape[-1] == 16000 // 160 + 1  # 1 s at 16 kHz
    assert batch["attention_mask"][0].all() and batch["attention_mask"][1].sum() == 8000 // 160 + 1
    # the 440 Hz tone's energy sits in the low mel bands
    spec = batch["input_features"][0].mean(-1)
    assert spec.argmax() < spec.shape[0] // 2


def test_freeze_backbone_keeps_head_trainable():
    enc = create_encoder("image", "test_vit", pretrained=None, embed_dim=8).freeze_backbone()
    enc(enc.preprocess(_images())).sum().backward()
    assert all(p.grad is None for p in enc.backbone_parameters())
    assert enc.head.weight.grad is not None
    with pytest.raises(ConfigError, match="unknown projection head"):
        create_encoder("image", "test_vit", pretrained=None, head="transformer")


def test_unknown_names_list_what_exists():
    with pytest.raises(ConfigError, match="behavior/id"):
        create_encoder("behavior", "graph")
    with pytest.raises(ConfigError, match="unknown modality"):
        create_encoder("video", "x")
