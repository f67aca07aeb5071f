"""Speech synthesis: every engine renders 16 kHz mono FLAC; manifests, split rules, resume and
augmentation are checked on real renderings (an engine whose binary is missing is skipped)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.augment import augment_audio
from training.config import AugmentConfig, SynthConfig
from training.corpus import Sentence, write_sentences
from training.engines import voice_available
from training.manifest import read_manifest
from training.synth import (
    RenderPlan,
    is_valid_flac,
    plan_utterances,
    render_safely,
    render_utterance,
    synthesize_corpus,
)

ENGINE_VOICES = {
    "piper": "piper:en_US-joe-medium",
    "espeak": "espeak:en-us+m3",
    "flite": "flite:awb",
    "festival": "festival:kal_diphone",
}
NO_AUGMENT = AugmentConfig(p_speed=0.0, p_reverb=0.0, p_telephone=0.0, p_noise=0.0)


def need(*voices: str) -> None:
    for voice in voices:
        if not voice_available(voice):
            pytest.skip(f"{voice} is not installed here")


def make_plan(
    voice: str, augment: dict | None = None, text: str = "What time is it now?"
) -> RenderPlan:
    return RenderPlan(
        id="u1",
        text=text,
        voice=voice,
        split="train",
        rate=1.0,
        pitch=1.0,
        augment=augment or {},
        audio="audio/train/u1.flac",
    )


@pytest.mark.parametrize("engine", sorted(ENGINE_VOICES))
def test_engine_renders_speech_as_16k_flac(engine: str, tmp_path: Path) -> None:
    need(ENGINE_VOICES[engine])
    utt = render_utterance(make_plan(ENGINE_VOICES[engine]), tmp_path, SynthConfig())
    audio, rate = sf.read(utt.audio)
    assert is_valid_flac(Path(utt.audio)) and rate == 16000 and audio.ndim == 1
    assert 0.5 < utt.duration < 6.0 and abs(utt.duration - len(audio) / rate) < 1e-3
    assert np.sqrt(np.mean(audio**2)) > 0.02  # speech, not silence
    assert not list(tmp_path.glob("synth-*"))  # temp folders are cleaned up


def write_set(path: Path) -> None:
    rows = [
        ("sa1", "How far is the station from here?", "train"),
        ("sa2", "Please read me the weather report.", "train"),
        ("sa3", "The children were arguing hotly.", "train"),
        ("sb1", "What is the capital of France?", "dev"),
        ("sb2", "She deals in gold and silver.", "dev"),
        ("sc1", "Where can I buy a new umbrella?", "eval"),
    ]
    write_sentences(path, [Sentence(i, t, "test", "question", s) for i, t, s in rows])


def tiny_config() -> SynthConfig:
    return SynthConfig(
        train_voices=("espeak:en-us+m3", "flite:awb"),
        dev_voices=("espeak:en-029+m7",),
        eval_voices=("flite:slt",),
        renditions=2,
        augment=AugmentConfig(p_speed=0.5, p_reverb=0.5, p_telephone=0.5, p_noise=0.5),
    )


def test_corpus_manifests_split_rules_and_resume(tmp_path: Path) -> None:
    config = tiny_config()
    need(*config.train_voices, *config.dev_voices, *config.eval_voices)
    write_set(tmp_path / "s.jsonl")
    out = tmp_path / "out"
    report = synthesize_corpus(tmp_path / "s.jsonl", out, workers=2, config=config)
    assert report.failed == 0 and report.rendered == report.planned == 11  # eval: 1 voice
    utts = {s: read_manifest(out / f"{s}.jsonl") for s in ("train", "dev", "eval")}
    assert [len(utts[s]) for s in ("train", "dev", "eval")] == [6, 4, 1]
    for split, lines in utts.items():
        for u in lines:
            assert u.split == split and is_valid_flac(Path(u.audio))
            assert abs(sf.info(u.audio).duration - u.duration) < 1e-3
            assert set(u.extra) >= {"augment", "rate", "pitch", "source"}
    assert {u.voice for u in utts["train"]} <= set(config.train_voices)
    assert {u.voice for u in utts["eval"]} == {"flite:slt"}
    assert not {u.voice for u in utts["train"] + utts["dev"]} & set(config.eval_voices)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.flac")}
    again = synthesize_corpus(tmp_path / "s.jsonl", out, workers=2, config=config)
    assert again.rendered == 0 and again.skipped == 11
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.flac")}
    lost = Path(utts["train"][0].audio)
    lost.unlink()
    (out / "dev.jsonl").unlink()  # lines lost, audio kept: recovered without rendering
    third = synthesize_corpus(tmp_path / "s.jsonl", out, workers=1, config=config)
    assert third.rendered == 1 and lost.exists() and len(read_manifest(out / "dev.jsonl")) == 4


def test_plan_is_reproducible_and_keeps_dev_voices_on_dev_text(tmp_path: Path) -> None:
    config = replace(tiny_config(), renditions=1)
    need(*config.train_voices, *config.dev_voices, *config.eval_voices)
    sentences = [
        Sentence(f"s{i:04x}", f"Sentence number {i} is here.", "t", "statement", split)
        for i, split in enumerate(["train"] * 60 + ["dev"] * 30 + ["eval"] * 10)
    ]
    plans = plan_utterances(sentences, config)
    assert plans == plan_utterances(sentences, config)
    assert plans != plan_utterances(sentences, replace(config, seed=1))
    assert all(p.voice in config.train_voices for p in plans if p.split == "train")
    assert all(p.voice in config.eval_voices for p in plans if p.split == "eval")
    dev_voices = [p.voice for p in plans if p.split == "dev"]
    assert set(dev_voices) & set(config.dev_voices) and set(dev_voices) & set(config.train_voices)
    assert len({str(p.augment) for p in plans}) > 3  # augmentation varies between utterances


def write_tones(path: Path, rate: int = 22050, seconds: float = 2.0) -> None:
    t = np.arange(int(rate * seconds)) / rate
    sf.write(
        str(path), 0.3 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 5000 * t), rate
    )


def band_energy(audio: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / 16000)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def test_augmentation_chain(tmp_path: Path) -> None:
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed here")
    wav = tmp_path / "tones.wav"
    write_tones(wav)
    clean = augment_audio(wav, {}, "x", 30.0)
    assert clean.size == 32000 and abs(np.abs(clean).max() - 10 ** (-3 / 20)) < 0.01
    phone = augment_audio(wav, {"telephone": True}, "x", 30.0)
    assert band_energy(phone, 4500, 5500) < 1e-3 * band_energy(clean, 4500, 5500)
    fast = augment_audio(wav, {"speed": 1.25}, "x", 30.0)
    assert abs(fast.size - 32000 / 1.25) < 50
    noisy = augment_audio(wav, {"noise": "pink", "snr_db": 10.0}, "x", 30.0)
    assert np.array_equal(noisy, augment_audio(wav, {"noise": "pink", "snr_db": 10.0}, "x", 30.0))
    scale = np.dot(noisy, clean) / np.dot(clean, clean)  # undo the final peak limiting
    snr = 10 * np.log10(np.sum((scale * clean) ** 2) / np.sum((noisy - scale * clean) ** 2))
    assert abs(snr - 10.0) < 1.0
    reverb = augment_audio(wav, {"reverb": 60.0}, "x", 30.0)
    assert reverb.size >= clean.size and not np.allclose(reverb[: clean.size], clean, atol=0.05)
    # an octave up keeps the length and moves the 440 Hz tone to 880 Hz
    octave = augment_audio(wav, {"pitch_cents": 1200}, "x", 30.0)
    assert abs(octave.size - clean.size) < 50
    assert band_energy(octave, 850, 910) > 10 * band_energy(octave, 410, 470)
    assert band_energy(clean, 410, 470) > 10 * band_energy(clean, 850, 910)
    # the noise is seeded by the whole id: ids ending alike (one voice) get different noise
    other = augment_audio(wav, {"noise": "pink", "snr_db": 10.0}, "y", 30.0)
    assert not np.allclose(noisy, other)
    same_voice = [
        augment_audio(wav, {"noise": "white", "snr_db": 10.0}, f"s{i}-piper_en_US_joe_medium", 30.0)
        for i in range(2)
    ]
    assert not np.allclose(*same_voice)


def test_failure_is_reported_not_raised(tmp_path: Path) -> None:
    need("espeak:en-us")
    started = time.perf_counter()
    result = render_safely(make_plan("espeak:en-us"), tmp_path, SynthConfig(timeout_s=1e-4))
    assert isinstance(result, str) and "timed out" in result
    assert time.perf_counter() - started < 5 and not (tmp_path / "audio/train/u1.flac").exists()
