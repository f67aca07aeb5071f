"""Audio in and out: client bytes or files to mono float32 at 16 kHz; waveforms to wav or pcm16.

The server passes client bytes straight to `decode_audio`, so every input may be hostile: each
failure is a typed error from `model/errors.py`, the length is checked from the header before
any sample is decoded, and decoding runs in blocks so a header that lies cannot exhaust memory.

Dims: T samples, C channels.
"""

from __future__ import annotations

import io
import logging
import math
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from model.config import SAMPLE_RATE
from model.errors import AudioDecodeError, AudioTooLongError, UnsupportedAudioFormatError

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("wav", "flac", "ogg", "mp3", "pcm16")
DEFAULT_MAX_SECONDS = 600.0  # s, the cap when a caller names none
MIN_SAMPLE_RATE = 4000  # Hz, lowest source rate accepted
MAX_SAMPLE_RATE = 192000  # Hz, highest source rate accepted
MAX_CHANNELS = 16  # channels; more is no speech recording, only a way to multiply decode cost
READ_BLOCK = 65536  # frames decoded per read
TRUNCATION_SLACK = 0.1  # s, how far decoding may fall short of the header's length
PCM16_SCALE = 32768.0  # int16 full scale
SNIFF_BYTES = 12  # bytes of header the container magic needs
STREAMED_WAV_SIZE = 0x7FFF0000  # bytes; recorders writing to a pipe declare at least this
MAX_RESAMPLE_KERNEL = 1 << 21  # elements of torchaudio's sinc kernel (8 MB in float32)
RATE_QUANTUM = 50  # Hz, a source rate too costly to resample exactly is rounded to this
LOWPASS_WIDTH = 6  # zero crossings, torchaudio's default lowpass_filter_width
ROLLOFF = 0.99  # fraction of Nyquist, torchaudio's default rolloff

# libsndfile's container names that each declared format may hold
_SF_CONTAINERS = {
    "wav": ("WAV", "WAVEX", "RF64"),
    "flac": ("FLAC",),
    "ogg": ("OGG",),
    "mp3": ("MP3",),
}
_SF_UNKNOWN_FRAMES = 2**63 - 1  # SF_COUNT_MAX: the container does not state its length
_SF_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, EOFError)
# libsndfile clamps a short wav silently and only says so in its log
_SF_WAV_SHORT = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)


def decode_audio(
    data: bytes,
    fmt: str | None = None,
    *,
    pcm_rate: int | None = None,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """Mono float32 waveform `[T]` at `SAMPLE_RATE` from encoded bytes.

    `fmt` is one of `SUPPORTED_FORMATS`, or None to recognise the container from its magic bytes
    (raw pcm16 has none, so it must be declared along with `pcm_rate` in Hz). `max_seconds`
    defaults to `DEFAULT_MAX_SECONDS`; pass `math.inf` for no limit.
    """
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"audio data must be bytes, got {type(data).__name__}")
    if not data:
        raise AudioDecodeError("audio is empty (0 bytes)")
    fmt = _verify_format(fmt)
    limit = _verify_limit(max_seconds)
    if fmt == "pcm16":
        samples, rate = _decode_pcm16(bytes(data), pcm_rate, limit)
    else:
        samples, rate = _decode_container(io.BytesIO(data), fmt, limit, "audio")
    return _finish_waveform(samples, rate, "audio")


def load_audio_file(path: str | Path, max_seconds: float | None = None) -> torch.Tensor:
    """Mono float32 waveform `[T]` at `SAMPLE_RATE` from a wav, flac, ogg or mp3 file."""
    limit = _verify_limit(max_seconds)
    with open(path, "rb") as stream:
        samples, rate = _decode_container(stream, None, limit, str(path))
    return _finish_waveform(samples, rate, str(path))


def sniff_format(data: bytes) -> str | None:
    """The container ("wav", "flac", "ogg", "mp3") named by the magic bytes, or None."""
    return _sniff_stream(io.BytesIO(data))


