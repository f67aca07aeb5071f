"""Request and response bodies in OpenAI's shapes (Chat Completions, models) plus sessions.

Messages are validated here for the OpenAPI schema and clear 422s, then passed on to the worker
as plain OpenAI-format dicts; audio bytes are decoded by the worker, never here.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_STOP_SEQUENCES = 4  # as OpenAI


# -- requests ----------------------------------------------------------------------------------


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class InputAudio(BaseModel):
    data: str = Field(description="base64 audio bytes")
    format: str | None = Field(
        None, description="wav, flac, ogg, mp3 or pcm16; omitted: recognised from the bytes"
    )
    sample_rate: int | None = Field(
        None, description="Hz of pcm16 data (an extension; OpenAI's pcm16 is 24000 Hz)"
    )


class AudioContentPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextContentPart | AudioContentPart, Field(discriminator="type")]
Content = str | list[ContentPart]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Content
    name: str | None = None

    def to_worker(self) -> dict[str, Any]:
        """The OpenAI-format dict the worker parses (`developer` is a system message)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": dump_content(self.content)}


def dump_content(content: Content) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [part.model_dump(exclude_none=True) for part in content]


def content_has_audio(content: Content | None) -> bool:
    return isinstance(content, list) and any(isinstance(p, AudioContentPart) for p in content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The generation settings Chat Completions and session turns share."""

    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_sequences(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class ChatCompletionRequest(SamplingFields):
    model: str = Field(description="any id; the server answers with the model it serves")
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=1, description="only one choice is generated")
    user: str | None = None


class SessionCreateRequest(BaseModel):
    system_prompt: str | None = Field(
        None, description="replaces the model's default system prompt"
    )


class TurnRequest(SamplingFields):
    """A user turn for a session: `content` as in a chat message, or `text` and/or `audio`."""

    content: Content | None = None
    text: str | None = None
    audio: InputAudio | None = None

    def to_content(self) -> Content | None:
        if self.content is not None:
            return self.content
        parts: list[ContentPart] = []
        if self.audio is not None:
            parts.append(AudioContentPart(type="input_audio", input_audio=self.audio))
        if self.text:
            parts.append(TextContentPart(type="text", text=self.text))
        return parts or None


# -- responses ---------------------------------------------------------------------------------


def now_seconds() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_seconds)
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None
    session_id: str | None = Field(None, description="set on session turns")


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "speechchat"
    input_modalities: list[str] = Field(description="'text', plus 'audio' with an encoder loaded")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HistoryPart(BaseModel):
    type: Literal["text", "input_audio"]
    text: str | None = None
    duration_seconds: float | None = Field(None, description="length of an audio part")


class HistoryMessage(BaseModel):
    role: str
    content: list[HistoryPart]


class SessionObject(BaseModel):
    id: str
    object: Literal["session"] = "session"
    created: int
    system_prompt: str | None = None
    messages: list[HistoryMessage] = Field(default_factory=list)


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class HealthStatus(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    model: str | None = None
    audio: bool | None = Field(None, description="an audio encoder is loaded")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries: each status answers with OpenAI's error shape."""
    return {status: {"model": ErrorBody} for status in statuses}
