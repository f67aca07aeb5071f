"""Prompt assembly: mixed text and audio turns rendered with the LLM's own chat template.

Each audio part becomes a unique marker string inside its message; the template renders the
conversation as usual; the rendered text is split at the markers and each text run is tokenized,
each marker replaced by that part's encoder embeddings. A text-only conversation is tokenized in
one piece, so its ids equal `tokenizer.apply_chat_template`'s exactly.

Dims: T prompt positions, D LLM width.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jinja2.exceptions import TemplateError
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from model.errors import MessageFormatError
from model.messages import TEXT_JOIN, AudioPart, TextPart, Turn

AUDIO_MARKER = "<|speechchat_audio_{}|>"
_MARKER_RE = re.compile(r"<\|speechchat_audio_(\d+)\|>")


@dataclass(frozen=True)
class AudioSpan:
    """An audio part's place in a prompt: its embeddings fill these positions."""

    part: AudioPart


Segment = list[int] | AudioSpan


def _message_dicts(turns: Sequence[Turn]) -> tuple[list[dict[str, str]], list[AudioPart]]:
    """Turns -> template-ready dicts with a marker where each audio part goes, and the parts."""
    audio: list[AudioPart] = []
    messages = []
    for turn in turns:
        pieces = []
        for part in turn.parts:
            if isinstance(part, TextPart):
                pieces.append(part.text)
            else:
                pieces.append(AUDIO_MARKER.format(len(audio)))
                audio.append(part)
        messages.append({"role": turn.role, "content": TEXT_JOIN.join(pieces)})
    return messages, audio


def with_system_prompt(turns: Sequence[Turn], system_prompt: str | None) -> list[Turn]:
    """Prepend a system turn unless the conversation already starts with one."""
    turns = list(turns)
    if system_prompt is None or (turns and turns[0].role == "system"):
        return turns
    return [Turn("system", (TextPart(system_prompt),)), *turns]


def render_text(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], add_generation_prompt: bool = True
) -> tuple[str, list[AudioPart]]:
    """The chat template's rendering, with audio markers in it, and the audio parts in order."""
    messages, audio = _message_dicts(turns)
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as err:  # e.g. Llama-2's "roles must alternate"
        raise MessageFormatError(
            f"the LLM's chat template rejects this conversation: {err}"
        ) from err
    return text, audio


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, turns: Sequence[Turn], add_generation_prompt: bool = True
) -> list[Segment]:
    """Turns -> token-id runs and audio spans in prompt order."""
    text, audio = render_text(tokenizer, turns, add_generation_prompt)
    segments: list[Segment] = []
    cursor = 0
    for match in _MARKER_RE.finditer(text):
        # a word's leading space belongs to the word: the audio span stands for it
        segments.append(tokenize(tokenizer, text[cursor : match.start()].rstrip(" ")))
        segments.append(AudioSpan(audio[int(match.group(1))]))
        cursor = match.end()
    segments.append(tokenize(tokenizer, text[cursor:]))
    return [s for s in segments if isinstance(s, AudioSpan) or s]


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Rendered template text -> ids; specials are in the text already, so none are added."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def response_ids(tokenizer: PreTrainedTokenizerBase, text: str, eos_id: int) -> list[int]:
    """An assistant answer as the ids the LLM would emit for it, ending with its end-of-turn id."""
    return [*tokenize(tokenizer, text), eos_id]


def prompt_length(segments: Sequence[Segment], encoded: Callable[[AudioPart], int]) -> int:
    """Positions a prompt takes: its tokens plus each span's embedding count."""
    return sum(encoded(s.part) if isinstance(s, AudioSpan) else len(s) for s in segments)


def embed_segments(
    segments: Sequence[Segment],
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    encode_audio: Callable[[AudioPart], torch.Tensor],
) -> torch.Tensor:
    """Segments -> the LLM's input embeddings [T, D]; audio spans come from `encode_audio`."""
    chunks = []
    for seg in segments:
        if isinstance(seg, AudioSpan):
            chunks.append(encode_audio(seg.part))  # [T_audio, D]
        else:
            ids = torch.tensor(seg, dtype=torch.long)  # [T_text]
            chunks.append(embed_tokens(ids))  # [T_text, D]
    pairs = zip(chunks, segments, strict=True)
    ref = next((c for c, s in pairs if not isinstance(s, AudioSpan)), chunks[0])
    device, dtype = ref.device, ref.dtype  # the LLM's, taken from a token chunk
    return torch.cat([c.to(device, dtype) for c in chunks])  # [T, D]


def text_only_ids(segments: Sequence[Segment]) -> list[int] | None:
    """The prompt's token ids when it holds no audio, else None."""
    if any(isinstance(s, AudioSpan) for s in segments):
        return None
    return [i for s in segments for i in s]  # type: ignore[union-attr]
