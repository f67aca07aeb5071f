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

An encoder that hears whole turns only (`window_safe` False: whisper_decoder, whose decoder
mishears a word cut at a window edge) gets a draft instead: once `DRAFT_PAUSE` seconds of
pushed chunks are quiet after speech (each under `QUIET_RMS`, about -40 dBFS), everything up to
the last loud chunk is encoded in the background (`Draft`, keyed by the stream and its length)
and prefilled. A commit whose audio since then is all quiet takes the draft, so the encoding
overlaps the silence a voice-activity detector waits for before it ends the turn; any louder
audio after it means the whole turn is encoded at the commit.

Dims: T_wav samples, T embeddings, D LLM width.
"""

from __future__ import annotations

import uuid
from asyncio import Task
from collections import OrderedDict
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
QUIET_RMS = 0.01  # a pushed chunk under this RMS (of full scale 1) is quiet
DRAFT_PAUSE = 0.2  # s of quiet after speech that make a pause (gaps between words are shorter)
MIN_COMMIT_SECONDS = 0.05  # s, the shortest audio turn accepted
ENCODED_AUDIO_BYTES = 64 << 20  # encoder outputs kept by audio digest (about 1,400 turns)
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


@dataclass
class Draft:
    """A whole-turn encoding of a stream's first `end` samples, made at a pause."""

    key: str  # the identity of its embeddings
    end: int  # samples
    embeddings: Future[torch.Tensor]  # [T, D]


class AudioStream:
    """Samples pushed so far, the windows already sent to the encoder (or the draft of a
    whole-turn encoding), and the rest."""

    def __init__(self, window_s: float) -> None:
        self.key = f"stream-{uuid.uuid4().hex}"  # the identity of its embeddings
        self.window = int(window_s * SAMPLE_RATE)  # samples; 0: no background encoding
        self.tail = int(STREAM_MIN_TAIL * SAMPLE_RATE)  # samples
        self.samples = 0  # pushed so far
        self.pending: list[torch.Tensor] = []  # samples not yet sent to the encoder
        self.pending_len = 0
        self.windows: Windows = []  # sent to the encoder, in order
        self.loud_end = 0  # samples up to the end of the last chunk louder than QUIET_RMS
        self.draft: Draft | None = None

    def push(self, wav: torch.Tensor) -> list[torch.Tensor]:
        """Add samples [T_wav]; return the whole windows now ready for background encoding."""
        self.samples += wav.shape[0]
        self.pending.append(wav)
        self.pending_len += wav.shape[0]
        if wav.numel() and float(wav.square().mean().sqrt()) >= QUIET_RMS:
            self.loud_end = self.samples
        ready = []
        while self.window and self.pending_len >= self.window + self.tail:
            flat = torch.cat(self.pending)  # [T_wav]
            ready.append(flat[: self.window])
            self.pending, self.pending_len = [flat[self.window :]], flat.shape[0] - self.window
        return ready

    def wants_draft(self) -> bool:
        """Whether to draft now: whole turns only, a pause after speech no draft covers yet,
        and no draft still being encoded."""
        paused = self.samples - self.loud_end >= DRAFT_PAUSE * SAMPLE_RATE
        if self.window or not paused or self.loud_end == 0:
            return False
        draft = self.draft
        return draft is None or (draft.end < self.loud_end and draft.embeddings.done())

    def speech(self) -> torch.Tensor:
        """The samples up to the end of the last loud chunk -> [T_wav] (whole turns only)."""
        return torch.cat(self.pending)[: self.loud_end]

    def usable_draft(self) -> Draft | None:
        """The draft, if nothing louder than a pause came after what it holds."""
        draft = self.draft
        return draft if draft is not None and draft.end == self.loud_end else None

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


class EncodedAudio:
    """Encoder outputs by audio digest, least recently used dropped past `budget_bytes`: a
    stateless request repeats the conversation so far (the OpenAI chat pattern), and its audio
    turns need not be encoded again (the KV prefix they lead to is reused by the engine)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, digest: str) -> torch.Tensor | None:
        emb = self.entries.get(digest)
        if emb is not None:
            self.entries.move_to_end(digest)
        return emb

    def put(self, digest: str, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if digest in self.entries or size > self.budget_bytes:
            return
        self.entries[digest] = emb
        self.used_bytes += size
        while self.used_bytes > self.budget_bytes:
            _, old = self.entries.popitem(last=False)
            self.used_bytes -= old.numel() * old.element_size()


def new_session(system_prompt: str | None, window_s: float) -> Session:
    turns = [Turn("system", (TextPart(system_prompt),))] if system_prompt is not None else []
    return Session(uuid.uuid4().hex, turns, AudioStream(window_s))


def check_commit_length(samples: int) -> None:
    if samples < MIN_COMMIT_SECONDS * SAMPLE_RATE:
        raise AudioDecodeError(
            f"the audio buffer holds {samples / SAMPLE_RATE:.3f} s; "
            f"a turn needs at least {MIN_COMMIT_SECONDS} s"
        )
