"""OpenAI Realtime (GA) event shapes for the text-output subset, and `session.update` parsing.

Field names follow the openai SDK's `types/realtime` models, so `client.realtime.connect()`
parses every event this server sends into its typed classes.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from server.protocol import Usage
from server.vad import PCM_BYTES, VadSettings

OPENAI_RATE = 24000  # Hz, OpenAI's audio/pcm rate
ACCEPTED_RATES = (24000, 16000)  # Hz; 16 kHz is this server's extension
PCM_TYPE = "audio/pcm"
INFINITE_TOKENS = "inf"


class ProtocolError(Exception):
    """A client event this server cannot apply; answered with an `error` event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class RealtimeConfig:
    """The effective session configuration, as `session.created`/`session.updated` show it."""

    instructions: str = ""
    rate: int = OPENAI_RATE  # Hz of input pcm16
    vad: VadSettings | None = VadSettings()  # None: the client commits turns itself
    create_response: bool = True
    interrupt_response: bool = True
    max_output_tokens: int | None = None  # None: "inf" (the server's limit)


def _merge_turn_detection(config: RealtimeConfig, value: Any) -> RealtimeConfig:
    if value is None:
        return dataclasses.replace(config, vad=None)
    if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
        raise ProtocolError(
            "invalid_value",
            "turn_detection must be null or {'type': 'server_vad', ...}",
            "session.audio.input.turn_detection",
        )
    vad = config.vad or VadSettings()
    try:
        vad = VadSettings(
            threshold=float(value.get("threshold", vad.threshold)),
            silence_duration_ms=int(value.get("silence_duration_ms", vad.silence_duration_ms)),
            prefix_padding_ms=int(value.get("prefix_padding_ms", vad.prefix_padding_ms)),
        )
    except (TypeError, ValueError) as error:
        raise ProtocolError(
            "invalid_value", f"turn_detection: {error}", "session.audio.input.turn_detection"
        ) from error
    if not 0.0 < vad.threshold < 1.0 or vad.silence_duration_ms < 0 or vad.prefix_padding_ms < 0:
        raise ProtocolError(
            "invalid_value",
            "turn_detection needs 0 < threshold < 1 and non-negative durations",
            "session.audio.input.turn_detection",
        )
    return dataclasses.replace(
        config,
        vad=vad,
        create_response=bool(value.get("create_response", True)),
        interrupt_response=bool(value.get("interrupt_response", True)),
    )


def _merge_format(config: RealtimeConfig, value: Any) -> RealtimeConfig:
    if not isinstance(value, dict) or value.get("type", PCM_TYPE) != PCM_TYPE:
        raise ProtocolError(
            "unsupported_audio_format",
            f"only {PCM_TYPE} input is supported (pcm16 mono at 24000 or 16000 Hz)",
            "session.audio.input.format",
        )
    rate = value.get("rate", OPENAI_RATE)
    if rate not in ACCEPTED_RATES:
        raise ProtocolError(
            "unsupported_audio_format",
            f"audio/pcm rate must be one of {ACCEPTED_RATES}, got {rate!r}",
            "session.audio.input.format.rate",
        )
    return dataclasses.replace(config, rate=rate)


def merge_session_update(config: RealtimeConfig, session: Any) -> RealtimeConfig:
    """Apply a `session.update`'s `session` object; fields not given keep their values."""
    if not isinstance(session, dict):
        raise ProtocolError("invalid_value", "session.update needs a 'session' object", "session")
    if session.get("type", "realtime") != "realtime":
        raise ProtocolError(
            "unsupported_session_type", "only 'realtime' sessions are served", "session.type"
        )
    if "instructions" in session:
        if not isinstance(session["instructions"], str):
            raise ProtocolError("invalid_value", "instructions must be a string", "instructions")
        config = dataclasses.replace(config, instructions=session["instructions"])
    if "max_output_tokens" in session:
        limit = session["max_output_tokens"]
        if limit not in (INFINITE_TOKENS, None) and (not isinstance(limit, int) or limit < 1):
            raise ProtocolError(
                "invalid_value",
                "max_output_tokens must be a positive integer or 'inf'",
                "session.max_output_tokens",
            )
        config = dataclasses.replace(
            config, max_output_tokens=None if limit in (INFINITE_TOKENS, None) else limit
        )
    audio_input = (session.get("audio") or {}).get("input") or {}
    if "format" in audio_input:
        config = _merge_format(config, audio_input["format"])
    if "turn_detection" in audio_input:
        config = _merge_turn_detection(config, audio_input["turn_detection"])
    return config


