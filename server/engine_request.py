"""One request inside the engine: its prompt's positions, its row, its tokens and its events.

A prompt is planned once: the chat template renders the turns (`model.prompt.render_prompt`), and
every position gets an identity (a token id, or an audio digest and index) so that the engine can
find how much of it a cached KV already holds, whatever the template does to earlier turns.

Dims: T positions, D LLM width, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from model.decoding import SamplingParams, StopStreamer, select_tokens
from model.errors import MessageFormatError, SpeechChatModelError
from model.messages import Turn
from model.prompt import AudioSpan, Segment, prompt_length, render_prompt
from server.kv_cache import PositionKey
from server.protocol import ErrorEvent, Event, Finished, FinishReason, TextDelta, Usage


@dataclass(frozen=True)
class PromptPlan:
    """A rendered prompt: its segments and one identity per position."""

    segments: list[Segment]
    keys: list[PositionKey]


def plan_prompt(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn]) -> PromptPlan:
    """Render turns (audio already encoded) with a generation prompt; key every position."""
    segments = render_prompt(tokenizer, turns, add_generation_prompt=True)
    keys: list[PositionKey] = []
    for seg in segments:
        if isinstance(seg, AudioSpan):
            if seg.part.embeddings is None:
                raise MessageFormatError("an audio part reached the engine without embeddings")
            digest = seg.part.digest
            keys.extend((digest, i) for i in range(seg.part.embeddings.shape[0]))
        else:
            keys.extend(seg)
    return PromptPlan(segments, keys)


def plan_heard(tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn]) -> PromptPlan:
    """The plan of turns whose last one is speech still arriving, cut after its audio: the
    positions a streamed turn shares with its final prompt, whatever text closes it."""
    plan = plan_prompt(tokenizer, turns)
    last = max(i for i, s in enumerate(plan.segments) if isinstance(s, AudioSpan))
    segments = plan.segments[: last + 1]
    length = prompt_length(segments, lambda part: part.embeddings.shape[0])
    return PromptPlan(segments, plan.keys[:length])


def embed_from(
    plan: PromptPlan, start: int, embed_tokens: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The input embeddings of positions [start:] of a planned prompt -> [T_new, D]."""
    chunks, offset = [], 0
    for seg in plan.segments:
        if isinstance(seg, AudioSpan):
            emb = seg.part.embeddings  # [T_audio, D]
            n = emb.shape[0]
        else:
            n = len(seg)
        if offset + n > start:
            lo = max(0, start - offset)
            if isinstance(seg, AudioSpan):
                chunks.append(emb[lo:])  # [T_audio - lo, D]
            else:
                ids = torch.tensor(seg[lo:], dtype=torch.long)  # [T_text - lo]
                chunks.append(embed_tokens(ids))  # [T_text - lo, D]
        offset += n
    ref = embed_tokens(torch.zeros(1, dtype=torch.long))  # [1, D], the LLM's device and dtype
    width = ref.shape[-1]
    for chunk in chunks:
        if chunk.ndim != 2 or chunk.shape[1] != width:
            raise MessageFormatError(
                f"audio embeddings have shape {tuple(chunk.shape)}; the LLM expects [T, {width}]"
            )
    return torch.cat([c.to(ref.device, ref.dtype) for c in chunks])  # [T_new, D]


EmitFn = Callable[[Event], None]
DoneFn = Callable[[str, FinishReason], None]


@dataclass(eq=False)
class EngineRequest:
    """A response in progress; mutated by the engine thread only."""

    request_id: str
    params: SamplingParams
    plan: PromptPlan
    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]
    emit: EmitFn
    session_key: str | None = None  # the store key of a session's cache, None when stateless
    on_done: DoneFn | None = None  # gets the reply text when a stateful reply ends
    prefill_only: bool = False  # keep the prompt's KV under `session_key`, answer nothing
    # filled in by the engine
    generator: torch.Generator | None = None
    row: int = -1
    row_keys: list[PositionKey] = field(default_factory=list)  # identities of the row's KV
    cached_tokens: int = 0
    supersedes: str | None = None  # a stateless entry the reply's cache will contain whole
    pending: torch.Tensor | None = None  # [T_new, D] prompt embeddings still to prefill
    cursor: int = 0  # next index into `pending`
    next_token: int = -1  # sampled, not yet fed
    completion_tokens: int = 0
    finished: bool = False
    streamer: StopStreamer = field(init=False)
    created: float = field(default_factory=time.perf_counter)  # s, perf_counter
    first_token_at: float | None = None  # when the first token was sampled (perf_counter)

    def __post_init__(self) -> None:
        self.streamer = StopStreamer(self.tokenizer, self.params.stop)

    @property
    def prompt_tokens(self) -> int:
        return len(self.plan.keys)

    @property
    def prefill_left(self) -> int:
        return 0 if self.pending is None else self.pending.shape[0] - self.cursor

    def advance(self, q_len: int) -> None:
        """The next `q_len` prompt positions are in the row's cache now."""
        start = len(self.row_keys)
        self.row_keys.extend(self.plan.keys[start : start + q_len])
        self.cursor += q_len

    def next_chunk(self, q_len: int) -> torch.Tensor:
        """The next `q_len` prompt embeddings still to prefill -> [Q, D]."""
        assert self.pending is not None
        return self.pending[self.cursor : self.cursor + q_len]

    @property
    def reply_text(self) -> str:
        return self.streamer.text

    def accept_token(self, token: int) -> FinishReason | None:
        """A sampled token: emit the text it completes; say why the reply ends, if it does."""
        if token in self.eos_ids:
            return "stop"
        self.completion_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.next_token = token
        self._send(self.streamer.push(token))
        if self.streamer.stopped:
            return "stop"
        if self.completion_tokens >= self.params.max_new_tokens:
            return "length"
        return None

    def _send(self, text: str) -> None:
        if text:
            self.emit(TextDelta(self.request_id, text))

    def finish(self, reason: FinishReason) -> None:
        """Flush held-back text, tell the session, then send Usage and Finished."""
        if self.finished:
            return
        self.finished = True
        self._send(self.streamer.flush())
        if self.on_done is not None:
            self.on_done(self.reply_text, reason)
        first = None if self.first_token_at is None else self.first_token_at - self.created
        usage = Usage(
            self.request_id, self.prompt_tokens, self.completion_tokens, self.cached_tokens, first
        )
        self.emit(usage)
        self.emit(Finished(self.request_id, reason))

    def fail(self, error: BaseException) -> None:
        """End with an error event for this request alone."""
        if self.finished:
            return
        self.finished = True
        known = isinstance(error, SpeechChatModelError)
        code = type(error).__name__ if known else "internal_error"
        self.emit(ErrorEvent(self.request_id, code, str(error)))
        self.emit(Finished(self.request_id, "error"))


def sample_rows(reqs: Sequence[EngineRequest], logits: torch.Tensor) -> list[int]:
    """One token per row of logits [B, V]: greedy rows share one argmax, sampling rows use
    their own settings and generator."""
    tokens = logits.argmax(dim=-1).tolist()  # [B]
    for i, req in enumerate(reqs):
        if req.params.temperature > 0.0:
            tokens[i] = int(select_tokens(logits[i : i + 1], req.params, req.generator)[0])
    return tokens
