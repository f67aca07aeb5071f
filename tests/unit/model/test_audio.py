"""Tests for model/audio.py: real signals synthesized with numpy, encoded with soundfile."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from model.audio import (
    DEFAULT_MAX_SECONDS,
    MAX_CHANNELS,
    SAMPLE_RATE,
    SUPPORTED_FORMATS,
    decode_audio,
    duration_seconds,
    encode_wav,
    load_audio_file,
    pcm16_bytes,
    sniff_format,
)
from model.errors import AudioDecodeError, AudioTooLongError, UnsupportedAudioFormatError

TONE_HZ = 440.0  # Hz
AMPLITUDE = 0.5  # full scale
LOSSY_SLACK = 0.1  # s, codec padding allowed for mp3/ogg
# (declared format, soundfile container, soundfile subtype, length tolerance in s)
CODECS = [
    ("wav", "WAV", "PCM_16", 0.0),
    ("wav", "WAV", "FLOAT", 0.0),
    ("flac", "FLAC", "PCM_16", 0.0),
    ("ogg", "OGG", "VORBIS", LOSSY_SLACK),
    ("ogg", "OGG", "OPUS", LOSSY_SLACK),
    ("mp3", "MP3", "MPEG_LAYER_III", LOSSY_SLACK),
]
CODEC_IDS = [f"{c[0]}-{c[2].lower()}" for c in CODECS]


def make_tone(rate: int, seconds: float = 1.0, hz: float = TONE_HZ) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (AMPLITUDE * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def make_chirp(rate: int, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (AMPLITUDE * np.sin(2 * np.pi * (200 * t + 1500 * t**2))).astype(np.float32)


def encode(signal: np.ndarray, rate: int, container: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, signal, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def peak_hz(waveform: torch.Tensor, rate: int = SAMPLE_RATE) -> float:
    x = waveform.numpy()
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def rms(x: torch.Tensor | np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))


def set_flac_total_samples(data: bytes, total: int) -> bytes:
    """Rewrite STREAMINFO's 36-bit sample count (bytes 18-26 pack rate, channels, bits, total)."""
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | total
    return data[:18] + packed.to_bytes(8, "big") + data[26:]


def expect_error(error: type[Exception], *fragments: str) -> pytest.RaisesExc:
    """pytest.raises that also checks the message names each fragment, in any order."""
    return pytest.raises(error, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# ---- decoding each format -------------------------------------------------------------------


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "sniffed"])
@pytest.mark.parametrize(("fmt", "container", "subtype", "slack"), CODECS, ids=CODEC_IDS)
def test_decode_each_format(fmt, container, subtype, slack, declare):
    data = encode(make_tone(48000), 48000, container, subtype)
    waveform = decode_audio(data, fmt if declare else None)
    assert waveform.dtype == torch.float32 and waveform.dim() == 1
    assert abs(len(waveform) - SAMPLE_RATE) <= slack * SAMPLE_RATE + 1
    assert abs(peak_hz(waveform) - TONE_HZ) <= 2.0
    assert rms(waveform) == pytest.approx(AMPLITUDE / np.sqrt(2), rel=0.15)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resampled_tone_keeps_its_pitch_and_length(rate):
    waveform = decode_audio(encode(make_tone(rate, seconds=2.0), rate))
    assert abs(len(waveform) - 2 * SAMPLE_RATE) <= 1
    assert abs(peak_hz(waveform) - TONE_HZ) <= 1.0
    assert rms(waveform) == pytest.approx(AMPLITUDE / np.sqrt(2), rel=0.02)


def test_resampled_chirp_keeps_its_shape():
    direct = torch.from_numpy(make_chirp(SAMPLE_RATE))
    resampled = decode_audio(encode(make_chirp(44100), 44100, "WAV", "FLOAT"))
    assert len(resampled) == len(direct)
    # the chirp tops out at 3.2 kHz, well inside both bands, so the signals should agree
    assert float(torch.corrcoef(torch.stack([direct, resampled]))[0, 1]) > 0.99