def encode_wav(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit PCM wav bytes of a `[T]` (mono) or `[C, T]` waveform in [-1, 1] (clipped)."""
    pcm = _to_int16(waveform)  # [T] or [C, T]
    buffer = io.BytesIO()
    sf.write(buffer, pcm.T, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def pcm16_bytes(waveform: torch.Tensor) -> bytes:
    """Raw little-endian int16 bytes of a mono `[T]` waveform in [-1, 1] (clipped)."""
    if waveform.dim() != 1:
        raise ValueError(
            f"pcm16 is mono: expected a [T] waveform, got shape {tuple(waveform.shape)}"
        )
    return _to_int16(waveform).astype("<i2").tobytes()


def duration_seconds(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> float:
    """Length in seconds of a `[T]` or `[C, T]` waveform."""
    return waveform.shape[-1] / sample_rate


def _verify_format(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    name = fmt.strip().lower()
    if name not in SUPPORTED_FORMATS:
        raise UnsupportedAudioFormatError(
            f"unsupported audio format {fmt!r}; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    return name


def _verify_limit(max_seconds: float | None) -> float:
    limit = DEFAULT_MAX_SECONDS if max_seconds is None else float(max_seconds)
    if not limit > 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    return limit


def _verify_rate(rate: object, label: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise AudioDecodeError(f"{label}: sample rate must be an integer in Hz, got {rate!r}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(
            f"{label}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    return rate


def _verify_duration(
    frames: int, rate: int, max_seconds: float, label: str, *, exact: bool
) -> None:
    seconds = frames / rate
    if seconds > max_seconds:
        length = f"is {seconds:.2f} s long" if exact else f"runs past {seconds:.2f} s"
        raise AudioTooLongError(f"{label} {length}; the limit is {max_seconds:.2f} s")


def _decode_pcm16(data: bytes, pcm_rate: int | None, max_seconds: float) -> tuple[np.ndarray, int]:
    if pcm_rate is None:
        raise AudioDecodeError("pcm16 audio needs pcm_rate, its sample rate in Hz")
    rate = _verify_rate(pcm_rate, "pcm16 audio")
    if len(data) % 2:
        raise AudioDecodeError(
            f"pcm16 audio has an odd byte count ({len(data)}); int16 samples are 2 bytes each"
        )
    _verify_duration(len(data) // 2, rate, max_seconds, "pcm16 audio", exact=True)
    samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM16_SCALE  # [T]
    return samples, rate


def _sniff_stream(stream: BinaryIO) -> str | None:
    head = stream.read(SNIFF_BYTES)
    found = _sniff_magic(head)
    if head[:3] == b"ID3" and len(head) >= 10:
        # an ID3v2 tag (size in 7-bit bytes, plus a footer if flagged) may precede mp3 or flac
        size = sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(head[6:10]))
        stream.seek(10 + size + (10 if head[5] & 0x10 else 0))
        found = "flac" if stream.read(4) == b"fLaC" else "mp3"
    stream.seek(0)
    return found


def _sniff_magic(head: bytes) -> str | None:
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] in (b"fLaC", b"OggS"):
        return "flac" if head[:4] == b"fLaC" else "ogg"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer, version = (head[1] >> 1) & 3, (head[1] >> 3) & 3
        return "mp3" if layer != 0 and version != 1 else None  # 0 and 1 are reserved (or AAC)
    return None


def _decode_container(
    stream: BinaryIO, fmt: str | None, max_seconds: float, label: str
) -> tuple[np.ndarray, int]:
    found = _sniff_stream(stream)
    if found is None:
        hint = "" if fmt else "; raw pcm16 must be declared with fmt='pcm16' and pcm_rate"
        expected = fmt or "wav, flac, ogg or mp3"
        raise AudioDecodeError(f"{label} is not {expected} data (unrecognised header){hint}")
    if fmt is not None and found != fmt:
        raise AudioDecodeError(f"{label} was declared {fmt} but its bytes are {found}")
    try:
        handle = sf.SoundFile(stream)
    except _SF_ERRORS as error:
        raise AudioDecodeError(f"{label}: cannot open {found} data: {_describe(error)}") from error
    # soundfile re-seeks after each read, which fails at the end of a flac of unknown length
    # (as ffmpeg writes to a pipe); sequential decoding needs no seeking
    handle.seekable = lambda: False  # type: ignore[method-assign]
    with handle:
        rate = _verify_header(handle, found, max_seconds, label)
        samples = _read_mono(handle, found, max_seconds, label)
        _verify_complete(handle, len(samples), rate, label)
    return samples, rate


def _verify_header(handle: sf.SoundFile, found: str, max_seconds: float, label: str) -> int:
    if handle.format not in _SF_CONTAINERS[found]:
        raise AudioDecodeError(f"{label} looks like {found} but decodes as {handle.format}")
    rate = _verify_rate(handle.samplerate, label)
    if not 1 <= handle.channels <= MAX_CHANNELS:
        raise AudioDecodeError(f"{label} has {handle.channels} channels; at most {MAX_CHANNELS}")
    if handle.frames != _SF_UNKNOWN_FRAMES:
        _verify_duration(handle.frames, rate, max_seconds, label, exact=True)
    return rate


def _read_mono(handle: sf.SoundFile, found: str, max_seconds: float, label: str) -> np.ndarray:
    blocks, total = [], 0
    while True:
        try:
            block = handle.read(READ_BLOCK, dtype="float32", always_2d=True)  # [T, C]
        except _SF_ERRORS as error:
            raise AudioDecodeError(f"{label}: corrupt {found} data: {_describe(error)}") from error
        if not len(block):
            break
        if not np.isfinite(block).all():
            raise AudioDecodeError(f"{label} holds non-finite samples (NaN or infinity)")
        blocks.append(block.mean(axis=1, dtype=np.float64).astype(np.float32))  # [T]
        total += len(block)
        # the header may understate the length; stop decoding as soon as the limit is passed
        _verify_duration(total, handle.samplerate, max_seconds, label, exact=False)
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)  # [T]


def _verify_complete(handle: sf.SoundFile, decoded: int, rate: int, label: str) -> None:
    declared = handle.frames
    if declared != _SF_UNKNOWN_FRAMES and declared - decoded > TRUNCATION_SLACK * rate:
        raise AudioDecodeError(
            f"{label} is truncated: its header says {declared / rate:.2f} s "
            f"but only {decoded / rate:.2f} s could be decoded"
        )
    short = _SF_WAV_SHORT.search(handle.extra_info)
    if short and int(short[2]) < int(short[1]) < STREAMED_WAV_SIZE:
        raise AudioDecodeError(
            f"{label} is truncated: its data chunk declares {short[1]} bytes but holds {short[2]}"
        )


def _finish_waveform(samples: np.ndarray, rate: int, label: str) -> torch.Tensor:
    if samples.size == 0:
        raise AudioDecodeError(f"{label} holds no samples (zero-length audio)")
    waveform = _resample(torch.from_numpy(samples), rate)  # [T']
    if not torch.isfinite(waveform).all():  # float samples near 3e38 overflow the filter
        raise AudioDecodeError(f"{label} holds samples too large to resample")
    return waveform


def _resample(waveform: torch.Tensor, rate: int) -> torch.Tensor:
    if rate == SAMPLE_RATE:
        return waveform  # [T]
    source = rate
    if _resample_kernel_size(rate, SAMPLE_RATE) > MAX_RESAMPLE_KERNEL:
        # e.g. 44099 Hz would need a 2.8 GB kernel; a < 0.7 % pitch shift is harmless for speech
        source = round(rate / RATE_QUANTUM) * RATE_QUANTUM
        logger.warning("resampling %d Hz audio as %d Hz to bound the filter size", rate, source)
    return AF.resample(waveform, source, SAMPLE_RATE)  # [T']


def _resample_kernel_size(orig: int, new: int) -> int:
    """Elements of the sinc kernel `torchaudio.functional.resample` builds for orig -> new Hz."""
    gcd = math.gcd(orig, new)
    orig, new = orig // gcd, new // gcd
    width = math.ceil(LOWPASS_WIDTH * orig / (min(orig, new) * ROLLOFF))
    return new * (orig + 2 * width)


def _to_int16(waveform: torch.Tensor) -> np.ndarray:
    if waveform.dim() not in (1, 2):
        raise ValueError(f"expected a [T] or [C, T] waveform, got shape {tuple(waveform.shape)}")
    samples = waveform.detach().to(torch.float32).cpu().numpy()  # [T] or [C, T]
    if not np.isfinite(samples).all():
        raise ValueError("waveform holds non-finite samples (NaN or infinity)")
    return np.round(np.clip(samples, -1.0, 1.0) * (PCM16_SCALE - 1)).astype(np.int16)


def _describe(error: Exception) -> str:
    """libsndfile's own reason, without soundfile's 'Error opening <object at 0x...>' prefix."""
    return getattr(error, "error_string", None) or str(error)
