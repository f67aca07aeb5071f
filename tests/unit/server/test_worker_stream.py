"""Streaming audio: windows encoded while the user speaks, and prefilled into the session's cache
before the commit."""

from __future__ import annotations

import asyncio
import base64

import pytest
import torch

from model.audio import encode_wav, pcm16_bytes
from model.config import SAMPLE_RATE, encoder_preset
from model.decoding import SamplingParams
from model.encoders import build_encoder
from model.errors import AudioDecodeError
from model.messages import AudioPart, TextPart, Turn
from model.speech_llm import SpeechLLM
from server.engine_request import plan_heard, plan_prompt
from server.protocol import GenerateRequest, TextDelta
from server.sessions import EncodedAudio, decode_pcm16
from server.worker import Worker
from tests.unit.server.test_worker import answer, make_varied_llm, run, started

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."
CHUNK = SAMPLE_RATE // 5  # 200 ms pushes
QUESTION = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def with_ears(tiny_llm) -> SpeechLLM:
    llm = make_varied_llm(tiny_llm.tokenizer)
    torch.manual_seed(1)
    encoder = build_encoder(encoder_preset("tiny", llm_hidden=llm.hidden_size))
    return SpeechLLM(llm, encoder.eval())


async def stream(worker: Worker, sid: str, wav: torch.Tensor, settle: bool = True) -> None:
    """Push `wav` in 200 ms chunks, then (`settle`) wait until what was heard is prefilled."""
    for start in range(0, wav.shape[0], CHUNK):
        await worker.push_audio(sid, pcm16_bytes(wav[start : start + CHUNK]), SAMPLE_RATE)
    session = worker._sessions[sid]
    if settle and session.prefill is not None:
        await session.prefill


def test_streamed_audio_is_encoded_while_arriving(with_ears, speak):
    wav = speak(SENTENCE)

    async def main():
        worker = await started(with_ears, stream_window_s=1.0)
        sid = worker.open_session()
        await stream(worker, sid, wav)
        windows = len(worker._sessions[sid].stream.windows)
        seconds = await worker.commit_audio(sid)
        text, usage, _ = await answer(worker, session_id=sid)
        with pytest.raises(AudioDecodeError):
            await worker.commit_audio(sid)  # the buffer is empty again
        history, stats = worker.history(sid), worker.stats()
        await worker.stop()
        return windows, seconds, history, stats, usage

    windows, seconds, history, stats, usage = run(main())
    assert windows >= 2
    assert seconds == pytest.approx(wav.shape[0] / SAMPLE_RATE, abs=0.01)
    assert history[0].audio_seconds == [pytest.approx(seconds)]
    assert stats.audio_seconds_total == pytest.approx(seconds)
    assert usage.prompt_tokens > seconds * 10  # one embedding per 80 ms


def test_unwindowed_stream_equals_whole_encoding(with_ears):
    gen = torch.Generator().manual_seed(0)
    wav = (0.1 * torch.randn(SAMPLE_RATE * 2, generator=gen)).clamp(-1, 1)
    wav8k = wav[::2]  # pushed at 8 kHz, resampled to 16 kHz inside

    async def main():
        worker = await started(with_ears, stream_window_s=0.0)
        sid = worker.open_session()
        await worker.push_audio(sid, pcm16_bytes(wav8k), 8000)
        await worker.commit_audio(sid)
        part = worker._sessions[sid].turns[-1].parts[0]
        await worker.stop()
        return part

    part = run(main())
    assert part.waveform is None and part.duration == pytest.approx(2.0, abs=0.01)
    expected = with_ears.encoder.encode_one(decode_pcm16(pcm16_bytes(wav8k), 8000))  # [T, D]
    assert expected.shape[0] >= 20  # about one embedding per 80 ms
    assert torch.equal(part.embeddings, expected)


def test_heard_plan_is_the_prefix_of_the_final_prompt(tiny_llm):
    audio = torch.randn(30, 8)  # [T, D]
    history = [
        Turn("system", (TextPart("Be brief."),)),
        Turn("user", (TextPart("Hi there."),)),
        Turn("assistant", (TextPart("Hello!"),)),
    ]

    def spoken(n: int) -> Turn:
        return Turn("user", (AudioPart("stream-x", n / 12.5, embeddings=audio[:n]),))

    heard = plan_heard(tiny_llm.tokenizer, [*history, spoken(12)])
    final = plan_prompt(tiny_llm.tokenizer, [*history, spoken(30)])
    assert heard.keys[-1] == ("stream-x", 11)  # cut right after the audio heard so far
    assert final.keys[: len(heard.keys)] == heard.keys
    assert len(final.keys) > len(heard.keys) + 18  # the rest of the audio and the closing text


