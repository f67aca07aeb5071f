"""Cancellation, failures that stay with their request, sessions, the KV store."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model.decoding import SamplingParams
from model.errors import MessageFormatError
from model.messages import AudioPart, TextPart, Turn
from model.speech_llm import SpeechLLM
from server.kv_cache import KVEntry, KVStore
from server.protocol import (
    ErrorEvent,
    Finished,
    GenerateRequest,
    TextDelta,
    UnknownSessionError,
    WorkerBusyError,
)
from tests.unit.server.test_worker import answer, make_varied_llm, reference_text, run, started

QUESTION = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def varied(tiny_llm) -> SpeechLLM:
    return SpeechLLM(make_varied_llm(tiny_llm.tokenizer))


def test_cancel_mid_generation_frees_the_slot_and_cache(varied):
    async def main():
        worker = await started(varied)
        sid = worker.open_session()
        await worker.append_messages(sid, QUESTION)
        request = GenerateRequest("long", SamplingParams(max_new_tokens=2000), session_id=sid)
        stream = worker.generate(request)
        deltas = 0
        async for event in stream:
            deltas += isinstance(event, TextDelta)
            if deltas == 3:
                break
        await stream.aclose()  # the client went away
        for _ in range(200):
            if worker.stats().running_requests == 0:
                break
            await asyncio.sleep(0.01)
        rows = len(worker.engine.decoding)
        history = worker.history(sid)
        kept = worker.store.get(f"s:{sid}") is not None
        worker.close_session(sid)
        await asyncio.sleep(0.05)
        closed = worker.store.get(f"s:{sid}") is None
        stats = worker.stats()
        await worker.stop()
        return rows, history, kept, closed, stats

    rows, history, kept, closed, stats = run(main())
    assert rows == 0
    assert history[-1].role == "assistant" and history[-1].text  # what was said so far
    assert kept and closed
    assert stats.running_requests == 0
    assert stats.kv_cache_bytes == 0 or stats.kv_cache_bytes <= stats.kv_budget_bytes


def test_cancel_by_id_ends_with_cancelled(varied):
    async def main():
        worker = await started(varied)
        request = GenerateRequest("r", SamplingParams(max_new_tokens=2000), messages=QUESTION)
        events = []
        async for event in worker.generate(request):
            events.append(event)
            if len(events) == 2:
                worker.cancel("r")
        await worker.stop()
        return events

    events = run(main())
    assert events[-1] == Finished("r", "cancelled")
    assert len(events) < 100


def test_cancel_during_packed_prefill_leaves_the_others_exact(varied):
    long_prompts = [
        [{"role": "user", "content": f"Story {i}: " + "the cat sat on the mat. " * 12}]
        for i in range(4)
    ]

    async def main():
        worker = await started(varied, max_batch=4, prefill_chunk=8, prefill_rows=4)
        good = [answer(worker, messages=c) for c in long_prompts[1:]]
        doomed = GenerateRequest("doomed", SamplingParams(), messages=long_prompts[0])

        async def collect_doomed():
            events = []
            async for event in worker.generate(doomed):
                events.append(event)
            return events

        task = asyncio.ensure_future(collect_doomed())
        while "doomed" not in worker.engine.requests:  # submitted: cancel it mid-prefill
            await asyncio.sleep(0.001)
        worker.cancel("doomed")
        results = await asyncio.gather(*good)
        events = await task
        peak, rows = worker.engine.peak_prefill_rows, len(worker.engine.prefilling)
        await worker.stop()
        return results, events, peak, rows

    results, events, peak, rows = run(main())
    assert events[-1] == Finished("doomed", "cancelled")
    assert not any(isinstance(e, TextDelta) for e in events)  # cancelled before its first token
    assert peak >= 2 and rows == 0
    for (text, _, reason), conv in zip(results, long_prompts[1:], strict=True):
        assert reason == "length"
        assert text == reference_text(varied, [Turn("user", (TextPart(conv[0]["content"]),))])


def test_bad_request_fails_alone(varied):
    width = varied.llm.hidden_size
    bad_audio = AudioPart(digest="bad", duration=0.1, embeddings=torch.randn(4, width + 1))
    convs = [[{"role": "user", "content": f"Story number {i}."}] for i in range(3)]

    async def main():
        worker = await started(varied, max_batch=4)
        good = [answer(worker, messages=c) for c in convs]
        bad_request = GenerateRequest(
            "bad", SamplingParams(), messages=[Turn("user", (bad_audio,))]
        )

        async def collect_bad():
            return [e async for e in worker.generate(bad_request)]

        *results, bad = await asyncio.gather(*good, collect_bad())
        with pytest.raises(MessageFormatError):
            request = GenerateRequest("x", SamplingParams(), messages=[{"role": "robot"}])
            await worker.generate(request).__anext__()
        await worker.stop()
        return results, bad

    results, bad = run(main())
    assert isinstance(bad[0], ErrorEvent) and bad[0].code == "MessageFormatError"
    assert bad[-1] == Finished("bad", "error")
    for (text, _, reason), conv in zip(results, convs, strict=True):
        assert reason == "length"
        assert text == reference_text(varied, [Turn("user", (TextPart(conv[0]["content"]),))])


def test_session_api_errors(varied):
    async def main():
        worker = await started(varied, max_sessions=1)
        sid = worker.open_session()
        with pytest.raises(WorkerBusyError):
            worker.open_session()
        with pytest.raises(UnknownSessionError):
            await worker.append_messages("nope", QUESTION)
        with pytest.raises(MessageFormatError):
            await worker.append_messages(sid, [{"role": "user", "content": []}])
        assert worker.history(sid) == []  # nothing appended on error
        await worker.append_messages(sid, QUESTION)
        await answer(worker, session_id=sid)
        worker.close_session(sid)
        assert not worker.has_session(sid)
        with pytest.raises(UnknownSessionError):
            worker.history(sid)
        await worker.stop()

    run(main())


def test_kv_store_evicts_lru_and_never_exceeds_budget():
    def entry(n: int) -> KVEntry:
        return KVEntry(torch.zeros(2, 2, 1, n, 4), list(range(n)))  # 64 bytes a position

    store = KVStore(budget_bytes=64 * 100)
    assert store.allocate("s:a", entry(40)) and store.allocate("s:b", entry(40))
    store.get("s:a")  # a is now the most recently used
    assert store.allocate("s:c", entry(40))
    assert "s:b" not in store and "s:a" in store and store.evictions == 1
    assert not store.reserve(64 * 101)
    assert store.reserve(64 * 50) and "s:a" not in store
    assert store.used_bytes == 64 * 90 and store.peak_bytes <= store.budget_bytes
    assert not store.allocate("s:d", entry(60))  # only 50 positions left beside the arena
    store.release(64 * 50)
    assert store.allocate("p:1", entry(30))
    assert store.find_prefix([0, 1, 2, 99]) == ("p:1", 3)
