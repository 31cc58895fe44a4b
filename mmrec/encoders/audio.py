"""Audio encoders: transformers audio models (AST, wav2vec2, Whisper's encoder) and a
small log-mel CNN that runs on a CPU.

Inputs are mono waveforms at ``sampling_rate`` (16 kHz): numpy arrays, ``(array, rate)``
pairs, or paths of WAV files (read with scipy, resampled with a polyphase filter;
torchaudio is not a dependency).
"""

from __future__ import annotations

import inspect
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mmrec.encoders.base import Batch, Encoder, check_embed_input
from mmrec.encoders.weights import Pretrained, load_hf_model, load_weights, resolve_pretrained
from mmrec.errors import ConfigError, DataError
from mmrec.registry import ENCODERS

AudioLike = np.ndarray | Tensor | tuple | str | Path | bytes  # bytes: an encoded WAV file

#: Short names for transformers audio model types.
MODEL_TYPE_ALIASES = {"ast": "audio-spectrogram-transformer"}


#: scipy's WavFileWarning messages that mean the file was cut short (scipy returns what is
#: there and only warns; mmrec counts such a file as corrupt instead of encoding half a clip)
TRUNCATED_WAV = ("Reached EOF prematurely", "Incomplete chunk ID")


#: Longest audio a WAV file may declare (data-chunk frames / sample rate): 10 minutes. The
#: encoders keep seconds of it (``LogMelCNNEncoder.max_seconds``: 10 s), so anything longer is a
#: mistake or a forged header, and scipy would read and convert all of it first.
MAX_WAV_SECONDS = 600.0
#: Most sample bytes a WAV file may declare: 256 MiB, whatever its rate says (10 minutes of 48 kHz
#: stereo float32 is 230 MB). A header forging a huge rate would otherwise pass the duration bound.
MAX_WAV_BYTES = 256 * 2**20


def _declared_wav_size(fid: Any) -> tuple[int, float | None] | None:
    """``(sample bytes, seconds or None)`` a WAV header declares, read without reading the samples.

    Walks the RIFF / RIFX / RF64 chunk headers up to ``data``, seeking past other chunks' bodies.
    ``None`` when the header cannot be followed that far: then scipy's reader says what is wrong.
    """
    head = fid.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX", b"RF64") or head[8:] != b"WAVE":
        return None
    end = ">" if head[:4] == b"RIFX" else "<"
    rf64_data = None
    rate = align = 0
    for _ in range(64):  # real files hold a handful of chunks; a forged one may chain thousands
        ck = fid.read(8)
        if len(ck) < 8:
            return None
        size = struct.unpack(end + "I", ck[4:])[0]
        if ck[:4] == b"ds64" and size >= 16:
            body = fid.read(size)
            rf64_data = struct.unpack("<Q", body[8:16])[0] if len(body) >= 16 else None
            fid.seek(size % 2, 1)
        elif ck[:4] == b"fmt " and size >= 16:
            body = fid.read(16)
            if len(body) < 16:
                return None
            _, _, rate, _, align = struct.unpack(end + "HHIIH", body[:14])
            fid.seek(size - 16 + size % 2, 1)
        elif ck[:4] == b"data":
            if size == 0xFFFFFFFF:  # RF64: the size is in ds64; RIFF: a streamed file of unknown length
                if rf64_data is not None:
                    size = rf64_data
                else:  # scipy then reads to the end of the file: bound what is really there
                    here = fid.tell()
                    size = fid.seek(0, 2) - here
                    fid.seek(here)
            seconds = size / align / rate if rate > 0 and align > 0 else None
            return size, seconds
        else:
            fid.seek(size + size % 2, 1)
    return None


