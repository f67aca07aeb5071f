"""WS /v1/realtime with the official openai SDK and a raw websockets client, tiny model."""

from __future__ import annotations

import asyncio
import base64
import json

import openai
import pytest
import websockets

from tests.e2e.conftest import as_dict, collect_until, pcm_chunks, raw_recv, types

QUESTION = "What is the capital of France?"
VAD = {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 300, "prefix_padding_ms": 200}


def sdk(server, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key, base_url=f"{server.url}/v1", websocket_base_url=server.ws_url
    )


async def configure(conn, **session) -> dict:
    await conn.session.update(session={"type": "realtime", **session})
    return as_dict(await conn.recv())


async def speak_turn(conn, chunks: list[str]) -> list[dict]:
    for chunk in chunks:
        await conn.input_audio_buffer.append(audio=chunk)
    return await collect_until(conn.recv, "response.done")


def test_spoken_turns_with_server_vad(live, speak):
    chunks = pcm_chunks(speak(QUESTION))

    async def main():
        async with sdk(live).realtime.connect(model="speechchat") as conn:
            created = as_dict(await conn.recv())
            assert created["type"] == "session.created"
            assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            updated = await configure(
                conn,
                instructions="Answer briefly.",
                audio={
                    "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": VAD}
                },
            )
            assert updated["type"] == "session.updated"
            assert updated["session"]["instructions"] == "Answer briefly."
            assert (
                updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 300
            )
            first = await speak_turn(conn, chunks)
            second = await speak_turn(conn, chunks)
            return first, second

    first, second = asyncio.run(main())
    order = types(first)
    for a, b in [
        ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"),
        ("input_audio_buffer.speech_stopped", "input_audio_buffer.committed"),
        ("input_audio_buffer.committed", "conversation.item.added"),
        ("conversation.item.added", "response.created"),
        ("response.created", "response.output_text.delta"),
        ("response.output_text.delta", "response.output_text.done"),
        ("response.output_text.done", "response.done"),
    ]:
        assert order.index(a) < order.index(b), order
    started = next(e for e in first if e["type"] == "input_audio_buffer.speech_started")
    stopped = next(e for e in first if e["type"] == "input_audio_buffer.speech_stopped")
    assert 100 <= started["audio_start_ms"] < stopped["audio_end_ms"]
    assert started["item_id"] == stopped["item_id"]
    deltas = "".join(e["delta"] for e in first if e["type"] == "response.output_text.delta")
    done = first[-1]["response"]
    assert done["status"] in ("completed", "incomplete")
    assert done["output"][0]["content"][0]["text"] == deltas
    usage1, usage2 = done["usage"], second[-1]["response"]["usage"]
    # the second turn's prompt holds the first question and answer
    assert usage2["input_tokens"] > usage1["input_tokens"] + usage1["output_tokens"]
    assert usage2["input_token_details"]["cached_tokens"] > 0


def test_text_item_then_response_and_16khz_manual_commit(live, speak):
    chunks = pcm_chunks(speak("Hello"), rate=16000, silence_s=0.2)

    async def main():
        async with sdk(live).realtime.connect(model="speechchat") as conn:
            await conn.recv()
            updated = await configure(
                conn,
                audio={
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 16000},
                        "turn_detection": None,
                    }
                },
            )
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hi"}],
                }
            )
            added = await collect_until(conn.recv, "conversation.item.done")
            await conn.response.create()
            text_turn = await collect_until(conn.recv, "response.done")
            for chunk in chunks:
                await conn.input_audio_buffer.append(audio=chunk)
            await conn.input_audio_buffer.commit()
            committed = await collect_until(conn.recv, "conversation.item.done")
            await conn.response.create(response={"max_output_tokens": 2})
            audio_turn = await collect_until(conn.recv, "response.done")
            return added, text_turn, committed, audio_turn

    added, text_turn, committed, audio_turn = asyncio.run(main())
    assert added[0]["item"]["role"] == "user"
    assert text_turn[-1]["response"]["usage"]["output_tokens"] >= 1
    assert types(committed)[0] == "input_audio_buffer.committed"
    assert committed[0]["previous_item_id"] is not None  # follows the text turn's answer
    assert "input_audio_buffer.speech_started" not in types(committed)
    done = audio_turn[-1]["response"]
    assert done["usage"]["output_tokens"] <= 2


def long_response(conn):
    return conn.response.create(response={"max_output_tokens": 3000})


async def start_long_response(conn) -> None:
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Go"}]}
    )
    await long_response(conn)
    await collect_until(conn.recv, "response.output_text.delta")


