"""Turn detection for streamed microphone audio: silero-vad over 32 ms windows at 16 kHz.

`TurnDetector.feed` takes pcm16 chunks at the client's rate (24 kHz as OpenAI's Realtime API,
or 16 kHz), resamples them for the VAD and reports where speech starts and stops, in ms from
the first sample of the stream. Silero's own `VADIterator` applies the threshold and the
silence hangover; padding before speech is the caller's (it owns the audio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from silero_vad import VADIterator, load_silero_vad

VAD_RATE = 16000  # Hz, what silero-vad expects
VAD_WINDOW = 512  # samples at 16 kHz, 32 ms: silero-vad's window
PCM16_SCALE = 32768.0  # int16 full scale
PCM_BYTES = 2  # bytes per pcm16 sample
MS_PER_SECOND = 1000


@dataclass(frozen=True)
class VadSettings:
    """OpenAI's `server_vad` knobs."""

    threshold: float = 0.5  # speech probability that starts speech
    silence_duration_ms: int = 500  # ms of silence that end a turn
    prefix_padding_ms: int = 300  # ms of audio kept before the detected start


@dataclass(frozen=True)
class VadEvent:
    kind: Literal["start", "stop"]
    ms: int  # ms from the stream's first sample


def load_vad_model() -> torch.nn.Module:
    """Silero's JIT model from its wheel; each connection needs its own (it carries state)."""
    return load_silero_vad()


def pcm16_to_float(pcm16: bytes) -> np.ndarray:
    """Little-endian int16 bytes -> float32 samples [T] in [-1, 1]."""
    return np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / PCM16_SCALE  # [T]


class StreamResampler:
    """Linear resampling of a stream chunk by chunk, continuous across chunk edges.

    Good enough for a speech/silence decision, and keeps no filter state to get wrong.
    """

    def __init__(self, source_rate: int, target_rate: int = VAD_RATE) -> None:
        self.step = source_rate / target_rate  # source samples per output sample
        self.pending = np.zeros(0, dtype=np.float32)  # [T] unconsumed source samples
        self.offset = 0  # absolute index of pending[0]
        self.produced = 0  # output samples so far

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Source samples [T] -> the output samples [T'] they complete."""
        self.pending = np.concatenate([self.pending, samples])  # [T]
        last = self.offset + len(self.pending) - 1
        count = int(np.floor(last / self.step)) + 1 - self.produced
        if count <= 0:
            return np.zeros(0, dtype=np.float32)
        positions = (self.produced + np.arange(count)) * self.step - self.offset  # [T']
        src = np.arange(len(self.pending))
        out = np.interp(positions, src, self.pending).astype(np.float32)  # [T']
        self.produced += count
        keep = int(np.floor(positions[-1]))  # the sample left of the last position stays
        self.pending, self.offset = self.pending[keep:], self.offset + keep
        return out


class TurnDetector:
    """Speech start/stop events for one audio stream."""

    def __init__(
        self, model: torch.nn.Module, sample_rate: int, settings: VadSettings | None = None
    ) -> None:
        self.settings = settings or VadSettings()
        self.iterator = VADIterator(
            model,
            threshold=self.settings.threshold,
            sampling_rate=VAD_RATE,
            min_silence_duration_ms=self.settings.silence_duration_ms,
            speech_pad_ms=0,
        )
        self.resampler = StreamResampler(sample_rate)
        self.window = np.zeros(0, dtype=np.float32)  # [T] samples awaiting a full window
        self.speaking = False

    @property
    def position_ms(self) -> int:
        """How much audio the VAD has judged, in ms."""
        return self.iterator.current_sample * MS_PER_SECOND // VAD_RATE

    def feed(self, pcm16: bytes) -> list[VadEvent]:
        """Judge a chunk; return the starts and stops it completes."""
        self.window = np.concatenate([self.window, self.resampler.push(pcm16_to_float(pcm16))])
        events = []
        while len(self.window) >= VAD_WINDOW:
            chunk = torch.from_numpy(self.window[:VAD_WINDOW].copy())  # [512]
            self.window = self.window[VAD_WINDOW:]
            found = self.iterator(chunk)
            if found and "start" in found and not self.speaking:
                self.speaking = True
                events.append(VadEvent("start", int(found["start"]) * MS_PER_SECOND // VAD_RATE))
            elif found and "end" in found and self.speaking:
                self.speaking = False
                events.append(VadEvent("stop", self.position_ms))
        return events

    def reset(self) -> None:
        """Forget the speech state (after a buffer clear); time keeps counting."""
        position = self.iterator.current_sample
        self.iterator.reset_states()
        self.iterator.current_sample = position
        self.speaking = False


class PreSpeechBuffer:
    """The last moments of audio before speech was detected, to prepend as prefix padding."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.chunks: list[bytes] = []
        self.start_ms = 0.0  # stream time of chunks[0]
        self.end_ms = 0.0

    def append(self, pcm: bytes, keep_ms: float) -> None:
        self.chunks.append(pcm)
        self.end_ms += len(pcm) / PCM_BYTES * MS_PER_SECOND / self.rate
        while self.chunks and self.end_ms - self.start_ms > keep_ms + self._ms(self.chunks[0]):
            self.start_ms += self._ms(self.chunks.pop(0))

    def since(self, ms: float) -> bytes:
        """Audio from stream time `ms` on (as much as is kept)."""
        joined = b"".join(self.chunks)
        skip = max(0, int((ms - self.start_ms) * self.rate / MS_PER_SECOND)) * PCM_BYTES
        return joined[skip:]

    def skip(self, pcm: bytes) -> None:
        """Audio that went to the worker instead: advance time only."""
        self.chunks.clear()
        self.end_ms += self._ms(pcm)
        self.start_ms = self.end_ms

    def _ms(self, pcm: bytes) -> float:
        return len(pcm) / PCM_BYTES * MS_PER_SECOND / self.rate
