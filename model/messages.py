"""Chat messages in OpenAI's format, parsed into typed turns of text and audio parts.

Audio parts arrive as base64 bytes; they are decoded here once, hashed (the hash keys prefix
reuse in the server), and may later carry their encoder output instead of the waveform, so a
history can be re-prefilled without running the encoder again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from model.audio import decode_audio
from model.config import SAMPLE_RATE
from model.errors import MessageFormatError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
PCM_RATE = 16000  # Hz, assumed for bare "pcm16" parts that name no rate
AUDIO_HASH_DIGITS = 16  # hex digits of sha256 kept as an audio part's identity
TEXT_JOIN = "\n"  # between the parts of one message, as OpenAI-compatible servers do


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class AudioPart:
    """One spoken span: its waveform [T_wav] at 16 kHz and/or its encoder output [T, D_llm]."""

    digest: str
    duration: float  # seconds
    waveform: torch.Tensor | None = field(default=None, repr=False)
    embeddings: torch.Tensor | None = field(default=None, repr=False)

    def with_embeddings(self, embeddings: torch.Tensor) -> AudioPart:
        """The same span carrying its encoder output and no longer its samples."""
        return replace(self, embeddings=embeddings, waveform=None)


Part = TextPart | AudioPart


@dataclass(frozen=True)
class Turn:
    role: Role
    parts: tuple[Part, ...]

    @property
    def has_audio(self) -> bool:
        return any(isinstance(p, AudioPart) for p in self.parts)

    @property
    def text(self) -> str:
        """The text parts joined (audio parts contribute nothing)."""
        return TEXT_JOIN.join(p.text for p in self.parts if isinstance(p, TextPart))


def audio_part_from_waveform(waveform: torch.Tensor) -> AudioPart:
    """Wrap a decoded mono 16 kHz waveform [T_wav] as an audio part with its content hash."""
    wav = waveform.detach().to(torch.float32).cpu().contiguous()  # [T_wav]
    digest = hashlib.sha256(wav.numpy().tobytes()).hexdigest()[:AUDIO_HASH_DIGITS]
    return AudioPart(digest=digest, duration=wav.shape[0] / SAMPLE_RATE, waveform=wav)


def decode_audio_part(payload: Mapping[str, Any], max_seconds: float | None) -> AudioPart:
    """An OpenAI `input_audio` object (`data` base64, `format`) -> a decoded audio part."""
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), str):
        raise MessageFormatError("input_audio must be an object with a base64 string 'data'")
    fmt = payload.get("format")
    if fmt is not None and not isinstance(fmt, str):
        raise MessageFormatError("input_audio.format must be a string")
    try:
        raw = base64.b64decode(payload["data"], validate=True)
    except (binascii.Error, ValueError) as err:
        raise MessageFormatError(f"input_audio.data is not valid base64: {err}") from err
    rate = payload.get("sample_rate", PCM_RATE) if fmt == "pcm16" else None
    waveform = decode_audio(raw, fmt, pcm_rate=rate, max_seconds=max_seconds)  # [T_wav]
    return audio_part_from_waveform(waveform)


def parse_part(part: Any, max_seconds: float | None) -> Part:
    """One content part: a `text` or an `input_audio` object."""
    if not isinstance(part, Mapping) or "type" not in part:
        raise MessageFormatError("each content part must be an object with a 'type'")
    if part["type"] == "text":
        if not isinstance(part.get("text"), str):
            raise MessageFormatError("a text part needs a string 'text'")
        return TextPart(part["text"])
    if part["type"] == "input_audio":
        return decode_audio_part(part.get("input_audio"), max_seconds)
    raise MessageFormatError(
        f"unsupported content part type {part['type']!r}; use 'text' or 'input_audio'"
    )


def parse_message(message: Any, max_seconds: float | None = None) -> Turn:
    """One OpenAI chat message -> a typed turn; audio is allowed in user turns only."""
    if isinstance(message, Turn):
        return message
    if not isinstance(message, Mapping):
        raise MessageFormatError("each message must be an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise MessageFormatError(f"message role must be one of {ROLES}, got {role!r}")
    if isinstance(content, str):
        parts: tuple[Part, ...] = (TextPart(content),)
    elif isinstance(content, list) and content:
        parts = tuple(parse_part(p, max_seconds) for p in content)
    else:
        raise MessageFormatError("message content must be a string or a non-empty list of parts")
    turn = Turn(role=role, parts=parts)
    if turn.has_audio and role != "user":
        raise MessageFormatError(f"audio parts are accepted in user messages only, not {role!r}")
    return turn


def parse_messages(messages: Iterable[Any], max_seconds: float | None = None) -> list[Turn]:
    """A whole conversation; it must hold at least one message."""
    if isinstance(messages, (str, bytes, Mapping)):
        raise MessageFormatError("messages must be a list of message objects")
    turns = [parse_message(m, max_seconds) for m in messages]
    if not turns:
        raise MessageFormatError("messages must not be empty")
    return turns
