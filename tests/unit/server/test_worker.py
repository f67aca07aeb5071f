"""The worker's greedy output equals `model.generate` token for token: one session, eight batched
sessions of different lengths, turn 5 with cache reuse, after eviction, and with audio turns."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch
from transformers import LlamaForCausalLM

from model.decoding import SamplingParams
from model.llm import LoadedLLM, load_llm
from model.messages import AudioPart, TextPart, Turn
from model.prompt import render_prompt, text_only_ids
from model.speech_llm import SpeechLLM
from server import cpu_attention, engine_forward
from server.protocol import Finished, GenerateRequest, TextDelta, Usage
from server.worker import Worker
from tests.tiny import tiny_llama_config

TOPICS = ["cats", "the sea", "a long journey to the mountains", "bread", "stars", "rain"]
N_NEW = 12


def make_varied_llm(tokenizer, **overrides) -> LoadedLLM:
    """A random 2-layer Llama whose greedy answers vary (the default init repeats one token)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, **overrides)).eval().requires_grad_(False)
    return LoadedLLM(model=model, tokenizer=tokenizer, name="tiny-varied")


@pytest.fixture(scope="module")
def varied(tiny_llm) -> SpeechLLM:
    return SpeechLLM(make_varied_llm(tiny_llm.tokenizer))


def run(coro):
    return asyncio.run(coro)


def reference_ids(speech_llm: SpeechLLM, turns: list[Turn], n: int) -> list[int]:
    """model.generate's greedy continuation of a text-only conversation."""
    llm = speech_llm.llm
    ids = text_only_ids(render_prompt(llm.tokenizer, turns))
    x = torch.tensor([ids], device=llm.device)
    out = llm.model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=llm.eos_token_ids,
        pad_token_id=llm.eos_token_ids[0],
    )
    return [t for t in out[0, x.shape[1] :].tolist() if t not in llm.eos_token_ids]


def reference_text(speech_llm: SpeechLLM, turns: list[Turn], n: int = N_NEW) -> str:
    ids = reference_ids(speech_llm, turns, n)
    return speech_llm.llm.tokenizer.decode(ids, skip_special_tokens=True)


def user(text: str) -> Turn:
    return Turn("user", (TextPart(text),))


async def answer(worker: Worker, n: int = N_NEW, **target) -> tuple[str, Usage, str]:
    """Run one request to the end -> (text, usage, finish reason)."""
    request = GenerateRequest(uuid.uuid4().hex, SamplingParams(max_new_tokens=n), **target)
    events = [e async for e in worker.generate(request)]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    usage = next(e for e in events if isinstance(e, Usage))
    assert isinstance(events[-1], Finished)
    return text, usage, events[-1].reason


async def started(speech_llm: SpeechLLM, **kwargs) -> Worker:
    worker = Worker(speech_llm, **kwargs)
    await worker.start()
    return worker


def test_single_stateless_request_equals_generate(varied):
    turns = [user("Tell me a story about a cat.")]

    async def main():
        worker = await started(varied)
        start = time.perf_counter()
        text, usage, reason = await answer(worker, messages=turns)
        elapsed = time.perf_counter() - start
        await worker.stop()
        return text, usage, reason, elapsed

    text, usage, reason, elapsed = run(main())
    ref = reference_ids(varied, turns, N_NEW)
    assert text == varied.llm.tokenizer.decode(ref, skip_special_tokens=True)
    assert usage.completion_tokens == len(ref) and reason == "length"
    assert 0.0 < usage.first_token_s < elapsed  # the engine's time to the first token
    assert usage.prompt_tokens == len(text_only_ids(render_prompt(varied.llm.tokenizer, turns)))


@pytest.mark.parametrize("decode_step", ["compiled", "lean", "hf"])
def test_eight_batched_sessions_of_different_lengths_equal_generate(varied, decode_step):
    lean = eight_batched_sessions_equal_generate(varied, decode_step=decode_step).engine.lean
    assert (lean is not None) == (decode_step != "hf")
    assert (lean is not None and lean.row_step is not None) == (decode_step == "compiled")
    kernel = decode_step == "compiled" and cpu_attention.load_kernel() is not None
    assert (lean is not None and lean.attention_kernel is not None) == kernel