@pytest.mark.parametrize(("container", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_24")])
def test_stereo_is_downmixed_by_mean(container, subtype):
    tone = make_tone(SAMPLE_RATE)
    cancelled = decode_audio(
        encode(np.stack([tone, -tone], axis=1), SAMPLE_RATE, container, subtype)
    )
    assert cancelled.dim() == 1 and len(cancelled) == len(tone)
    assert float(cancelled.abs().max()) < 1e-3
    halved = decode_audio(encode(np.stack([tone, 0 * tone], axis=1), SAMPLE_RATE, container))
    assert rms(halved) == pytest.approx(rms(tone) / 2, rel=0.01)


def test_odd_sample_rate_is_resampled_with_a_bounded_filter():
    # 44099 Hz shares no factor with 16 kHz: an exact sinc kernel would need ~2.8 GB
    start = time.perf_counter()
    waveform = decode_audio(encode(make_tone(44099), 44099))
    assert time.perf_counter() - start < 2.0
    assert abs(len(waveform) - SAMPLE_RATE) <= 1
    assert abs(peak_hz(waveform) - TONE_HZ) <= 1.0


# ---- pcm16, encoding, helpers ----------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_pcm16_round_trip(rate):
    tone = torch.from_numpy(make_tone(rate))
    data = pcm16_bytes(tone)
    assert len(data) == 2 * len(tone)
    waveform = decode_audio(data, "pcm16", pcm_rate=rate)
    assert abs(len(waveform) - SAMPLE_RATE) <= 1
    assert abs(peak_hz(waveform) - TONE_HZ) <= 1.0
    if rate == SAMPLE_RATE:
        assert torch.allclose(waveform, tone, atol=1.5 / 32768)


def test_encode_wav_round_trips_mono_and_stereo():
    tone = torch.from_numpy(make_tone(SAMPLE_RATE))
    data = encode_wav(tone)
    assert sniff_format(data) == "wav"
    assert sf.info(io.BytesIO(data)).subtype == "PCM_16"
    assert torch.allclose(decode_audio(data), tone, atol=1.5 / 32768)
    stereo = encode_wav(torch.stack([tone, torch.zeros_like(tone)]))  # [2, T]
    assert sf.info(io.BytesIO(stereo)).channels == 2
    assert torch.allclose(decode_audio(stereo), tone / 2, atol=1.5 / 32768)
    at_8k = encode_wav(torch.from_numpy(make_tone(8000)), sample_rate=8000)
    assert sf.info(io.BytesIO(at_8k)).samplerate == 8000


def test_encoders_clip_instead_of_wrapping():
    loud = torch.tensor([2.0, -2.0, 0.0])
    assert decode_audio(encode_wav(loud)).tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-4)
    assert np.frombuffer(pcm16_bytes(loud), "<i2").tolist() == [32767, -32767, 0]


def test_encoders_refuse_bad_waveforms():
    with pytest.raises(ValueError, match="non-finite"):
        encode_wav(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="mono"):
        pcm16_bytes(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="shape"):
        encode_wav(torch.zeros(1, 2, 10))


def test_duration_seconds():
    assert duration_seconds(torch.zeros(24000)) == 1.5
    assert duration_seconds(torch.zeros(2, 22050), sample_rate=44100) == 0.5


def test_sniff_format():
    tone = make_tone(SAMPLE_RATE, seconds=0.2)
    for fmt, container, subtype, _ in CODECS:
        assert sniff_format(encode(tone, 48000, container, subtype)) == fmt
    flac = encode(tone, SAMPLE_RATE, "FLAC")
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10)  # an empty 10-byte ID3v2 tag
    assert sniff_format(id3 + flac) == "flac"
    assert decode_audio(id3 + flac).shape == (len(tone),)
    assert sniff_format(b"\xff\xf1\x50\x80") is None  # AAC in ADTS, not mp3
    assert sniff_format(pcm16_bytes(torch.from_numpy(tone))) is None
    assert sniff_format(b"") is None


