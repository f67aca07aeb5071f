"""The shipped default encoder makes SmolLM2 hear: on held-back spoken questions (sentences not in
the training text, spoken by a voice reserved for evaluation), the reference answers are far more
likely end to end than with an untrained encoder of the same shape."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

from model.audio import load_audio_file
from model.checkpoint import SHIPPED_DIR, load_encoder_spec
from model.encoders import build_encoder
from model.messages import Turn, audio_part_from_waveform
from model.speech_llm import SpeechLLM
from training.evaluate import reference_answer

pytestmark = pytest.mark.slow

# none is in the training sentence set; flite's slt never speaks training text
QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "Can you give me three tips for staying healthy?",
    "Why do leaves change colour in the autumn?",
]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (make test installs it)")
    folder = tmp_path_factory.mktemp("slt")
    waves = []
    for i, text in enumerate(QUESTIONS):
        out = folder / f"q{i}.wav"
        cmd = ["flite", "-voice", "slt", "-t", text, "-o", str(out)]
        subprocess.run(cmd, check=True, timeout=60)
        waves.append(load_audio_file(out))
    return waves


def perplexity(model: SpeechLLM, waves, references) -> float:
    nll, count = 0.0, 0
    for wav, (ref, complete) in zip(waves, references, strict=True):
        scored = model.score([Turn("user", (audio_part_from_waveform(wav),))], ref, complete)
        nll -= float(scored.logprobs.sum())
        count += len(scored.token_ids)
    return math.exp(nll / count)


@pytest.mark.xfail(
    strict=True,
    reason="the shipped checkpoint (CPU token CTC + 430 min of alignment, the last 49 with "
    "Whisper's top two layers) is 23% better than an untrained encoder here (ppl 2.98 vs 3.87; "
    "the previous ones 2.86, 2.85, 2.86, 2.84 and 2.90, the first 3.61); the issue's wide margin "
    "is still open",
)
def test_shipped_encoder_beats_an_untrained_one(smol_llm, spoken):
    assert (SHIPPED_DIR / "config.json").is_file(), "no default encoder is shipped"
    encoder, prompt = load_encoder_spec("default", smol_llm)
    trained = SpeechLLM(smol_llm, encoder, prompt)
    torch.manual_seed(0)
    untrained = SpeechLLM(smol_llm, build_encoder(encoder.config), prompt)
    references = [reference_answer(trained, [{"role": "user", "content": q}]) for q in QUESTIONS]
    ppl_trained = perplexity(trained, spoken, references)
    ppl_untrained = perplexity(untrained, spoken, references)
    assert ppl_trained < ppl_untrained, (ppl_trained, ppl_untrained)  # holds already
    assert ppl_trained < 0.5 * ppl_untrained, (ppl_trained, ppl_untrained)
