"""Corpus import: tiny LibriSpeech, MLS and folder layouts written by the test become manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from training.errors import CorpusImportError
from training.importers import import_corpus, sentence_case
from training.manifest import read_manifest


def write_audio(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.2 * np.sin(2 * np.pi * 220 * t)
    sf.write(str(path), np.stack([tone] * channels, axis=1) if channels > 1 else tone, rate)


def test_sentence_case() -> None:
    assert sentence_case("HELLO I'M SURE I AM HERE") == "Hello I'm sure I am here."
    assert sentence_case("what is this") == "What is this."
    assert sentence_case("   ") == ""


def make_librispeech(root: Path) -> None:
    layout = {
        "train-clean-100": ("19", "198", ["HELLO I AM HERE", "THE SUN IS UP"]),
        "dev-clean": ("84", "121", ["WHAT A DAY IT WAS"]),
        "test-clean": ("61", "70", ["GOOD NIGHT MOON"]),
    }
    for subset, (spk, chapter, texts) in layout.items():
        folder = root / "LibriSpeech" / subset / spk / chapter
        lines = []
        for i, text in enumerate(texts):
            utt = f"{spk}-{chapter}-{i:04d}"
            write_audio(folder / f"{utt}.flac", 0.5 + i)
            lines.append(f"{utt} {text}")
        lines.append(f"{spk}-{chapter}-0099 THIS ONE HAS NO AUDIO")
        (folder / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")


def test_librispeech(tmp_path: Path) -> None:
    make_librispeech(tmp_path / "src")
    out = tmp_path / "manifests" / "libri.jsonl"
    report = import_corpus("librispeech", tmp_path / "src", out)
    assert report.count == 4 and report.skipped == 3
    assert report.per_split == {"train": 2, "dev": 1, "eval": 1}
    utts = {u.id: u for u in read_manifest(out)}
    first = utts["19-198-0000"]
    assert first.text == "Hello I am here." and first.voice == "librispeech:19"
    assert first.split == "train" and abs(first.duration - 0.5) < 1e-3
    assert Path(first.audio).exists() and utts["19-198-0001"].duration == pytest.approx(1.5)
    assert utts["84-121-0000"].split == "dev" and utts["61-70-0000"].split == "eval"


def test_mls(tmp_path: Path) -> None:
    root = tmp_path / "mls_english"
    for split, rows in {
        "train": ["4800_10003_000000", "4800_10003_000001"],
        "dev": ["1995_1826_000000"],
    }.items():
        lines = []
        for utt in rows:
            spk, book, _ = utt.split("_")
            write_audio(root / split / "audio" / spk / book / f"{utt}.flac", 1.0)
            lines.append(f"{utt}\tand so the story goes on and on")
        (root / split / "transcripts.txt").write_text("\n".join(lines) + "\n")
    out = root / "mls.jsonl"
    report = import_corpus("mls", root, out)
    assert report.count == 3 and report.per_split == {"train": 2, "dev": 1}
    utts = read_manifest(out)
    assert all(u.text == "And so the story goes on and on." for u in utts)
    assert {u.voice for u in utts} == {"mls:4800", "mls:1995"}
    raw = out.read_text()
    assert '"audio": "train/audio/4800/10003/4800_10003_000000.flac"' in raw  # relative


def test_folder_of_wav_and_txt(tmp_path: Path) -> None:
    src = tmp_path / "recordings"
    write_audio(src / "alice" / "hello.wav", 1.0, rate=48000, channels=2)
    (src / "alice" / "hello.txt").write_text("Hello, how are you today?\n")
    write_audio(src / "note.wav", 2.0, rate=8000)
    (src / "note.txt").write_text("Remember  to buy\nmilk.")
    write_audio(src / "orphan.wav", 1.0)  # no transcript: skipped
    out = tmp_path / "folder.jsonl"
    report = import_corpus("folder", src, out)
    assert report.count == 2
    utts = {u.id: u for u in read_manifest(out)}
    assert utts["alice_hello"].text == "Hello, how are you today?"
    assert utts["alice_hello"].voice == "folder:alice" and utts["note"].voice == "folder:recordings"
    assert utts["note"].text == "Remember to buy milk." and utts["note"].duration == pytest.approx(
        2.0
    )
    for path in [src / "alice" / "hello.wav", src / "note.wav"]:
        path.write_bytes(b"not audio any more")
    again = import_corpus("folder", src, out)  # durations come from the existing manifest
    assert again.count == 2 and again.hours == report.hours


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusImportError, match="unknown corpus kind"):
        import_corpus("commonvoice", tmp_path, tmp_path / "m.jsonl")
    with pytest.raises(CorpusImportError, match="not a folder"):
        import_corpus("folder", tmp_path / "missing", tmp_path / "m.jsonl")
    with pytest.raises(CorpusImportError, match="no utterances"):
        import_corpus("librispeech", tmp_path, tmp_path / "m.jsonl")


@pytest.mark.skipif(
    not Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz").exists()
    or not Path("/usr/share/asterisk/sounds/en").exists(),
    reason="Debian asterisk-core-sounds-en(-wav) not installed",
)
def test_asterisk_prompts_are_eval_only(tmp_path: Path) -> None:
    report = import_corpus("asterisk", None, tmp_path / "eval.jsonl")
    utts = read_manifest(tmp_path / "eval.jsonl")
    assert report.count > 400 and report.per_split == {"eval": report.count}
    assert all("[" not in u.text and u.voice == "asterisk:allison" for u in utts)
    assert any(u.text.startswith("Please enter your password") for u in utts)
