"""Prompt assembly: text-only ids equal apply_chat_template; audio goes where text would."""

from __future__ import annotations

import base64

import pytest
import torch

from model.errors import MessageFormatError
from model.messages import AudioPart, TextPart, Turn, parse_messages
from model.prompt import (
    AudioSpan,
    embed_segments,
    render_prompt,
    render_text,
    text_only_ids,
    tokenize,
)

SILENCE_PART = {
    "type": "input_audio",
    "input_audio": {"data": base64.b64encode(bytes(3200)).decode(), "format": "pcm16"},
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": [{"type": "text", "text": "Another one, please."}]},
    ],
]


def audio_part(n: int, dim: int, seed: int = 0) -> AudioPart:
    gen = torch.Generator().manual_seed(seed)
    return AudioPart(
        digest=f"d{seed}", duration=n * 0.08, embeddings=torch.randn(n, dim, generator=gen)
    )


@pytest.fixture(params=["chatml", "llama2"])
def tokenizer(request, tiny_llm_dir, tiny_llama2_dir):
    from transformers import AutoTokenizer

    path = tiny_llm_dir if request.param == "chatml" else tiny_llama2_dir
    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_text_only_ids_equal_apply_chat_template(tokenizer, messages, generation_prompt):
    turns = parse_messages(messages)
    segments = render_prompt(tokenizer, turns, add_generation_prompt=generation_prompt)
    # templates take string content; a one-part list is the same message
    flat = [{**m, "content": turn.text} for m, turn in zip(messages, turns, strict=True)]
    expected = tokenizer.apply_chat_template(
        flat, tokenize=True, add_generation_prompt=generation_prompt
    )
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert text_only_ids(segments) == list(expected)


def test_audio_sits_where_the_turns_text_would(tokenizer):
    """Rendering 'X' as text and as audio gives the same tokens around the span."""
    spoken = Turn("user", (audio_part(7, 16),))
    typed = Turn("user", (TextPart("X"),))
    with_audio = render_prompt(tokenizer, [spoken])
    with_text = text_only_ids(render_prompt(tokenizer, [typed]))
    assert [type(s) for s in with_audio] == [list, AudioSpan, list]
    before, span, after = with_audio
    prefix, suffix = render_text(tokenizer, [typed])[0].split("X")
    # the span replaces the word and its leading space ("[INST] X" -> "[INST]" + audio)
    assert before == tokenize(tokenizer, prefix.rstrip(" "))
    assert after == tokenize(tokenizer, suffix)
    assert with_text[: len(before)] == before
    assert span.part is spoken.parts[0]


def test_mixed_turns_keep_order(tokenizer):
    a, b = audio_part(3, 16, seed=1), audio_part(5, 16, seed=2)
    turns = [
        Turn("user", (TextPart("Translate this:"), a)),
        Turn("assistant", (TextPart("Done."),)),
        Turn("user", (b,)),
    ]
    spans = [s.part for s in render_prompt(tokenizer, turns) if isinstance(s, AudioSpan)]
    assert spans == [a, b]


def test_embed_segments_shapes_and_positions():
    segments = [[1, 2, 3], AudioSpan(audio_part(4, 8)), [4]]
    table = torch.nn.Embedding(10, 8)
    out = embed_segments(segments, table, lambda part: part.embeddings)  # [8, 8]
    assert out.shape == (8, 8)
    torch.testing.assert_close(out[3:7], segments[1].part.embeddings)
    torch.testing.assert_close(out[:3], table(torch.tensor([1, 2, 3])))


def test_llama2_template_rejects_non_alternating_roles(tiny_llama2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama2_dir)
    turns = parse_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(MessageFormatError, match="alternate"):
        render_prompt(tokenizer, turns)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "must not be empty"),
        ("hello", "list of message"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "unsupported content part"),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@"}}]}],
            "base64",
        ),
        ([{"role": "assistant", "content": [SILENCE_PART]}], "user messages only"),
    ],
)
def test_bad_messages_raise_clear_errors(bad, match):
    with pytest.raises(MessageFormatError, match=match):
        parse_messages(bad)
