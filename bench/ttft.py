"""Timed requests and the TTFT measurements of `bench/bench_worker.py`: a 5 s audio turn at turns
1 and 10 of a session given as encoder outputs (with cache reuse and with full re-prefill),
audio pushed in real time (prefilled as heard or at the commit), and real speech through the
loaded encoder, whole or streamed.

Dims: T embeddings or samples, D LLM width.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import torch

from model.audio import pcm16_bytes
from model.config import SAMPLE_RATE
from model.decoding import SamplingParams
from model.llm import LoadedLLM
from model.messages import AudioPart, Turn, audio_part_from_waveform
from server.protocol import GenerateRequest, TextDelta, Usage
from server.worker import Worker

AUDIO_SECONDS = 5.0  # s per spoken turn
EMBEDDING_RATE = 12.5  # audio embeddings per second (80 ms each)
PUSH_SECONDS = 0.1  # s of audio per push when streaming in real time


async def run_request(
    worker: Worker, n: int, start: float | None = None, **target
) -> dict[str, float]:
    """One request -> ttft (s, from `start`, default now), decode rate (tokens/s after the
    first), completion tokens."""
    request = GenerateRequest(uuid.uuid4().hex, SamplingParams(max_new_tokens=n), **target)
    start = start or time.perf_counter()
    first = last = None
    tokens = prompt = cached = 0
    first_token = float("nan")
    async for event in worker.generate(request):
        now = time.perf_counter()
        if isinstance(event, TextDelta):
            first = first or now
            last = now
        if isinstance(event, Usage):
            tokens, prompt, cached = (
                event.completion_tokens,
                event.prompt_tokens,
                event.cached_tokens,
            )
            first_token = event.first_token_s if event.first_token_s is not None else first_token
    first, last = first or time.perf_counter(), last or time.perf_counter()
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan")
    return {
        "ttft": first - start, "rate": rate, "tokens": tokens, "prefilled": prompt - cached,
        "cached": cached, "first_token": first_token,
    }  # fmt: skip


def audio_turn(dim: int, index: int, device: torch.device) -> Turn:
    """A spoken user turn as its encoder output: 5 s of random embeddings."""
    gen = torch.Generator().manual_seed(index)
    emb = torch.randn(int(AUDIO_SECONDS * EMBEDDING_RATE), dim, generator=gen)  # [T, D]
    part = AudioPart(digest=f"bench{index}", duration=AUDIO_SECONDS, embeddings=emb.to(device))
    return Turn("user", (part,))


async def audio_ttft(
    worker: Worker, llm: LoadedLLM, reply_tokens: int, session: int
) -> dict[str, float]:
    """TTFT of a 5 s audio turn at turns 1 and 10: session (cache reuse) vs full re-prefill.
    Each `session` number hears its own audio, so no run finds another's cached prefix."""
    sid = worker.open_session(system_prompt="You are a helpful voice assistant.")
    out = {}
    for turn in range(1, 11):
        audio = audio_turn(llm.hidden_size, 100 * session + turn, llm.device)
        await worker.append_messages(sid, [audio])
        turns = list(worker._sessions[sid].turns)
        # the session first: a stateless copy run before it would hand it a warm prefix
        result = await run_request(worker, reply_tokens, session_id=sid)
        if turn in (1, 10):
            out[f"reuse{turn}"] = result["ttft"]
            out[f"token{turn}"] = result["first_token"]  # sampled; the text can come later
            out[f"prefilled{turn}"], out[f"cached{turn}"] = result["prefilled"], result["cached"]
            full = await run_request(worker, 1, messages=turns)
            out[f"full{turn}"] = full["ttft"]
    worker.close_session(sid)
    return out


async def speak_in_real_time(
    worker: Worker, sid: str, wav: torch.Tensor, reply_tokens: int
) -> float:
    """Push `wav` [T_wav] in PUSH_SECONDS chunks at the pace it is spoken, commit, answer -> s
    from the last push (the end of speech) to the first text."""
    pcm = pcm16_bytes(wav)
    step = int(PUSH_SECONDS * SAMPLE_RATE) * 2  # bytes
    begin = time.perf_counter()
    for i, start in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, begin + (i + 1) * PUSH_SECONDS - time.perf_counter()))
        await worker.push_audio(sid, pcm[start : start + step], SAMPLE_RATE)
    end_of_speech = time.perf_counter()
    await worker.commit_audio(sid)
    return (await run_request(worker, reply_tokens, end_of_speech, session_id=sid))["ttft"]


async def streamed_ttft(worker: Worker, llm: LoadedLLM, reply_tokens: int, seed: int) -> dict:
    """End of speech to first text, turns 1 and 10, for spoken turns streamed in real time;
    the turns between are appended as embeddings with a reply each."""
    out = {}
    for prefill in (True, False):
        worker.stream_prefill = prefill
        sid = worker.open_session(system_prompt="You are a helpful voice assistant.")
        for turn in range(1, 11):
            if turn in (1, 10):
                key = f"{'heard' if prefill else 'commit'}{turn}"
                gen = torch.Generator().manual_seed(1000 * seed + 10 * turn + prefill)
                # low noise: the encoder's cost, not its words, matters here
                noise = 0.05 * torch.randn(int(AUDIO_SECONDS * SAMPLE_RATE), generator=gen)
                out[key] = await speak_in_real_time(worker, sid, noise, reply_tokens)
                continue
            audio = audio_turn(llm.hidden_size, 1000 * seed + turn + 500 * prefill, llm.device)
            await worker.append_messages(sid, [audio])
            await run_request(worker, reply_tokens, session_id=sid)
        worker.close_session(sid)
    worker.stream_prefill = True
    return out


async def spoken_ttft(
    worker: Worker, speeches: list[torch.Tensor], reply_tokens: int, repeat: int
) -> dict[str, float]:
    """The loaded encoder on real speech: TTFT of a whole spoken turn (encoded once it has
    arrived, as over REST; from its arrival) and of one streamed in real time (from the end of
    the pushes), at turns 1 and 10. Both say `speeches[0]` [T_wav] (so only the history differs);
    turns 2-9 say the next ones. `repeat` pads each turn with its own few samples of silence, so
    no run finds another's encodings cached."""
    out = {}
    for streamed in (False, True):
        sid = worker.open_session(system_prompt="You are a helpful voice assistant.")
        for turn in range(1, 11):
            speech = speeches[0 if turn in (1, 10) else turn - 1]
            pad = 1 + 4 * repeat + 2 * streamed + (turn == 10)
            wav = torch.nn.functional.pad(speech, (0, pad))  # [T_wav]
            if streamed and turn in (1, 10):
                out[f"streamed{turn}"] = await speak_in_real_time(worker, sid, wav, reply_tokens)
                continue
            start = time.perf_counter()
            await worker.append_messages(sid, [Turn("user", (audio_part_from_waveform(wav),))])
            result = await run_request(worker, reply_tokens, start, session_id=sid)
            if not streamed and turn in (1, 10):
                out[f"whole{turn}"] = result["ttft"]
                out[f"prefilled{turn}"] = result["prefilled"]
                out[f"cached{turn}"] = result["cached"]
        worker.close_session(sid)
    return out