def test_load_audio_file_matches_decode_audio(tmp_path):
    data = encode(make_tone(22050), 22050, "FLAC")
    path = tmp_path / "tone.flac"
    path.write_bytes(data)
    assert torch.equal(load_audio_file(path), decode_audio(data))
    assert torch.equal(load_audio_file(str(path)), decode_audio(data))
    with expect_error(AudioTooLongError, "0.50 s"):
        load_audio_file(path, max_seconds=0.5)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVE" + bytes(8))
    with expect_error(AudioDecodeError, "bad.wav"):
        load_audio_file(bad)
    with pytest.raises(FileNotFoundError):
        load_audio_file(tmp_path / "missing.wav")


# ---- streamed headers (length unknown or a placeholder) ---------------------------------------


def test_wav_with_streaming_placeholder_sizes_decodes():
    data = bytearray(encode(make_tone(SAMPLE_RATE), SAMPLE_RATE))
    data[4:8] = b"\xff\xff\xff\xff"  # what ffmpeg writes to a pipe
    data[40:44] = b"\xff\xff\xff\xff"
    assert len(decode_audio(bytes(data))) == SAMPLE_RATE


def test_flac_of_unknown_length_decodes_and_is_still_capped():
    data = set_flac_total_samples(encode(make_tone(SAMPLE_RATE, 3.0), SAMPLE_RATE, "FLAC"), 0)
    assert len(decode_audio(data)) == 3 * SAMPLE_RATE
    with expect_error(AudioTooLongError, "runs past", "limit is 1.00 s"):
        decode_audio(data, max_seconds=1.0)


# ---- errors ----------------------------------------------------------------------------------


def test_unknown_format_names_the_supported_ones():
    with expect_error(UnsupportedAudioFormatError, "'aac'", *SUPPORTED_FORMATS):
        decode_audio(b"\x00\x01", "aac")
    assert issubclass(UnsupportedAudioFormatError, AudioDecodeError)


def test_declared_format_is_case_insensitive():
    data = encode(make_tone(SAMPLE_RATE), SAMPLE_RATE)
    assert torch.equal(decode_audio(data, "WAV"), decode_audio(data, "wav"))


def _wav_zero_frames() -> bytes:
    return encode(np.zeros(0, np.float32), SAMPLE_RATE)


def _wav_with(value: float) -> bytes:
    signal = make_tone(SAMPLE_RATE)
    signal[100] = value
    return encode(signal, SAMPLE_RATE, "WAV", "FLOAT")


BAD_INPUTS = {
    "empty": (b"", None, {}, ["empty"]),
    "garbage": (bytes(range(256)) * 4, None, {}, ["not wav, flac, ogg or mp3", "pcm16"]),
    "garbage-declared-mp3": (b"hello world" * 50, "mp3", {}, ["not mp3"]),
    "zero-length-wav": (_wav_zero_frames(), None, {}, ["no samples"]),
    "nan-in-float-wav": (_wav_with(float("nan")), "wav", {}, ["non-finite"]),
    "inf-in-float-wav": (_wav_with(float("inf")), "wav", {}, ["non-finite"]),
    "pcm16-no-rate": (bytes(100), "pcm16", {}, ["pcm_rate"]),
    "pcm16-odd-bytes": (bytes(101), "pcm16", {"pcm_rate": 16000}, ["odd byte count", "101"]),
    "pcm16-rate-zero": (bytes(100), "pcm16", {"pcm_rate": 0}, ["0 Hz"]),
    "pcm16-rate-huge": (bytes(100), "pcm16", {"pcm_rate": 10**9}, ["outside"]),
    "pcm16-rate-float": (bytes(100), "pcm16", {"pcm_rate": 16000.5}, ["integer"]),
    "rate-too-low": (encode(make_tone(2000), 2000), None, {}, ["2000 Hz", "outside"]),
    "too-many-channels": (
        encode(np.zeros((100, MAX_CHANNELS + 1), np.float32), SAMPLE_RATE),
        None,
        {},
        [f"{MAX_CHANNELS + 1} channels"],
    ),
    "flac-declared-wav": (
        encode(make_tone(SAMPLE_RATE), SAMPLE_RATE, "FLAC"),
        "wav",
        {},
        ["wav", "flac"],
    ),
    "wav-declared-mp3": (encode(make_tone(SAMPLE_RATE), SAMPLE_RATE), "mp3", {}, ["mp3", "wav"]),
}


