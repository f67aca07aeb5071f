"""Manifests: JSON Lines round trip, relative audio paths, atomic writes, appends, bad lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.errors import ManifestFormatError
from training.manifest import (
    Utterance,
    append_manifest,
    read_manifest,
    write_manifest,
)


def make_utterances(folder: Path) -> list[Utterance]:
    return [
        Utterance(
            id="a",
            audio=str(folder / "audio" / "a.flac"),
            text="Hello there.",
            duration=1.25,
            voice="espeak:en-us",
            split="train",
            extra={"augment": {"noise": "pink", "snr_db": 12.0}},
        ),
        Utterance(
            id="b",
            audio="/elsewhere/b.wav",
            text="What time is it?",
            response="It is noon.",
            split="dev",
        ),
    ]


def test_round_trip_keeps_fields_and_makes_audio_relative(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    utts = make_utterances(tmp_path)
    write_manifest(path, utts)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["audio"] == "audio/a.flac"  # under the manifest's folder: relative
    assert lines[1]["audio"] == "/elsewhere/b.wav"  # outside it: unchanged
    assert "response" not in lines[0] and lines[1]["response"] == "It is noon."
    assert lines[0]["augment"] == {"noise": "pink", "snr_db": 12.0}
    back = read_manifest(path)
    assert back == utts  # relative paths are resolved against the manifest's folder again


def test_moved_folder_still_resolves(tmp_path: Path) -> None:
    write_manifest(tmp_path / "old" / "m.jsonl", make_utterances(tmp_path / "old"))
    (tmp_path / "old").rename(tmp_path / "new")
    back = read_manifest(tmp_path / "new" / "m.jsonl")
    assert back[0].audio == str(tmp_path / "new" / "audio" / "a.flac")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    write_manifest(path, make_utterances(tmp_path))
    write_manifest(path, make_utterances(tmp_path)[:1])
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]
    assert len(read_manifest(path)) == 1


def test_append_adds_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    first, second = make_utterances(tmp_path)
    append_manifest(path, [first])
    append_manifest(path, [second])
    assert [u.id for u in read_manifest(path)] == ["a", "b"]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"id": "x", "audio": "a.wav"}', "'text'"),
        ('{"id": "x", "audio": "a.wav", "text": "hi", "split": "test"}', "split"),
        ("[1, 2]", "JSON object"),
        ('{"id": "x", "audio": ', "Expecting value"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "m.jsonl"
    good = '{"id": "ok", "audio": "a.wav", "text": "fine"}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(ManifestFormatError, match=rf"m.jsonl:2: .*{message}"):
        read_manifest(path)
    assert [u.id for u in read_manifest(path, skip_bad=True)] == ["ok"]
