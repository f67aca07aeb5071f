"""POST /v1/chat/completions through the official openai client, real worker, tiny model."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.unit.server.conftest import audio_message


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_text_completion_has_openai_shape(client):
    result = client.chat.completions.create(model="any", messages=ask("Hello"), max_tokens=4)
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason in ("stop", "length")
    usage = result.usage
    assert usage.completion_tokens <= 4
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_max_tokens_bounds_the_answer_and_says_length(client):
    result = client.chat.completions.create(
        model="any", messages=ask("Count to one hundred"), max_completion_tokens=3
    )
    assert result.usage.completion_tokens <= 3
    if result.usage.completion_tokens == 3:
        assert result.choices[0].finish_reason == "length"


def test_streaming_matches_non_streaming_and_ends_with_usage(client):
    kwargs = dict(model="any", messages=ask("Tell me a story"), max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] in ("stop", "length") and all(f is None for f in finish[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_repeated_history_reuses_the_cache(client):
    messages = ask("The same long question about the weather in Paris in spring")
    client.chat.completions.create(model="any", messages=messages, max_tokens=2)
    again = client.chat.completions.create(model="any", messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_seed_makes_sampling_repeatable(client):
    kwargs = dict(model="any", messages=ask("Hi"), max_tokens=8, temperature=1.0, top_p=0.9)
    first = client.chat.completions.create(**kwargs, seed=7).choices[0].message.content
    second = client.chat.completions.create(**kwargs, seed=7).choices[0].message.content
    assert first == second


def test_stop_sequence_is_not_returned(client):
    base = client.chat.completions.create(model="any", messages=ask("Hi"), max_tokens=12)
    text = base.choices[0].message.content
    assert text, "the tiny model gave an empty answer"
    stop = text[len(text) // 2]
    cut = client.chat.completions.create(
        model="any", messages=ask("Hi"), max_tokens=12, stop=[stop]
    )
    assert stop not in cut.choices[0].message.content
    assert cut.choices[0].finish_reason == "stop"


def test_input_audio_part_is_answered(client, tone):
    text_only = client.chat.completions.create(model="any", messages=ask("What"), max_tokens=2)
    spoken = client.chat.completions.create(
        model="any", messages=[audio_message(tone, "What")], max_tokens=2
    )
    assert spoken.choices[0].finish_reason in ("stop", "length")
    # one second of audio adds about 12 embeddings (80 ms each) to the prompt
    assert spoken.usage.prompt_tokens >= text_only.usage.prompt_tokens + 10


@pytest.mark.parametrize("fmt", ["flac", "ogg", "pcm16"])
def test_other_audio_formats_decode(live, tone, fmt):
    import base64
    import io

    import soundfile as sf

    from model.audio import pcm16_bytes

    if fmt == "pcm16":
        raw = pcm16_bytes(tone)
        audio = {"data": base64.b64encode(raw).decode(), "format": "pcm16", "sample_rate": 16000}
    else:
        buffer = io.BytesIO()
        sf.write(buffer, tone.numpy(), 16000, format=fmt.upper())
        audio = {"data": base64.b64encode(buffer.getvalue()).decode(), "format": fmt}
    body = {
        "model": "any",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": audio}]}],
    }
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 10


def test_async_client_streams_concurrently(live):
    import asyncio

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model="any", messages=ask(f"Question {i}"), max_tokens=6, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(4)))

    answers = asyncio.run(main())
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