def session_object(config: RealtimeConfig, session_id: str, model: str) -> dict[str, Any]:
    vad = config.vad
    turn_detection = None
    if vad is not None:
        turn_detection = {
            "type": "server_vad",
            "threshold": vad.threshold,
            "silence_duration_ms": vad.silence_duration_ms,
            "prefix_padding_ms": vad.prefix_padding_ms,
            "create_response": config.create_response,
            "interrupt_response": config.interrupt_response,
        }
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["text"],
        "instructions": config.instructions,
        "audio": {
            "input": {
                "format": {"type": PCM_TYPE, "rate": config.rate},
                "turn_detection": turn_detection,
                "transcription": None,
                "noise_reduction": None,
            }
        },
        "max_output_tokens": config.max_output_tokens or INFINITE_TOKENS,
        "tools": [],
        "tool_choice": "auto",
    }


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": new_id("event"), **fields}


def error_event(
    code: str,
    message: str,
    param: str | None = None,
    event_id: str | None = None,
    kind: str = "invalid_request_error",
) -> dict[str, Any]:
    error = {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}
    return event("error", error=error)


def user_item(item_id: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "user",
        "status": "completed",
        "content": content,
    }


def assistant_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text}]
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def usage_object(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "input_token_details": {"cached_tokens": usage.cached_tokens},
        "output_token_details": {"text_tokens": usage.completion_tokens, "audio_tokens": 0},
    }


def response_object(
    response_id: str,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    reason: str | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    details = None
    if status != "in_progress":
        kind = {"completed": "completed", "cancelled": "cancelled", "incomplete": "incomplete"}
        details = {"type": kind.get(status, "failed"), "reason": reason, "error": error}
    return {
        "id": response_id,
        "object": "realtime.response",
        "status": status,
        "status_details": details,
        "output": output,
        "output_modalities": ["text"],
        "conversation_id": None,
        "usage": usage_object(usage),
    }


def decode_pcm(audio: Any) -> bytes:
    """`input_audio_buffer.append`'s base64 pcm16 -> bytes (whole int16 samples)."""
    if not isinstance(audio, str):
        raise ProtocolError("invalid_value", "append needs 'audio': base64 pcm16", "audio")
    try:
        pcm = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ProtocolError(
            "invalid_base64", f"audio is not valid base64: {error}", "audio"
        ) from error
    if len(pcm) % PCM_BYTES:
        raise ProtocolError("invalid_audio", "pcm16 audio must hold whole 2-byte samples", "audio")
    return pcm


def item_to_message(item: Any, rate: int) -> dict[str, Any]:
    """A `conversation.item.create` message item -> an OpenAI chat message for the worker."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise ProtocolError("invalid_value", "only 'message' items are supported", "item.type")
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        raise ProtocolError(
            "invalid_value", "item.role must be user, assistant or system", "item.role"
        )
    parts = []
    for part in item.get("content") or []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_audio" and isinstance(part.get("audio"), str):
            audio = {"data": part["audio"], "format": "pcm16", "sample_rate": rate}
            parts.append({"type": "input_audio", "input_audio": audio})
        else:
            raise ProtocolError(
                "invalid_value", f"unsupported content part {kind!r}", "item.content"
            )
    if not parts:
        raise ProtocolError("invalid_value", "item.content must not be empty", "item.content")
    return {"role": role, "content": parts}