@pytest.mark.parametrize(
    ("data", "fmt", "kwargs", "fragments"), BAD_INPUTS.values(), ids=BAD_INPUTS
)
def test_bad_input_raises_a_typed_error_with_a_message(data, fmt, kwargs, fragments):
    with expect_error(AudioDecodeError, *fragments):
        decode_audio(data, fmt, **kwargs)


@pytest.mark.parametrize("size", [4, 12, 20, 36, 43])
def test_truncated_wav_header(size):
    with pytest.raises(AudioDecodeError):
        decode_audio(encode(make_tone(SAMPLE_RATE), SAMPLE_RATE)[:size])


@pytest.mark.parametrize(("fmt", "container", "subtype", "slack"), CODECS, ids=CODEC_IDS)
@pytest.mark.parametrize("keep", [0.01, 0.5])
def test_truncated_file(fmt, container, subtype, slack, keep):
    data = encode(make_tone(48000, seconds=2.0), 48000, container, subtype)
    cut = data[: max(4, int(len(data) * keep))]
    if container == "OGG" and keep > 0.1:
        # ogg states no length up front: a cut stream may decode to what it holds, or fail
        try:
            assert len(decode_audio(cut, fmt)) < 2 * SAMPLE_RATE
        except AudioDecodeError:
            pass
        return
    with pytest.raises(AudioDecodeError):
        decode_audio(cut, fmt)


def test_truncated_messages_name_the_shortfall():
    tone = make_tone(SAMPLE_RATE, seconds=2.0)
    wav = encode(tone, SAMPLE_RATE)
    with expect_error(AudioDecodeError, "truncated", "64000 bytes"):
        decode_audio(wav[: len(wav) // 2])
    mp3 = encode(tone, SAMPLE_RATE, "MP3", "MPEG_LAYER_III")
    with expect_error(AudioDecodeError, "truncated", "2.00 s"):
        decode_audio(mp3[: len(mp3) // 2])


def test_non_bytes_and_bad_limit_are_caller_errors():
    with pytest.raises(TypeError):
        decode_audio("RIFF....WAVE")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_seconds"):
        decode_audio(bytes(10), "pcm16", pcm_rate=16000, max_seconds=0)


# ---- length limits ---------------------------------------------------------------------------


def test_too_long_is_refused_from_the_header_before_decoding():
    # the header claims an hour; the stream holds one second, so only the header can say 3600 s
    data = set_flac_total_samples(encode(make_tone(SAMPLE_RATE), SAMPLE_RATE, "FLAC"), 3600 * 16000)
    with expect_error(AudioTooLongError, "3600.00 s", "limit is 60.00 s"):
        decode_audio(data, max_seconds=60)


def test_long_file_is_refused_fast():
    ten_minutes = encode(np.zeros(8000 * 600, np.float32), 8000, "FLAC")  # small: silence
    start = time.perf_counter()
    with expect_error(AudioTooLongError, "600.00 s", "limit is 60.00 s"):
        decode_audio(ten_minutes, max_seconds=60)
    assert time.perf_counter() - start < 0.25  # decoding it all takes over a second


@pytest.mark.parametrize("fmt", ["wav", "pcm16"])
def test_too_long_names_both_durations(fmt):
    tone = torch.from_numpy(make_tone(SAMPLE_RATE, seconds=3.0))
    data = encode_wav(tone) if fmt == "wav" else pcm16_bytes(tone)
    with expect_error(AudioTooLongError, "3.00 s", "limit is 2.50 s"):
        decode_audio(data, fmt, pcm_rate=SAMPLE_RATE, max_seconds=2.5)
    assert len(decode_audio(data, fmt, pcm_rate=SAMPLE_RATE, max_seconds=3.0)) == 3 * SAMPLE_RATE


def test_default_limit_applies():
    seconds = DEFAULT_MAX_SECONDS + 1
    with expect_error(AudioTooLongError, f"{DEFAULT_MAX_SECONDS:.2f} s"):
        decode_audio(bytes(2 * 4000 * int(seconds)), "pcm16", pcm_rate=4000)
    assert len(
        decode_audio(bytes(2 * 4000 * int(seconds)), "pcm16", pcm_rate=4000, max_seconds=np.inf)
    )
