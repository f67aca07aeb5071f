"""The embedded SmolLM2 behind real uvicorn: the openai SDK over REST and Realtime, with timings.

The shipped encoder may not exist yet, so audio runs through a tiny random conformer: these
tests check the protocol and plumbing for audio, and the content of answers to text.
"""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import openai
import pytest

from model.audio import encode_wav
from tests.e2e.conftest import CHUNK_MS, as_dict, collect_until, pcm_chunks, types

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
QUESTION = "What is the capital of France? Please answer in one short sentence."


def rest_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_text_answer_names_paris(smol_server):
    result = rest_client(smol_server).chat.completions.create(
        model="SmolLM2", messages=CAPITAL, max_tokens=32, temperature=0
    )
    assert "Paris" in result.choices[0].message.content


def test_streamed_text_answer_names_paris(smol_server):
    stream = rest_client(smol_server).chat.completions.create(
        model="SmolLM2",
        messages=CAPITAL,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens > 0


def test_spoken_question_over_rest_streams(smol_server, speak):
    wav = base64.b64encode(encode_wav(speak(QUESTION))).decode()
    message = {
        "role": "user",
        "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}],
    }
    begin = time.perf_counter()
    stream = rest_client(smol_server).chat.completions.create(
        model="SmolLM2", messages=[message], max_tokens=16, stream=True
    )
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - begin
    assert first is not None
    print(
        f"\nREST TTFT for a {len(wav) * 3 / 4 / 32000:.1f} s spoken question: {first * 1000:.0f} ms"
    )


def test_session_carries_its_history(smol_server):
    url = f"{smol_server.url}/v1/sessions"
    session = httpx.post(url, json={}).json()["id"]
    turn = f"{url}/{session}/turns"
    first = httpx.post(
        turn, json={"content": "What is the capital of France?", "max_tokens": 24}, timeout=120
    ).json()
    assert "Paris" in first["choices"][0]["message"]["content"]
    second = httpx.post(
        turn, json={"content": "And of Italy?", "max_tokens": 24}, timeout=120
    ).json()
    u1, u2 = first["usage"], second["usage"]
    assert u2["prompt_tokens"] > u1["prompt_tokens"] + u1["completion_tokens"]
    assert u2["prompt_tokens_details"]["cached_tokens"] >= u1["prompt_tokens"]
    roles = [m["role"] for m in httpx.get(f"{url}/{session}").json()["messages"]]
    assert roles[-4:] == ["user", "assistant", "user", "assistant"]
    httpx.delete(f"{url}/{session}")


def test_realtime_spoken_turns_context_and_barge_in(smol_server, speak):
    """20 ms chunks paced in real time, server VAD; TTFT measured from the end of speech."""
    speech = speak(QUESTION)
    chunks = pcm_chunks(speech, silence_s=1.0)
    speech_chunks = (8000 + speech.shape[0]) * 1000 // 16000 // CHUNK_MS
    client = openai.AsyncOpenAI(
        api_key="unused", base_url=f"{smol_server.url}/v1", websocket_base_url=smol_server.ws_url
    )

    async def speak_paced(conn) -> float:
        end_of_speech = 0.0
        for i, chunk in enumerate(chunks):
            await conn.input_audio_buffer.append(audio=chunk)
            if i == speech_chunks:
                end_of_speech = time.perf_counter()
            await asyncio.sleep(CHUNK_MS / 1000)
        return end_of_speech

    async def turn(conn) -> tuple[list[dict], float]:
        sender = asyncio.create_task(speak_paced(conn))
        events, first_delta = [], None
        while not events or events[-1]["type"] != "response.done":
            events.append(as_dict(await asyncio.wait_for(conn.recv(), 60)))
            if events[-1]["type"] == "response.output_text.delta" and first_delta is None:
                first_delta = time.perf_counter()
        return events, first_delta - await sender

    async def main():
        async with client.realtime.connect(model="SmolLM2") as conn:
            await conn.recv()
            await conn.session.update(
                session={
                    "type": "realtime",
                    "instructions": "You are a helpful assistant.",
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": {"type": "server_vad", "silence_duration_ms": 400},
                        }
                    },
                    "max_output_tokens": 24,
                }
            )
            await collect_until(conn.recv, "session.updated")
            first, ttft1 = await turn(conn)
            second, ttft2 = await turn(conn)
            # barge-in: a long text answer, interrupted by speech
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Write a long essay about the sea."}
                    ],
                }
            )
            await conn.response.create(response={"max_output_tokens": 1000})
            await collect_until(conn.recv, "response.output_text.delta")
            for chunk in chunks:
                await conn.input_audio_buffer.append(audio=chunk)
            barged = await collect_until(conn.recv, "response.done")
            return first, second, barged, ttft1, ttft2

    first, second, barged, ttft1, ttft2 = asyncio.run(main())
    for events in (first, second):
        order = types(events)
        assert (
            order.index("input_audio_buffer.speech_started")
            < order.index("input_audio_buffer.speech_stopped")
            < order.index("response.output_text.delta")
        )
        assert events[-1]["response"]["usage"]["output_tokens"] > 0
    u1, u2 = first[-1]["response"]["usage"], second[-1]["response"]["usage"]
    assert u2["input_tokens"] > u1["input_tokens"] + u1["output_tokens"]
    assert u2["input_token_details"]["cached_tokens"] >= u1["input_tokens"]
    assert barged[-1]["response"]["status"] == "cancelled"
    assert barged[-1]["response"]["status_details"]["reason"] == "turn_detected"
    print(
        f"\nWebSocket TTFT from end of speech (400 ms VAD silence included): "
        f"{ttft1 * 1000:.0f} ms, {ttft2 * 1000:.0f} ms"
    )