def eight_batched_sessions_equal_generate(speech_llm: SpeechLLM, **worker_args) -> Worker:
    """Eight sessions of different lengths answered together (20 tokens each): each answer is
    `generate`'s greedy one. Returns the (stopped) worker."""
    convs = [[user(f"Tell me about {TOPICS[i % 6]}. " * (1 + i))] for i in range(8)]

    async def main():
        worker = await started(speech_llm, max_batch=8, prefill_chunk=16, **worker_args)
        sids = [worker.open_session() for _ in convs]
        for sid, turns in zip(sids, convs, strict=True):
            await worker.append_messages(sid, turns)
        results = await asyncio.gather(*(answer(worker, 20, session_id=s) for s in sids))
        await worker.stop()
        return results, worker

    results, worker = run(main())
    assert worker.engine.peak_batch >= 4  # they really decoded together
    for (text, _, _), turns in zip(results, convs, strict=True):
        assert text == reference_text(speech_llm, turns, 20)
    return worker


@pytest.mark.parametrize("decode_step", ["lean", "hf"])
def test_packed_prefill_of_many_prompts_equals_generate(varied, decode_step, caplog):
    """Prompts admitted together are prefilled as one packed sequence, shared token budget."""
    convs = [[user(f"Say something about {TOPICS[i % 6]}. " * (1 + i % 3))] for i in range(6)]
    caplog.set_level("INFO", logger="server.engine")

    async def main():
        results = {}
        for chunk in (4096, 24):  # all prompts in one step; then a budget they must share
            worker = await started(
                varied, max_batch=8, prefill_chunk=chunk, prefill_rows=6, decode_step=decode_step
            )
            sids = [worker.open_session() for _ in convs]
            for sid, turns in zip(sids, convs, strict=True):
                await worker.append_messages(sid, turns)
            texts = await asyncio.gather(*(answer(worker, 8, session_id=s) for s in sids))
            results[chunk] = ([t for t, _, _ in texts], worker.engine.peak_prefill_rows)
            await worker.stop()
        return results

    for texts, peak in run(main()).values():
        assert peak >= 2  # several prompts really shared a forward pass
        for text, turns in zip(texts, convs, strict=True):
            assert text == reference_text(varied, turns, 8)
    assert "packed prefill failed" not in caplog.text  # no step fell back to one by one


def test_turn_five_with_cache_reuse_equals_full_reprefill(varied):
    async def main():
        worker = await started(varied, prefill_chunk=8)
        sid = worker.open_session(system_prompt="You are terse.")
        usages = []
        for i in range(5):
            await worker.append_messages(sid, [{"role": "user", "content": f"Say {TOPICS[i]}."}])
            text, usage, _ = await answer(worker, session_id=sid)
            usages.append(usage)
        turns = worker._sessions[sid].turns
        # the same conversation, stateless, on a worker with an empty cache
        fresh = await started(varied)
        full, full_usage, _ = await answer(fresh, messages=turns[:-1])
        await worker.stop()
        await fresh.stop()
        return text, usages, full, full_usage, turns

    text, usages, full, full_usage, turns = run(main())
    assert text == full == reference_text(varied, turns[:-1])
    assert full_usage.cached_tokens == 0
    last = usages[-1]
    assert last.cached_tokens > last.prompt_tokens // 2  # turn 5 prefilled little
    assert last.prompt_tokens == full_usage.prompt_tokens


def test_stateless_prefix_reuse_equals_generate(varied):
    first = [user("Name a colour."), Turn("assistant", (TextPart("Blue, like the sea."),))]
    second = [*first, user("And a fruit?")]

    async def main():
        worker = await started(varied)
        _, u1, _ = await answer(worker, messages=first + [user("Why?")])
        text, u2, _ = await answer(worker, messages=second)
        await worker.stop()
        return u1, text, u2

    u1, text, u2 = run(main())
    assert u1.cached_tokens == 0
    assert u2.cached_tokens > 10
    assert text == reference_text(varied, second)


def test_eviction_then_rebuild_equals_generate_within_budget(varied):
    dims = varied.llm.model.config
    per_position = dims.num_hidden_layers * 2 * dims.num_key_value_heads * 16 * 4  # bytes
    budget = per_position * 380  # the arena (256 positions) plus about two idle sessions

    async def main():
        worker = await started(varied, kv_budget_bytes=budget, max_batch=1)
        sids = [worker.open_session() for _ in range(3)]
        for round_ in range(2):
            for i, sid in enumerate(sids):
                content = f"Round {round_}: tell me about {TOPICS[i]}."
                await worker.append_messages(sid, [{"role": "user", "content": content}])
                await answer(worker, session_id=sid)
        text, usage, _ = await answer(worker, session_id=sids[0])
        turns = worker._sessions[sids[0]].turns[:-1]
        store = worker.store
        await worker.stop()
        return text, usage, turns, store

    text, usage, turns, store = run(main())
    assert store.evictions > 0
    assert store.peak_bytes <= store.budget_bytes
    assert text == reference_text(varied, turns)