def _check_wav_size(src: Any, index: int, where: Any) -> None:
    """Refuse a WAV whose header declares more than :data:`MAX_WAV_SECONDS` / :data:`MAX_WAV_BYTES`
    before a sample is read (reason ``too_large``, as ``load_image`` does for decompression bombs)."""
    if isinstance(src, (str, Path)):
        with open(src, "rb") as fid:
            declared = _declared_wav_size(fid)
    else:
        src.seek(0)
        declared = _declared_wav_size(src)
        src.seek(0)
    if declared is None:
        return
    size, seconds = declared
    if size > MAX_WAV_BYTES or (seconds is not None and seconds > MAX_WAV_SECONDS):
        length = f"{seconds:,.0f} s" if seconds is not None else "no valid sample rate"
        err = DataError(f"audio of item {index} is too large to read safely: its header declares {size:,} bytes "
                        f"of samples ({length}); the limit is {MAX_WAV_SECONDS / 60:g} minutes and "
                        f"{MAX_WAV_BYTES // 2**20} MiB (mmrec.encoders.audio.MAX_WAV_SECONDS / MAX_WAV_BYTES)",
                        file=where, field="audio")
        err.reason = "too_large"  # type: ignore[attr-defined]  # counted apart from corrupt files
        raise err


def _read_wav(src: Any) -> tuple[int, np.ndarray]:
    """``scipy.io.wavfile.read``, strict about truncation; other WAV warnings pass through."""
    import warnings

    from scipy.io import wavfile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", wavfile.WavFileWarning)
        try:
            rate, data = wavfile.read(src)
        except UnboundLocalError:  # scipy returns a variable only its 'data' chunk branch sets
            raise ValueError("no 'data' chunk: not a complete WAV file") from None
    for w in caught:
        msg = str(w.message)
        if issubclass(w.category, wavfile.WavFileWarning) and msg.startswith(TRUNCATED_WAV):
            raise ValueError(f"truncated WAV: {msg}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return rate, data


def load_waveform(x: AudioLike, sampling_rate: int, index: int = 0) -> np.ndarray:
    """A mono float32 waveform at ``sampling_rate``; a truncated WAV file is a :class:`DataError`,
    and so is one whose header declares more than :data:`MAX_WAV_SECONDS` or :data:`MAX_WAV_BYTES`
    (reason ``too_large``, checked before its samples are read).

    The one decoder of audio media: encoders' ``preprocess`` (pre-training, end-to-end
    training) and ``mmrec extract`` all read through it, so bad audio is judged the same
    everywhere (counted as ``audio/corrupt`` or ``audio/too_large`` by
    :func:`~mmrec.encoders.robust.preprocess_robust`).
    """
    from scipy.signal import resample_poly

    rate = sampling_rate
    where = None
    try:
        if x is None:
            raise ValueError("no audio; mask it instead of encoding it")
        if isinstance(x, tuple):
            x, rate = x
        if isinstance(x, (str, Path, bytes, bytearray, memoryview)):
            import io

            where = x if isinstance(x, (str, Path)) else None
            src = str(x) if where is not None else io.BytesIO(bytes(x))
            _check_wav_size(src, index, where)  # from the header, before any sample is read
            rate, data = _read_wav(src)
            if np.issubdtype(data.dtype, np.integer):
                data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
            x = data
        wav = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float32)
        if wav.ndim == 2:  # (channels, n) or (n, channels): average the short axis
            wav = wav.mean(axis=int(np.argmin(wav.shape)))
        if wav.ndim != 1 or wav.size == 0:
            raise ValueError(f"expected a non-empty mono waveform, got shape {wav.shape}")
    except DataError:  # too_large: already says what and where
        raise
    # scipy's WAV parser divides by the header's channel count and unpacks its fields unchecked: a
    # forged header raises ZeroDivisionError / struct.error / EOFError, not only ValueError
    except (OSError, ValueError, TypeError, ArithmeticError, EOFError, IndexError, struct.error) as e:
        reason = str(e) or type(e).__name__
        reason = reason if len(reason) <= 200 else reason[:200] + "..."  # never echo a whole payload
        raise DataError(f"cannot read audio of item {index}: {reason}", file=where, field="audio") from e
    if int(rate) != sampling_rate:
        frac = Fraction(sampling_rate, int(rate))
        wav = resample_poly(wav, frac.numerator, frac.denominator).astype(np.float32)
    return wav