def test_heard_windows_are_prefilled_before_the_commit(with_ears, speak):
    """The commit's request finds the windows' positions cached and answers as it would have
    without the head start, token for token."""
    wav = speak(SENTENCE)

    async def spoken_turn(prefill: bool):
        worker = await started(with_ears, stream_window_s=1.0, stream_prefill=prefill)
        sid = worker.open_session()
        await worker.append_messages(sid, QUESTION)
        await answer(worker, session_id=sid)
        await stream(worker, sid, wav)
        heard = sum(w.result().shape[0] for w in worker._sessions[sid].stream.windows)
        await worker.commit_audio(sid)
        text, usage, _ = await answer(worker, session_id=sid)
        stats = worker.stats()
        await worker.stop()
        return text, usage, heard, stats

    text, usage, heard, stats = run(spoken_turn(True))
    base_text, base_usage, base_heard, _ = run(spoken_turn(False))
    assert heard == base_heard >= 20  # two or more windows of ~12 embeddings
    assert text == base_text
    assert usage.prompt_tokens == base_usage.prompt_tokens
    assert usage.cached_tokens >= base_usage.cached_tokens + heard
    assert stats.running_requests == 0 and stats.kv_cache_bytes <= stats.kv_budget_bytes


def test_cleared_and_closed_streams_leave_no_stale_cache(with_ears, speak):
    wav = speak(SENTENCE)
    turn = [{"role": "user", "content": "What is the weather like?"}]

    async def main():
        worker = await started(with_ears, stream_window_s=1.0)
        sid = worker.open_session()
        await stream(worker, sid, wav)  # heard and prefilled, then dropped
        worker.clear_audio(sid)
        await worker.append_messages(sid, turn)
        cleared, _, _ = await answer(worker, session_id=sid)
        fresh = worker.open_session()
        await worker.append_messages(fresh, turn)
        expected, _, _ = await answer(worker, session_id=fresh)
        gone = worker.open_session()
        await stream(worker, gone, wav, settle=False)
        prefill = worker._sessions[gone].prefill
        worker.close_session(gone)  # while its prefill may still be queued or running
        if prefill is not None:
            await prefill
        await asyncio.sleep(0.05)  # the engine thread runs the close's free after the cancel
        leaked = worker.store.get(f"s:{gone}") is not None
        stats = worker.stats()
        await worker.stop()
        return cleared, expected, leaked, stats

    cleared, expected, leaked, stats = run(main())
    assert cleared == expected and cleared
    assert not leaked
    assert stats.running_requests == 0


def test_audio_heard_while_answering_waits_for_the_commit(with_ears, speak):
    """Barge-in: speech arriving during a reply is encoded but not prefilled (the reply's row
    holds the session's cache); the reply is unchanged and the turn still answers."""
    wav = speak(SENTENCE)

    async def main():
        worker = await started(with_ears, stream_window_s=1.0)
        submitted = []  # prefill_only of every request the engine gets
        submit = worker.engine.submit
        worker.engine.submit = lambda req: (submitted.append(req.prefill_only), submit(req))[-1]
        replies = []
        for push in (False, True):
            sid = worker.open_session()
            await worker.append_messages(sid, QUESTION)
            request = GenerateRequest(f"r{push}", SamplingParams(max_new_tokens=40), session_id=sid)
            events = worker.generate(request)
            first = await anext(events)  # answering until the stream is read to its end
            if push:
                await stream(worker, sid, wav)  # its prefills find the session answering
                heard = len(worker._sessions[sid].stream.windows)
            rest = [e async for e in events]
            replies.append("".join(e.text for e in [first, *rest] if isinstance(e, TextDelta)))
        during = list(submitted)
        await worker.commit_audio(sid)
        text, usage, reason = await answer(worker, session_id=sid)
        await worker.stop()
        return replies, during, heard, text, reason

    replies, during, heard, text, reason = run(main())
    assert replies[0] == replies[1] and replies[0]
    assert heard >= 2 and not any(during)  # windows encoded, none prefilled
    assert text and reason == "length"


def whole_turn_ears(tiny_llm) -> SpeechLLM:
    from model.config import EncoderConfig

    cfg = EncoderConfig(kind="whisper_decoder", llm_hidden=tiny_llm.hidden_size, adapter_hidden=32)
    return SpeechLLM(tiny_llm, build_encoder(cfg, tiny_llm).eval())


