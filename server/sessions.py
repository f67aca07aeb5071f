"""Sessions held by the worker: their history, and the audio they are streaming in.

History keeps audio as encoder outputs only (`AudioPart.with_embeddings`), so rebuilding an
evicted KV cache never runs the encoder again.

Streaming audio: the encoders are full-context, so a stream is cut into windows of
`window_s` seconds that are encoded in the background while the user still speaks; at commit
only the remainder (under `window_s + STREAM_MIN_TAIL` seconds) is encoded, so the time from end
of speech to prompt stays near one window's encoding. The price: no window sees the audio of
its neighbours (and each is normalised on its own), which moves its embeddings slightly away
from a whole-utterance encoding (shipped encoder, 60 held-out utterances of 4.5 s or more:
reference-response perplexity 3.77 against 3.66 whole); `window_s = 0` encodes everything at
commit instead. The worker also prefills encoded windows into the session's KV cache before
the commit, so a stream's positions are keyed by the stream (`AudioStream.key`), not by the
samples' hash: they stand for windowed embeddings, which a whole encoding would not match.

Dims: T_wav samples, T embeddings, D LLM width.
"""

from __future__ import annotations

import uuid
from asyncio import Task
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
import torchaudio

from model.audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE
from model.config import SAMPLE_RATE
from model.errors import AudioDecodeError
from model.messages import AudioPart, TextPart, Turn
from server.kv_cache import SESSION_PREFIX
from server.protocol import TurnInfo

STREAM_WINDOW = 3.0  # s of streamed audio encoded per background window
STREAM_MIN_TAIL = 1.0  # s always left for the commit, so the last window is never a sliver
MIN_COMMIT_SECONDS = 0.05  # s, the shortest audio turn accepted
PCM16_SCALE = 32768.0  # int16 full scale
Windows = list[Future[torch.Tensor]]  # encoder outputs [T, D] of a stream's windows


def decode_pcm16(pcm16: bytes, sample_rate: int) -> torch.Tensor:
    """Mono little-endian int16 bytes at `sample_rate` -> a 16 kHz float waveform [T_wav]."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioDecodeError(
            f"sample_rate must be in [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz, got {sample_rate}"
        )
    if len(pcm16) % 2:
        raise AudioDecodeError("pcm16 audio must hold a whole number of 2-byte samples")
    samples = np.frombuffer(pcm16, dtype="<i2").astype(np.float32) / PCM16_SCALE
    wav = torch.from_numpy(samples)  # [T_wav]
    if sample_rate != SAMPLE_RATE:
        wav = torchaudio.functional.resample(wav, sample_rate, SAMPLE_RATE)  # [T_wav']
    return wav


class AudioStream:
    """Samples pushed so far, the windows already sent to the encoder, and the rest."""

    def __init__(self, window_s: float) -> None:
        self.key = f"stream-{uuid.uuid4().hex}"  # the identity of its embeddings
        self.window = int(window_s * SAMPLE_RATE)  # samples; 0: no background encoding
        self.tail = int(STREAM_MIN_TAIL * SAMPLE_RATE)  # samples
        self.samples = 0  # pushed so far
        self.pending: list[torch.Tensor] = []  # samples not yet sent to the encoder
        self.pending_len = 0
        self.windows: Windows = []  # sent to the encoder, in order

    def push(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """Add samples [T_wav]; return the whole windows now ready for background encoding."""
        self.samples += wav.shape[0]
        self.pending.append(wav)
        self.pending_len += wav.shape[0]
        ready = []
        while self.window and self.pending_len >= self.window + self.tail:
            flat = torch.cat(self.pending)  # [T_wav]
            ready.append(flat[: self.window])
            self.pending, self.pending_len = [flat[self.window :]], flat.shape[0] - self.window
        return ready

    def take_rest(self) -> torch.Tensor:
        """The samples no window holds -> [T_wav]."""
        rest = torch.cat(self.pending) if self.pending else torch.zeros(0)  # [T_wav]
        self.pending, self.pending_len = [], 0
        return rest

    @property
    def window_seconds(self) -> float:
        return self.window / SAMPLE_RATE

    def whole(self) -> AudioPart:
        """The pushed audio as a part keyed by the stream, waiting for its embeddings."""
        return AudioPart(self.key, duration=self.samples / SAMPLE_RATE)


@dataclass
class Session:
    """One conversation: its turns (audio as embeddings) and its live audio stream."""

    session_id: str
    turns: list[Turn]
    stream: AudioStream
    active_request: str | None = None
    prefill: Task[None] | None = None  # the latest prefill of streamed audio, done or not
    prefill_request: str | None = None  # its engine request while one runs
    audio_seconds: float = 0.0
    closed: bool = False

    @property
    def store_key(self) -> str:
        return f"{SESSION_PREFIX}{self.session_id}"

    def reset_stream(self, window_s: float) -> None:
        self.stream = AudioStream(window_s)

    def info(self) -> list[TurnInfo]:
        """The history as the API shows it."""
        return [
            TurnInfo(
                role=t.role,
                text=t.text,
                audio_seconds=[p.duration for p in t.parts if isinstance(p, AudioPart)],
            )
            for t in self.turns
        ]

    def append_reply(self, text: str) -> None:
        if text:
            self.turns.append(Turn("assistant", (TextPart(text),)))


def new_session(system_prompt: str | None, window_s: float) -> Session:
    turns = [Turn("system", (TextPart(system_prompt),))] if system_prompt is not None else []
    return Session(uuid.uuid4().hex, turns, AudioStream(window_s))


def check_commit_length(samples: int) -> None:
    if samples < MIN_COMMIT_SECONDS * SAMPLE_RATE:
        raise AudioDecodeError(
            f"the audio buffer holds {samples / SAMPLE_RATE:.3f} s; "
            f"a turn needs at least {MIN_COMMIT_SECONDS} s"
        )