def test_audio_turns_equal_respond(varied):
    """Audio as embeddings in history: the worker answers as `respond_ids` does, after reuse."""
    dim = varied.llm.hidden_size
    gen = torch.Generator().manual_seed(3)
    audio = [
        AudioPart(digest=f"a{i}", duration=0.5, embeddings=torch.randn(6, dim, generator=gen))
        for i in range(2)
    ]

    async def main():
        worker = await started(varied)
        sid = worker.open_session()
        await worker.append_messages(sid, [Turn("user", (TextPart("Listen:"), audio[0]))])
        await answer(worker, session_id=sid)
        await worker.append_messages(sid, [Turn("user", (audio[1],))])
        text, usage, _ = await answer(worker, session_id=sid)
        turns = worker._sessions[sid].turns[:-1]
        await worker.stop()
        return text, usage, turns

    text, usage, turns = run(main())
    assert usage.cached_tokens > 6
    ids = list(varied.respond_ids(turns, SamplingParams(max_new_tokens=N_NEW)))
    assert text == varied.llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_seeded_sampling_and_stop_strings_match_respond(varied):
    question = [{"role": "user", "content": "Tell me a story about a cat."}]
    full = varied.respond_text(question, max_new_tokens=N_NEW)
    stop = full[6:9]

    async def main():
        worker = await started(varied)
        outs = []
        for params in (
            SamplingParams(max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, seed=7),
            SamplingParams(max_new_tokens=N_NEW, stop=(stop,)),
        ):
            request = GenerateRequest(uuid.uuid4().hex, params, messages=question)
            events = [e async for e in worker.generate(request)]
            outs.append("".join(e.text for e in events if isinstance(e, TextDelta)))
        await worker.stop()
        return outs

    sampled, cut = run(main())
    assert sampled == varied.respond_text(
        question, max_new_tokens=N_NEW, temperature=1.0, top_p=0.9, seed=7
    )
    assert cut == varied.respond_text(question, max_new_tokens=N_NEW, stop=[stop])


def test_llama2_template_multi_turn_equals_generate(tiny_llama2_dir):
    tokenizer = load_llm(str(tiny_llama2_dir)).tokenizer
    speech_llm = SpeechLLM(make_varied_llm(tokenizer))

    async def main():
        worker = await started(speech_llm)
        sid = worker.open_session(system_prompt="Be brief.")
        for topic in TOPICS[:3]:
            await worker.append_messages(sid, [{"role": "user", "content": f"About {topic}?"}])
            text, usage, _ = await answer(worker, session_id=sid)
        turns = worker._sessions[sid].turns[:-1]
        await worker.stop()
        return text, usage, turns

    text, usage, turns = run(main())
    assert usage.cached_tokens > 0
    assert text == reference_text(speech_llm, turns)


def test_only_the_engine_thread_runs_torch_on_several_threads(varied):
    """The engine thread owns the cores; audio decoding and encoding run single-threaded, so no
    second OpenMP pool throttles the engine's (server/threads.py)."""

    async def main():
        worker = await started(varied, num_threads=2)
        loop = asyncio.get_running_loop()
        on_engine = loop.create_future()
        worker.engine.call(
            lambda: loop.call_soon_threadsafe(on_engine.set_result, torch.get_num_threads())
        )
        engine_threads = await on_engine
        encode_threads = await worker._off_loop(torch.get_num_threads)
        await worker.stop()
        return engine_threads, encode_threads

    assert run(main()) == (2, 1)


def test_a_decoder_that_fails_to_build_fails_start(varied, monkeypatch):
    """Building happens on the engine thread; its error reaches the caller of `start`."""

    def refuse(model, decode_step):
        raise RuntimeError("cannot pack these weights")

    monkeypatch.setattr(engine_forward, "build_decoder", refuse)

    async def main():
        worker = Worker(varied)
        with pytest.raises(RuntimeError, match="cannot pack"):
            await worker.start()
        return worker.engine._thread

    thread = run(main())
    thread.join(timeout=5)
    assert not thread.is_alive()
