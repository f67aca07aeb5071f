"""Cascade ASR: prompt tokens and windows (fast); tiny.en on espeak-ng speech (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jiwer
import pytest
import torch
from tokenizers import Tokenizer

from model.asr import (
    MAX_NEW_TOKENS,
    WINDOW_SAMPLES,
    WhisperASR,
    beam_decode,
    build_decoding_tokens,
    greedy_decode,
    split_windows,
)
from model.audio import load_audio_file
from model.config import SAMPLE_RATE
from model.whisper_ct2 import default_ct2_dir, load_whisper, read_ct2_config

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None,
    reason="espeak-ng is not installed (apt-get install espeak-ng)",
)

MAX_WER = 0.15
# sentence/voice pairs tiny.en transcribes well across espeak speaking rates (130-175 wpm);
# "The quick brown fox..." is a poor probe: tiny.en hears "jump" for espeak's "jumps"
MEETING = ("en-us", "I think we should meet again next week to talk about the new project")
STATION = ("en-us+f2", "Can you tell me how to get to the train station from here")


def normalize_words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalize_words(reference), normalize_words(hypothesis))


def synthesize(text: str, voice: str, folder: Path) -> torch.Tensor:
    """espeak-ng speech as a mono 16 kHz waveform [T_wav], via the project's audio loader."""
    path = folder / f"{voice.replace('+', '_')}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
    return load_audio_file(path)


def test_decoding_tokens_follow_the_english_only_prompt() -> None:
    ct2_dir = default_ct2_dir()
    tokenizer = Tokenizer.from_file(str(ct2_dir / "tokenizer.json"))
    ct2 = read_ct2_config(ct2_dir)
    tokens = build_decoding_tokens(tokenizer, 51864, ct2["suppress_ids"], ct2["suppress_ids_begin"])
    assert [tokenizer.id_to_token(i) for i in tokens.prompt] == [
        "<|startoftranscript|>",
        "<|notimestamps|>",
    ]
    assert tokenizer.id_to_token(tokens.end) == "<|endoftext|>"
    assert set(ct2["suppress_ids"]) <= set(tokens.suppress)
    assert set(range(tokens.prompt[-1], 51864)) <= set(tokens.suppress)  # timestamps
    assert tokens.end not in tokens.suppress and tokens.end in tokens.suppress_begin
    assert MAX_NEW_TOKENS + len(tokens.prompt) <= 448  # fits the decoder's positions


def test_split_windows_cuts_30s_spans() -> None:
    wav = torch.arange(2 * WINDOW_SAMPLES + 5, dtype=torch.float32)  # [T_wav]
    sizes = [w.shape[0] for w in split_windows(wav)]
    assert sizes == [WINDOW_SAMPLES, WINDOW_SAMPLES, 5]
    assert torch.equal(torch.cat(split_windows(wav)), wav)
    assert split_windows(torch.zeros(0)) == []