def test_barge_in_cancels_the_response(live, speak):
    chunks = pcm_chunks(speak(QUESTION), silence_s=0.6)

    async def main():
        async with sdk(live).realtime.connect(model="speechchat") as conn:
            await conn.recv()
            await configure(conn, audio={"input": {"turn_detection": VAD}})
            await start_long_response(conn)
            for chunk in chunks:
                await conn.input_audio_buffer.append(audio=chunk)
            return await collect_until(conn.recv, "response.done")

    events = asyncio.run(main())
    assert "input_audio_buffer.speech_started" in types(events)
    done = events[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "turn_detected"
    assert done["usage"]["output_tokens"] < 3000


async def settle(predicate, tries: int = 200) -> bool:
    for _ in range(tries):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


def test_response_cancel_and_disconnect_free_the_session(live):
    worker, registry = live.app.state.worker, live.app.state.registry

    def socket_sessions() -> int:  # sessions held by the worker that no REST client owns
        return worker.stats().active_sessions - len(registry.records)

    def idle() -> bool:
        return socket_sessions() == 0 and worker.stats().running_requests == 0

    async def main():
        assert await settle(idle), "sockets of earlier tests still hold sessions"
        async with sdk(live).realtime.connect(model="speechchat") as conn:
            await conn.recv()
            await start_long_response(conn)
            await conn.response.cancel()
            cancelled = await collect_until(conn.recv, "response.done")
            await long_response(conn)
            await collect_until(conn.recv, "response.output_text.delta")
            assert socket_sessions() == 1 and worker.stats().running_requests == 1
        # the socket closed mid-response: its request is cancelled and its session freed
        assert await settle(idle)
        return cancelled

    cancelled = asyncio.run(main())
    done = cancelled[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "client_cancelled"


ERRORS = [
    ("{not json", "invalid_json"),
    (json.dumps({"type": "no.such.event"}), "unknown_event_type"),
    (json.dumps(["not", "an", "object"]), "invalid_event"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}), "invalid_base64"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA"}), "invalid_audio"),
    (json.dumps({"type": "input_audio_buffer.commit"}), "invalid_audio"),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active"),
    (
        json.dumps(
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"format": {"type": "audio/pcmu"}}},
                },
            }
        ),
        "unsupported_audio_format",
    ),
    (
        json.dumps({"type": "session.update", "session": {"type": "transcription"}}),
        "unsupported_session_type",
    ),
    (
        json.dumps({"type": "conversation.item.create", "item": {"type": "function_call"}}),
        "invalid_value",
    ),
]


def test_protocol_errors_keep_the_socket_open(live):
    async def main():
        async with websockets.connect(f"{live.ws_url}/realtime?model=x") as socket:
            recv = raw_recv(socket)
            assert (await recv())["type"] == "session.created"
            codes = []
            for payload, _ in ERRORS:
                await socket.send(payload)
                found = await recv()
                assert found["type"] == "error", found
                codes.append(found["error"]["code"])
            await socket.send(b"\x00\x01")
            binary = await recv()
            item = {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hi"}],
            }
            await socket.send(
                json.dumps({"type": "conversation.item.create", "item": item, "event_id": "e1"})
            )
            await socket.send(json.dumps({"type": "response.create"}))
            done = await collect_until(recv, "response.done")
            return codes, binary, done

    codes, binary, done = asyncio.run(main())
    assert codes == [code for _, code in ERRORS]
    assert binary["type"] == "error" and binary["error"]["code"] == "invalid_event"
    assert done[-1]["response"]["status"] in ("completed", "incomplete")


def test_error_event_echoes_the_client_event_id(live):
    async def main():
        async with websockets.connect(f"{live.ws_url}/realtime") as socket:
            await socket.recv()
            await socket.send(json.dumps({"type": "bogus", "event_id": "evt_42"}))
            return json.loads(await socket.recv())

    found = asyncio.run(main())
    assert found["error"]["event_id"] == "evt_42"


def test_realtime_requires_the_api_key(keyed):
    async def refused():
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with websockets.connect(f"{keyed.ws_url}/realtime"):
                pass
        return info.value.response.status_code

    async def accepted():
        async with sdk(keyed, "sk-test").realtime.connect(model="speechchat") as conn:
            return as_dict(await conn.recv())["type"]

    assert asyncio.run(refused()) == 401
    assert asyncio.run(accepted()) == "session.created"


def test_text_only_server_answers_audio_with_an_error_event(text_only):
    pcm = base64.b64encode(b"\x00\x00" * 480).decode()

    async def main():
        async with websockets.connect(f"{text_only.ws_url}/realtime") as socket:
            await socket.recv()
            await socket.send(json.dumps({"type": "input_audio_buffer.append", "audio": pcm}))
            return json.loads(await socket.recv())

    found = asyncio.run(main())
    assert found["type"] == "error" and found["error"]["code"] == "audio_not_supported"
