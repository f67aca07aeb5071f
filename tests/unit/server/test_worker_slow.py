"""The worker on the embedded SmolLM2: batched greedy answers equal `model.generate`'s."""

from __future__ import annotations

import asyncio

import pytest
import torch

from model.messages import TextPart, Turn
from model.speech_llm import SpeechLLM
from tests.unit.server.test_worker import answer, reference_text, run, started

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea, please, and keep it gentle.",
    "How many legs does a spider have?",
]
N_NEW = 16


@pytest.mark.slow
@pytest.mark.parametrize("decode_step", ["compiled", "lean"])
def test_smol_batched_sessions_and_reuse_equal_generate(smol_llm, decode_step):
    torch.set_num_threads(2)
    speech_llm = SpeechLLM(smol_llm)

    async def main():
        worker = await started(speech_llm, max_batch=4, prefill_chunk=32, decode_step=decode_step)
        sids = [worker.open_session() for _ in QUESTIONS]
        for sid, q in zip(sids, QUESTIONS, strict=True):
            await worker.append_messages(sid, [{"role": "user", "content": q}])
        first = await asyncio.gather(*(answer(worker, N_NEW, session_id=s) for s in sids))
        await worker.append_messages(sids[0], [{"role": "user", "content": "And of Spain?"}])
        second = await answer(worker, N_NEW, session_id=sids[0])
        turns = worker._sessions[sids[0]].turns[:-1]
        peak = worker.engine.peak_batch
        await worker.stop()
        return first, second, turns, peak

    first, (text, usage, _), turns, peak = run(main())
    assert peak == len(QUESTIONS)
    for (got, _, _), q in zip(first, QUESTIONS, strict=True):
        assert got == reference_text(speech_llm, [Turn("user", (TextPart(q),))], N_NEW)
    assert usage.cached_tokens > 30
    assert text == reference_text(speech_llm, turns, N_NEW)