def test_local_hf_dir_runs_end_to_end(tmp_path: Path) -> None:
    """A saved HF Whisper directory (here the random tiny one) loads and decodes to text."""
    model, _ = load_whisper("tiny-random")
    model.save_pretrained(tmp_path)
    shutil.copy(default_ct2_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    asr = WhisperASR.from_source(str(tmp_path))
    assert asr.tokens.prompt == (50257, 50362)
    assert torch.equal(asr.model.proj_out.weight, model.proj_out.weight)
    asr.max_new_tokens = 6  # a random model rarely ends by itself
    texts = asr.transcribe_batch([torch.zeros(SAMPLE_RATE // 2), 0.1 * torch.randn(SAMPLE_RATE)])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    ids = asr.decode_greedy(torch.zeros(1, 10, model.config.d_model))  # [1, T_enc, D] states
    assert 0 < len(ids[0]) <= 6 and not set(ids[0]) & set(asr.tokens.suppress)


@pytest.mark.parametrize("steps", [1, 6])
def test_beam_of_one_is_greedy_states_included(steps: int) -> None:
    """Beam search with one beam takes greedy's path and keeps the states that chose each token
    when the steps run out (the random model never ends; real speech ends below)."""
    torch.manual_seed(0)
    asr = WhisperASR.from_source("tiny-random")
    model, tokens = asr.model, asr.tokens
    enc = torch.randn(3, 10, model.config.d_model)  # [B, T_enc, D]
    with torch.inference_mode():
        ids, states = greedy_decode(model, tokens, enc, steps)  # states [B, L, D]
        beam_ids, beam_states = beam_decode(model, tokens, enc, steps, beams=1)
    assert beam_ids == ids
    for row, seq in enumerate(ids):
        n = min(len(seq) + 1, steps)  # the end's state too, where it came
        torch.testing.assert_close(beam_states[row, :n], states[row, :n], atol=1e-5, rtol=1e-5)
    assert beam_states.shape[1] == max(min(len(seq) + 1, steps) for seq in ids)


def test_beam_search_keeps_to_the_allowed_tokens() -> None:
    torch.manual_seed(0)
    asr = WhisperASR.from_source("tiny-random", beams=3)
    asr.max_new_tokens = 6  # a random model rarely ends by itself
    enc = torch.randn(2, 10, asr.model.config.d_model)  # [B, T_enc, D]
    with torch.inference_mode():
        ids, states = beam_decode(asr.model, asr.tokens, enc, 6, beams=3)  # states [B, L, D]
    assert len(ids) == 2 and states.shape[0] == 2
    assert all(len(seq) <= 6 and not set(seq) & set(asr.tokens.suppress) for seq in ids)
    assert all(isinstance(t, str) for t in asr.transcribe_batch([0.1 * torch.randn(8000)]))
    with pytest.raises(ValueError, match="beams"):
        WhisperASR.from_source("tiny-random", beams=0)


@pytest.fixture(scope="module")
def asr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WhisperASR]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPEECHCHAT_CACHE", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield WhisperASR.from_source("default")


@pytest.fixture(scope="module")
def spoken(asr: WhisperASR, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """voice -> (reference text, waveform, transcript of that waveform alone)."""
    folder = tmp_path_factory.mktemp("speech")
    out = {}
    for voice, text in (MEETING, STATION):
        wav = synthesize(text, voice, folder)
        out[voice] = (text, wav, asr.transcribe(wav))
    return out


@pytest.mark.slow
@needs_espeak
@pytest.mark.parametrize("voice", [MEETING[0], STATION[0]])
def test_transcribes_espeak_sentence(spoken: dict[str, tuple], voice: str) -> None:
    text, _, hypothesis = spoken[voice]
    wer = word_error_rate(text, hypothesis)
    assert wer <= MAX_WER, f"WER {wer:.2f} for {voice}: {hypothesis!r}"


@pytest.mark.slow
@needs_espeak
def test_batch_matches_one_by_one(asr: WhisperASR, spoken: dict[str, tuple]) -> None:
    wavs = [wav for _, wav, _ in spoken.values()]
    assert asr.transcribe_batch(wavs) == [hypothesis for _, _, hypothesis in spoken.values()]


@pytest.mark.slow
@needs_espeak
def test_audio_over_30s_is_transcribed_in_windows(
    asr: WhisperASR, spoken: dict[str, tuple]
) -> None:
    first, second = spoken[MEETING[0]][1], spoken[STATION[0]][1]
    gap = torch.zeros(30 * SAMPLE_RATE - first.shape[0])  # the second sentence opens window 2
    wav = torch.cat([first, gap, second])  # [T_wav], over 30 s
    hypothesis = asr.transcribe(wav)
    wer = word_error_rate(f"{MEETING[1]} {STATION[1]}", hypothesis)
    assert wer <= MAX_WER, f"WER {wer:.2f}: {hypothesis!r}"


@pytest.mark.slow
@needs_espeak
def test_beam_of_one_ends_as_greedy_on_speech(asr: WhisperASR, spoken: dict[str, tuple]) -> None:
    windows = [wav for _, wav, _ in spoken.values()]
    feats = asr.features(
        [w.numpy() for w in windows], sampling_rate=SAMPLE_RATE, return_tensors="pt"
    )
    with torch.inference_mode():
        enc = asr.model.model.encoder(feats["input_features"]).last_hidden_state  # [B, 1500, D]
        ids, states = greedy_decode(asr.model, asr.tokens, enc, MAX_NEW_TOKENS)  # [B, L, D]
        beam_ids, beam_states = beam_decode(asr.model, asr.tokens, enc, MAX_NEW_TOKENS, beams=1)
    assert beam_ids == ids and all(len(seq) < MAX_NEW_TOKENS for seq in ids)  # both ended
    for row, seq in enumerate(ids):  # each token's state and the end's
        torch.testing.assert_close(beam_states[row, : len(seq) + 1], states[row, : len(seq) + 1])


@pytest.mark.slow
@needs_espeak
def test_beam_search_transcribes_in_batches_as_one_by_one(spoken: dict[str, tuple]) -> None:
    beam = WhisperASR.from_source("default", beams=4)
    wavs = [wav for _, wav, _ in spoken.values()]
    texts = beam.transcribe_batch(wavs)
    assert texts == [beam.transcribe(wav) for wav in wavs]
    for (reference, _, _), hypothesis in zip(spoken.values(), texts, strict=True):
        wer = word_error_rate(reference, hypothesis)
        assert wer <= MAX_WER, f"WER {wer:.2f} with 4 beams: {hypothesis!r}"
    assert beam.transcribe(torch.zeros(0)) == ""


@pytest.mark.slow
def test_silence_and_bad_shapes(asr: WhisperASR) -> None:
    assert asr.transcribe(torch.zeros(0)) == ""
    with pytest.raises(ValueError, match="mono"):
        asr.transcribe(torch.zeros(2, SAMPLE_RATE))
