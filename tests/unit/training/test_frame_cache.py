"""Cached Whisper front frames: the adapter on cached frames equals the whole encoder on audio."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from model.audio import encode_wav
from model.config import SAMPLE_RATE, EncoderConfig, encoder_preset
from model.encoders.base import build_encoder
from model.encoders.whisper import WhisperAudioEncoder
from training.batches import pad_waveforms
from training.frame_cache import FrameCache, front_digest, length_batches
from training.manifest import Utterance


def tiny_whisper(trainable_layers: int = 0) -> WhisperAudioEncoder:
    cfg = EncoderConfig(
        kind="whisper",
        whisper_source="tiny-random",
        llm_hidden=48,
        adapter_hidden=32,
        trainable_layers=trainable_layers,
    )
    return WhisperAudioEncoder(cfg)


def chirp(seconds: float, f0: float) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE  # [T_wav] s
    return 0.3 * torch.sin(2 * math.pi * (f0 + 200 * t) * t)  # [T_wav]


def write_utts(folder: Path, seconds: list[float]) -> list[Utterance]:
    utts = []
    for i, s in enumerate(seconds):
        path = folder / f"u{i}.wav"
        path.write_bytes(encode_wav(chirp(s, 300.0 + 50 * i)))
        utts.append(Utterance(f"u{i}", str(path), f"text {i}", duration=s))
    return utts


def test_adapter_on_front_frames_equals_the_whole_encoder() -> None:
    torch.manual_seed(0)
    enc = tiny_whisper().eval()
    wavs, lengths = pad_waveforms([chirp(1.3, 300.0), chirp(0.7, 500.0)])  # [2, T_wav], [2]
    with torch.no_grad():
        whole, whole_len = enc(wavs, lengths)
        frames, frame_len = enc.front(wavs, lengths)  # [2, T_enc, D]
        cached, cached_len = enc(frames, frame_len, precomputed=True)
    assert torch.equal(whole_len, cached_len)
    torch.testing.assert_close(cached, whole)


@pytest.mark.parametrize("seconds", [[1.3, 0.7], [31.0, 2.0]])  # one window; two, and one
def test_trained_top_layers_on_front_frames_equal_the_whole_encoder(seconds) -> None:
    torch.manual_seed(0)
    enc = tiny_whisper(trainable_layers=1).eval()
    assert enc.front_frozen  # the front stops below the trained layer
    wavs, lengths = pad_waveforms([chirp(s, 300.0 + 100 * i) for i, s in enumerate(seconds)])
    with torch.no_grad():
        whole, whole_len = enc(wavs, lengths)
        frames, frame_len = enc.front(wavs, lengths)  # [B, T_enc, D], before the trained layer
        cached, cached_len = enc(frames, frame_len, precomputed=True)
    assert torch.equal(whole_len, cached_len)
    torch.testing.assert_close(cached, whole)
    # the same weights with nothing trained give the same embeddings: only the split moved
    frozen = tiny_whisper().eval()
    frozen.adapter.load_state_dict(enc.adapter.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(frozen(wavs, lengths)[0], whole)
    # over 30 s, each window's trained layers attend within the window, as the frozen ones do
    assert (frame_len.max() > 1500) == (max(seconds) > 30)


def test_fronts_cut_at_different_layers_get_different_folders() -> None:
    assert front_digest(tiny_whisper()) != front_digest(tiny_whisper(trainable_layers=1))
    assert front_digest(tiny_whisper(trainable_layers=1)) == front_digest(
        tiny_whisper(trainable_layers=1)
    )


def test_an_encoder_without_a_frozen_front_cannot_be_cached() -> None:
    enc = build_encoder(encoder_preset("tiny", kind="conformer", llm_hidden=48))
    assert not enc.front_frozen
    with pytest.raises(ValueError, match="cannot cache"):
        FrameCache("unused", enc, 30.0)


def test_fill_stores_each_clip_at_its_own_length_and_reads_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = tiny_whisper()
    utts = write_utts(tmp_path, [0.4, 1.1, 2.3])
    cache = FrameCache(tmp_path / "cache", enc, max_seconds=30.0)
    assert cache.fill(enc, utts, torch.device("cpu")) == 3
    assert cache.fill(enc, utts, torch.device("cpu")) == 0  # all cached now
    for i, utt in enumerate(utts):
        wav = chirp(utt.duration, 300.0 + 50 * i)
        alone, alone_len = enc.front(wav[None], torch.tensor([wav.shape[0]]))
        stored = cache.load(utt)  # [T_f, D]
        assert stored.shape == (int(alone_len[0]), enc.d_model)
        # float16 on disk: close to, not equal to, the float32 frames
        assert not stored.isnan().any() and stored.abs().max() > 0
    # a rewritten file is a new key; the old frames are never read for it
    before = cache.path(utts[0])
    utts[0].duration = 0.9
    Path(utts[0].audio).write_bytes(encode_wav(chirp(0.9, 300.0)))
    assert cache.path(utts[0]) != before
    assert cache.fill(enc, utts, torch.device("cpu")) == 1
    assert cache.load(utts[0]).shape[0] == 45  # 0.9 s -> 90 mel frames -> 45 encoder frames


def test_cached_frames_equal_a_fresh_front(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = tiny_whisper()
    (utt,) = write_utts(tmp_path, [1.7])
    cache = FrameCache(tmp_path / "cache", enc, max_seconds=30.0)
    cache.fill(enc, [utt], torch.device("cpu"))
    wav = chirp(1.7, 300.0)
    fresh, _ = enc.front(wav[None], torch.tensor([wav.shape[0]]))
    torch.testing.assert_close(cache.load(utt), fresh[0], atol=2e-3, rtol=2e-3)


def test_new_front_weights_get_a_new_folder() -> None:
    torch.manual_seed(0)
    a, b = tiny_whisper(), tiny_whisper()
    assert front_digest(a) == front_digest(b)  # "tiny-random" is seeded: same weights
    with torch.no_grad():
        b.whisper.conv1.weight.add_(0.01)
    assert front_digest(a) != front_digest(b)
    # the trained adapter is not part of the digest
    with torch.no_grad():
        a.adapter.proj[1].weight.add_(1.0)
    assert front_digest(a) != front_digest(b) and front_digest(a) == front_digest(tiny_whisper())
    # a wider Whisper search hears other tokens: another folder (greedy keeps its own)
    a.config = dataclasses.replace(a.config, asr_beams=3)
    assert front_digest(a) != front_digest(tiny_whisper())
    a.config = dataclasses.replace(a.config, asr_beams=1)
    assert front_digest(a) == front_digest(tiny_whisper())


def test_length_batches_bound_padded_seconds() -> None:
    utts = [Utterance(str(i), "x", "t", duration=d) for i, d in enumerate([1, 1, 2, 2, 5, 9])]
    batches = length_batches(utts, seconds=6.0)
    assert [[u.id for u in b] for b in batches] == [["0", "1", "2"], ["3"], ["4"], ["5"]]
    assert all(max(u.duration for u in b) * len(b) <= 6.0 or len(b) == 1 for b in batches)
