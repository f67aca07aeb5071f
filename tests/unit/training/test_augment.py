"""`speechchat augment`: augmented copies of a manifest's lines, text and response kept, rendered
by sox from the lines' own audio."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from model.cli import main
from training.augment import augment_manifest, draw_augmentation, is_valid_flac
from training.config import AugmentConfig
from training.manifest import Utterance, read_manifest, write_manifest

PITCH_ONLY = AugmentConfig(p_speed=0, p_reverb=0, p_telephone=0, p_noise=0, p_pitch=1.0)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    if shutil.which("sox") is None:
        pytest.skip("sox is not installed here")
    rate, lines = 16000, []
    for i, hz in enumerate((220.0, 330.0)):
        t = np.arange(rate) / rate
        sf.write(str(tmp_path / f"u{i}.flac"), 0.3 * np.sin(2 * np.pi * hz * t), rate)
        lines.append(Utterance(f"u{i}", str(tmp_path / f"u{i}.flac"), f"text {i}", f"reply {i}",
                               1.0, "espeak:en-us", "train", {"source": "test"}))  # fmt: skip
    write_manifest(tmp_path / "train.jsonl", lines)
    return tmp_path / "train.jsonl"


def peak_hz(path: str) -> float:
    audio, rate = sf.read(path)
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[spectrum.argmax()])


def test_copies_keep_text_and_response_and_shift_pitch(manifest: Path, tmp_path: Path):
    cfg = replace(PITCH_ONLY, pitch_cents_range=(700.0, 700.0))
    report = augment_manifest(manifest, tmp_path / "aug", cfg, copies=2, workers=2)
    assert (report.lines, report.rendered, report.skipped, report.failed) == (4, 4, 0, 0)
    lines = read_manifest(tmp_path / "aug" / "train.jsonl")
    assert [u.id for u in lines] == ["u0+aug0", "u0+aug1", "u1+aug0", "u1+aug1"]
    for u in lines:
        source = u.extra["augmented_from"]
        assert u.id.startswith(source) and u.text == f"text {source[1]}"
        assert (u.response, u.split, u.voice) == (f"reply {source[1]}", "train", "espeak:en-us")
        assert u.extra["augment"] == {"pitch_cents": 700} and u.extra["source"] == "test"
        assert is_valid_flac(Path(u.audio)) and abs(u.duration - 1.0) < 0.01
        # 700 cents up: x1.498 (220 -> 330 Hz, 330 -> 494 Hz)
        hz = (220.0, 330.0)[int(source[1])] * 2 ** (700 / 1200)
        assert abs(peak_hz(u.audio) - hz) < 5
    # a rerun renders nothing and writes the same lines
    again = augment_manifest(manifest, tmp_path / "aug", cfg, copies=2)
    assert (again.rendered, again.skipped) == (0, 4)
    assert read_manifest(tmp_path / "aug" / "train.jsonl") == lines


def test_chains_are_drawn_per_copy_and_a_bad_line_fails_alone(manifest: Path, tmp_path: Path):
    utts = read_manifest(manifest)
    utts.append(Utterance("gone", str(tmp_path / "missing.flac"), "lost", "reply"))
    write_manifest(manifest, utts)
    cfg = AugmentConfig(p_pitch=1.0, p_noise=1.0)
    report = augment_manifest(manifest, tmp_path / "aug", cfg, copies=3)
    assert (report.lines, report.failed) == (6, 3) and "gone+aug0" in report.errors[0]
    chains = [u.extra["augment"] for u in read_manifest(tmp_path / "aug" / "train.jsonl")]
    assert all(150 <= c["pitch_cents"] <= 500 and "noise" in c for c in chains)
    assert len({c["pitch_cents"] for c in chains}) > 1  # drawn per copy, not once
    # synth's draws stay as they were unless the pitch step is asked for
    assert "pitch_cents" not in draw_augmentation(random.Random(0), AugmentConfig(p_speed=1.0))


def test_cli(manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "cli"
    args = ["augment", str(manifest), "--out", str(out), "--pitch-cents", "200", "300"]
    assert main([*args, "--copies", "1", "--limit", "1", "--p-noise", "1"]) == 0
    (line,) = read_manifest(out / "train.jsonl")
    assert line.id == "u0+aug0" and 200 <= line.extra["augment"]["pitch_cents"] <= 300
    assert "noise" in line.extra["augment"] and "lines=1" in capsys.readouterr().out
