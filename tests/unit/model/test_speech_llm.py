"""respond() and score() on a tiny random Llama: greedy equals generate, scores are consistent."""

from __future__ import annotations

import pytest
import torch

from model.messages import AudioPart
from model.speech_llm import SpeechLLM

QUESTION = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def speech_llm(tiny_llm) -> SpeechLLM:
    return SpeechLLM(tiny_llm)


def generate_ids(llm, messages, n: int) -> list[int]:
    enc = llm.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )
    ids = enc["input_ids"]
    out = llm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=llm.eos_token_ids,
        pad_token_id=llm.eos_token_ids[0],
    )
    return [t for t in out[0, ids.shape[1] :].tolist() if t not in llm.eos_token_ids]


def test_greedy_respond_matches_generate(speech_llm):
    from model.decoding import SamplingParams

    ours = list(speech_llm.respond_ids(QUESTION, SamplingParams(max_new_tokens=24)))
    assert ours == generate_ids(speech_llm.llm, QUESTION, 24)
    assert len(ours) > 0


def test_respond_text_is_the_decoded_ids(speech_llm):
    from model.decoding import SamplingParams

    ids = list(speech_llm.respond_ids(QUESTION, SamplingParams(max_new_tokens=16)))
    text = speech_llm.respond_text(QUESTION, max_new_tokens=16)
    assert text == speech_llm.llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(speech_llm):
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    a = speech_llm.respond_text(QUESTION, seed=7, **kwargs)
    assert a == speech_llm.respond_text(QUESTION, seed=7, **kwargs)
    assert a != speech_llm.respond_text(QUESTION, max_new_tokens=12)  # greedy differs (random LM)


def test_stop_string_cuts_the_answer(speech_llm):
    full = speech_llm.respond_text(QUESTION, max_new_tokens=24)
    stop = full[5:8]
    cut = speech_llm.respond_text(QUESTION, max_new_tokens=24, stop=[stop])
    assert cut == full[: full.find(stop)]


def test_score_of_greedy_answer_is_the_argmax_path(speech_llm):
    """Each greedy token is the most likely one, so its log-prob is the row's maximum."""
    answer = speech_llm.respond_text(QUESTION, max_new_tokens=10)
    scored = speech_llm.score(QUESTION, answer)
    assert scored.logprobs.shape == (len(scored.token_ids),)
    assert torch.all(scored.logprobs <= 0)
    assert scored.perplexity >= 1.0
    other = speech_llm.score(QUESTION, answer + " zebra quantum")
    assert other.logprobs.shape[0] > scored.logprobs.shape[0]


def test_audio_embeddings_reach_the_llm(speech_llm):
    """Different audio embeddings in the same place change the answer's score."""
    dim = speech_llm.llm.hidden_size
    turns = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        part = AudioPart(
            digest=str(seed), duration=0.4, embeddings=torch.randn(5, dim, generator=gen)
        )
        turns.append(
            [{"role": "user", "content": "Listen:"}, {"role": "assistant", "content": "ok"}]
        )
        turns[-1] = [*turns[-1], _audio_turn(part)]
    a, b = (speech_llm.score(t, "Hello there.") for t in turns)
    assert not torch.allclose(a.logprobs, b.logprobs)


def _audio_turn(part: AudioPart):
    from model.messages import Turn

    return Turn("user", (part,))
