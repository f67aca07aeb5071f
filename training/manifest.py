"""Corpus manifests: JSON Lines, one utterance a line (see DESIGN.md, "Formats").

A line holds `{"id", "audio", "text"}` plus the optional `"response"`, `"duration"`, `"voice"`,
`"split"`; any other key (e.g. `"augment"`, `"source"`) is kept in `Utterance.extra` and written
back unchanged. A relative `audio` path is relative to the manifest's folder: `read_manifest`
resolves it to an absolute path and `write_manifest` turns paths under that folder back into
relative ones, so a corpus folder can be moved whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.errors import ManifestFormatError

REQUIRED_KEYS = ("id", "audio", "text")
OPTIONAL_KEYS = ("response", "duration", "voice", "split")
SPLITS = ("train", "dev", "eval")  # eval: held out for independent evaluation, never trained on


@dataclass
class Utterance:
    """One manifest line; `audio` is absolute after `read_manifest`."""

    id: str
    audio: str
    text: str
    response: str | None = None
    duration: float | None = None  # s
    voice: str | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, base: Path | None = None) -> dict[str, Any]:
        """The JSON object of this line; `audio` relative to `base` when it lies under it."""
        line: dict[str, Any] = {"id": self.id, "audio": relative_audio(self.audio, base)}
        line["text"] = self.text
        for key in OPTIONAL_KEYS:
            if getattr(self, key) is not None:
                line[key] = getattr(self, key)
        line.update(self.extra)
        return line

    @classmethod
    def from_dict(cls, line: dict[str, Any], base: Path | None = None) -> Utterance:
        """An utterance from a parsed line; a relative `audio` is joined to `base`."""
        for key in REQUIRED_KEYS:
            if not isinstance(line.get(key), str) or not line[key]:
                raise ManifestFormatError(f"key {key!r} must be a non-empty string")
        if line.get("split") is not None and line["split"] not in SPLITS:
            raise ManifestFormatError(f"split must be one of {SPLITS}, got {line['split']!r}")
        audio = line["audio"]
        if base is not None and not os.path.isabs(audio):
            audio = str(base / audio)
        known = {k: line.get(k) for k in OPTIONAL_KEYS}
        extra = {k: v for k, v in line.items() if k not in REQUIRED_KEYS + OPTIONAL_KEYS}
        return cls(id=line["id"], audio=audio, text=line["text"], **known, extra=extra)


def relative_audio(audio: str, base: Path | None) -> str:
    """`audio` relative to `base` if it lies under `base`, else unchanged."""
    if base is None or not os.path.isabs(audio):
        return audio
    base_abs = os.path.abspath(base)
    audio_abs = os.path.abspath(audio)
    if os.path.commonpath([base_abs, audio_abs]) != base_abs:
        return audio
    return os.path.relpath(audio_abs, base_abs)


def read_manifest(path: str | Path, skip_bad: bool = False) -> list[Utterance]:
    """All utterances of a manifest, audio paths made absolute.

    A malformed line raises `ManifestFormatError` naming the file and line, unless
    `skip_bad` (used when resuming from a manifest an interrupted run was appending to, whose
    last line may be cut short).
    """
    path = Path(path)
    base = path.resolve().parent
    utterances = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                if not isinstance(line, dict):
                    raise ManifestFormatError("a line must be a JSON object")
                utterances.append(Utterance.from_dict(line, base))
            except (json.JSONDecodeError, ManifestFormatError) as err:
                if skip_bad:
                    continue
                raise ManifestFormatError(f"{path}:{number}: {err}") from err
    return utterances


def encode_lines(utterances: Iterable[Utterance], base: Path) -> str:
    """Manifest text for `utterances`, one JSON object a line."""
    lines = (json.dumps(u.to_dict(base), ensure_ascii=False) for u in utterances)
    return "".join(line + "\n" for line in lines)


def write_manifest(path: str | Path, utterances: Iterable[Utterance]) -> Path:
    """Write a manifest atomically (temp file in the same folder, then rename); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = encode_lines(utterances, path.resolve().parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def append_manifest(path: str | Path, utterances: Iterable[Utterance]) -> None:
    """Append lines to a manifest and flush them, so an interrupted step can resume from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = encode_lines(utterances, path.resolve().parent)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