@pytest.mark.parametrize("after_pause", ["nothing", "speech"])
def test_an_encoder_that_hears_whole_turns_gets_a_draft_at_the_pause(tiny_llm, speak, after_pause):
    """Whisper's decoder mishears words cut at a window edge, so a whisper_decoder encoder gets
    no windows, whatever `stream_window_s` says: at a pause after speech the turn so far is
    encoded whole in the background and prefilled, and a commit with only silence after that
    takes the draft (its cached positions found by the answer). Speech after the pause means
    the whole turn is encoded at the commit."""
    ears = whole_turn_ears(tiny_llm)
    speech = speak(SENTENCE)
    quiet = torch.zeros(3 * CHUNK)  # 0.6 s, as a voice-activity detector waits
    tail = [quiet, speech[: 2 * CHUNK]] if after_pause == "speech" else [quiet]
    wav = torch.cat([speech, *tail])

    async def main():
        worker = await started(ears, stream_window_s=1.0)
        sid = worker.open_session()
        await stream(worker, sid, wav)
        live = worker._sessions[sid].stream
        windows, loud_end, draft = len(live.windows), live.loud_end, live.draft
        await worker.commit_audio(sid)
        part = worker._sessions[sid].turns[-1].parts[0]
        _, usage, _ = await answer(worker, 4, session_id=sid)
        await worker.stop()
        return worker.stream_window_s, windows, loud_end, draft, part, usage

    window_s, windows, loud_end, draft, part, usage = run(main())
    assert window_s == 0.0 and windows == 0
    heard = decode_pcm16(pcm16_bytes(wav), SAMPLE_RATE)  # [T_wav], as pushed
    assert draft is not None and draft.end <= speech.shape[0]  # made at the pause
    if after_pause == "nothing":
        assert loud_end == draft.end and part.digest == draft.key
        expected = ears.encoder.encode_one(heard[:loud_end])  # [L, D]
        assert usage.cached_tokens >= expected.shape[0]  # the draft was prefilled
    else:
        assert loud_end == wav.shape[0] and part.digest != draft.key
        expected = ears.encoder.encode_one(heard)
    assert 10 <= expected.shape[0] <= 40  # one per Whisper token
    assert part.duration == pytest.approx(wav.shape[0] / SAMPLE_RATE)
    torch.testing.assert_close(part.embeddings, expected, atol=1e-4, rtol=1e-4)  # 1 thread there


def test_stateless_audio_heard_again_is_not_encoded_again(with_ears, speak):
    """The OpenAI chat pattern sends the whole conversation each time: an audio turn already
    encoded is taken from the worker's encodings by digest (same answer, no encoder call)."""
    wav = speak(SENTENCE)
    data = base64.b64encode(encode_wav(wav)).decode()
    messages = [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data}}]}
    ]
    calls = []
    encode_one = with_ears.encoder.encode_one

    def counted(waveform):
        calls.append(waveform.shape[0])
        return encode_one(waveform)

    async def main():
        worker = await started(with_ears)
        with_ears.encoder.encode_one = counted
        try:
            first = await answer(worker, messages=messages)
            again = await answer(worker, messages=messages)
        finally:
            del with_ears.encoder.encode_one
        cached = worker._encoded.used_bytes
        await worker.stop()
        return first, again, cached

    (text, _, _), (text_again, usage, _), cached = run(main())
    assert len(calls) == 1 and cached > 0
    assert text_again == text and usage.cached_tokens > 0


def test_encoded_audio_stays_within_its_budget():
    store = EncodedAudio(budget_bytes=3 * 4 * 10)  # three [10] float32 tensors
    for i in range(5):
        store.put(f"d{i}", torch.full((10,), float(i)))
    assert store.used_bytes == 120 and list(store.entries) == ["d2", "d3", "d4"]
    assert store.get("d2") is not None  # now the most recent
    store.put("d5", torch.zeros(10))
    assert list(store.entries) == ["d4", "d2", "d5"] and store.get("d3") is None
    store.put("big", torch.zeros(100))  # larger than the budget: not kept
    assert "big" not in store.entries and store.used_bytes == 120


def test_a_failed_draft_costs_only_its_head_start(tiny_llm, speak):
    """An encoder error in the draft: the commit encodes the whole turn again and succeeds."""
    ears = whole_turn_ears(tiny_llm)
    wav = torch.cat([speak(SENTENCE), torch.zeros(3 * CHUNK)])
    encode_one, calls = ears.encoder.encode_one, []

    def first_fails(waveform):
        calls.append(waveform.shape[0])
        if len(calls) == 1:
            raise RuntimeError("a transient encoder failure")
        return encode_one(waveform)

    async def main():
        worker = await started(ears)
        ears.encoder.encode_one = first_fails
        try:
            sid = worker.open_session()
            await stream(worker, sid, wav)
            await worker.commit_audio(sid)
        finally:
            del ears.encoder.encode_one
        part = worker._sessions[sid].turns[-1].parts[0]
        await worker.stop()
        return part

    part = run(main())
    assert len(calls) == 2 and calls[1] == wav.shape[0]  # the draft, then the whole turn
    expected = ears.encoder.encode_one(decode_pcm16(pcm16_bytes(wav), SAMPLE_RATE))
    torch.testing.assert_close(part.embeddings, expected, atol=1e-4, rtol=1e-4)