@ENCODERS.register("audio/hf")
class HFAudioEncoder(Encoder):
    """A transformers audio model with its feature extractor + pooling + head.

    ``name``: a local model directory (weights + preprocessor config) or a model type
    (``"ast"``, ``"wav2vec2"``, ``"whisper"``) built from ``config`` (dict) at random
    init, whose feature extractor is built from ``feature_extractor`` (dict of kwargs,
    e.g. ``{"max_length": 128}`` for a small AST, ``{"chunk_length": 2}`` for a small
    Whisper). Encoder-decoder models keep only the encoder. Pooling: the model's
    pooler when it has one (AST), else a mean over the frames that are not padding.
    """

    modality = "audio"

    def __init__(self, name: str, pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", config: Any = None, feature_extractor: Any = None,
                 sampling_rate: int = 16000) -> None:
        super().__init__()
        import transformers
        from transformers import AutoFeatureExtractor
        from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES

        name = MODEL_TYPE_ALIASES.get(name, name)
        model, src_dir = load_hf_model("audio", name, pretrained, config)
        cfg = model.config
        if isinstance(feature_extractor, (str, Path)):
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(str(feature_extractor), local_files_only=True)
        elif src_dir is not None and feature_extractor is None:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(str(src_dir), local_files_only=True)
        else:
            cls_name = FEATURE_EXTRACTOR_MAPPING_NAMES.get(cfg.model_type)
            if cls_name is None:
                raise ConfigError(f"no feature extractor is known for model type '{cfg.model_type}'")
            self.feature_extractor = getattr(transformers, cls_name)(**dict(feature_extractor or {}))
        fe_rate = getattr(self.feature_extractor, "sampling_rate", sampling_rate)
        if fe_rate != sampling_rate:
            raise ConfigError(f"the feature extractor expects {fe_rate} Hz, sampling_rate={sampling_rate}")
        self.sampling_rate = sampling_rate
        self.backbone = model.get_encoder() if cfg.is_encoder_decoder else model
        # fixed-length extractors (Whisper: n_samples) pad to their length, others to the longest
        self._padding: bool | str = "max_length" if getattr(self.feature_extractor, "n_samples", None) else True
        # the padding mask is always used for pooling, but goes into the model only when its
        # extractor says the model was trained with one (wav2vec2-base was not)
        forward_args = set(inspect.signature(self.backbone.forward).parameters)
        self._model_inputs = set(self.feature_extractor.model_input_names) & forward_args
        if not getattr(self.feature_extractor, "return_attention_mask", True):
            self._model_inputs.discard("attention_mask")
        self._init_head(cfg.hidden_size, embed_dim, head)

    def preprocess(self, raw: Sequence[AudioLike]) -> Batch:
        check_embed_input(raw, "waveforms")
        wavs = [load_waveform(x, self.sampling_rate, i) for i, x in enumerate(raw)]
        out = self.feature_extractor(wavs, sampling_rate=self.sampling_rate, padding=self._padding,
                                     return_attention_mask=True, return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    def encode(self, batch: Batch) -> Tensor:
        inputs = {k: v for k, v in batch.items() if k in self._model_inputs}
        out = self.backbone(**inputs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled
        hidden = out.last_hidden_state
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.mean(1)
        if hasattr(self.backbone, "_get_feature_vector_attention_mask"):  # wav2vec2-style conv front end
            frames = self.backbone._get_feature_vector_attention_mask(hidden.shape[1], mask)
        elif mask.shape[1] % hidden.shape[1] == 0:  # Whisper: mel frames downsampled by a stride
            frames = mask[:, :: mask.shape[1] // hidden.shape[1]]
        else:
            return hidden.mean(1)
        m = frames.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class LogMel(nn.Module):
    """Log-mel spectrogram with ``torch.stft`` and a Slaney mel filterbank.

    ``log(mel(|STFT|^2) + eps)``; the filterbank comes from transformers'
    ``audio_utils.mel_filter_bank`` (the one its Whisper/AST extractors use).
    """

    def __init__(self, sampling_rate: int = 16000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 64) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                             max_frequency=sampling_rate / 2, sampling_rate=sampling_rate,
                             norm="slaney", mel_scale="slaney")
        self.register_buffer("filters", torch.from_numpy(np.asarray(fb, dtype=np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.n_fft, self.hop_length = n_fft, hop_length

    def forward(self, wav: Tensor) -> Tensor:
        """``[B, samples]`` -> ``[B, n_mels, frames]`` with ``frames = samples // hop + 1``."""
        spec = torch.stft(wav, self.n_fft, self.hop_length, window=self.window, center=True, return_complex=True)
        power = spec.abs() ** 2  # [B, freq, frames]
        return torch.log(torch.einsum("fm,bft->bmt", self.filters, power) + 1e-6)


@ENCODERS.register("audio/logmel-cnn")
class LogMelCNNEncoder(Encoder):
    """A small CNN over log-mel spectrograms: the CPU default for audio.

    Blocks of conv3x3-BN-ReLU-maxpool(2); the last feature map is averaged over
    frequency and over the frames that are not padding.
    """

    modality = "audio"

    def __init__(self, name: str = "logmel-cnn", pretrained: Pretrained | str = None, embed_dim: int | None = 256,
                 head: str = "linear", sampling_rate: int = 16000, n_mels: int = 64, n_fft: int = 400,
                 hop_length: int = 160, channels: Sequence[int] = (32, 64, 128), max_seconds: float = 10.0) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.max_samples = int(max_seconds * sampling_rate)
        # preprocessing runs on the CPU in loader workers: keep it out of the module tree
        # so that ``.to(device)`` leaves it there
        object.__setattr__(self, "logmel", LogMel(sampling_rate, n_fft, hop_length, n_mels))
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c
        self.backbone = nn.Sequential(nn.BatchNorm2d(1), *layers)
        self.n_pool = len(channels)
        weights = resolve_pretrained("audio", "logmel-cnn", pretrained)
        if weights is not None:
            load_weights(self.backbone, weights)
        self._init_head(channels[-1], embed_dim, head)

    def preprocess(self, raw: Sequence[AudioLike]) -> Batch:
        check_embed_input(raw, "waveforms")
        wavs = [load_waveform(x, self.sampling_rate, i)[: self.max_samples] for i, x in enumerate(raw)]
        n = max(len(w) for w in wavs)
        wav = torch.zeros(len(wavs), n)
        for i, w in enumerate(wavs):
            wav[i, : len(w)] = torch.from_numpy(w)
        with torch.no_grad():
            feats = self.logmel(wav)
        hop = self.logmel.hop_length
        lengths = torch.tensor([len(w) // hop + 1 for w in wavs])
        mask = torch.arange(feats.shape[-1])[None, :] < lengths[:, None]
        return {"input_features": feats, "attention_mask": mask}

    def encode(self, batch: Batch) -> Tensor:
        x = self.backbone(batch["input_features"].unsqueeze(1)).mean(2)  # [B, C, frames']
        mask = batch["attention_mask"].to(x.dtype)
        for _ in range(self.n_pool):  # follow the frames through each ceil-mode max-pool
            mask = nn.functional.max_pool1d(mask.unsqueeze(1), 2, ceil_mode=True).squeeze(1)
        m = mask.unsqueeze(1)
        return (x * m).sum(-1) / m.sum(-1).clamp(min=1.0)
