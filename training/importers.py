"""Step 3, real corpora import: LibriSpeech, Multilingual LibriSpeech, a folder of audio + .txt,
and Asterisk's recorded telephony prompts (eval only) become manifests.

Audio is referenced where it lies (no copy): the model's audio front-end decodes and resamples
any rate. LibriSpeech and MLS transcripts are upper or lower case without punctuation; they are
sentence-cased (`I` kept upper) so the LLM sees ordinary text. Split comes from the corpus's own
folder names (`train-*`, `dev-*`, `test-*` -> train / dev / eval). Re-importing reuses the
durations of an existing manifest, so a rerun reads no audio headers again.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from training.errors import CorpusImportError
from training.manifest import Utterance, read_manifest, write_manifest

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3", ".opus")
ASTERISK_TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en")
KINDS = ("librispeech", "mls", "folder", "asterisk")


@dataclass
class ImportReport:
    """What `import_corpus` wrote."""

    manifest: str
    kind: str
    count: int
    skipped: int
    per_split: dict[str, int]
    hours: float


def sentence_case(text: str) -> str:
    """'HELLO I AM HERE' -> 'Hello I am here.' (transcripts without case or punctuation)."""
    words = text.strip().lower().split()
    if not words:
        return ""
    words = ["I" + w[1:] if w == "i" or w.startswith("i'") else w for w in words]
    joined = " ".join(words)
    return joined[0].upper() + joined[1:] + ("" if joined[-1] in ".?!" else ".")


def split_of(path: Path, root: Path) -> str:
    """train / dev / eval from the corpus's folder names between `root` and the file."""
    parts = [p.lower() for p in path.relative_to(root).parts[:-1]] + [root.name.lower()]
    for part in parts:
        if part.startswith("test") or "-test" in part or "_test" in part:
            return "eval"
        if part.startswith("dev") or "-dev" in part or "_dev" in part:
            return "dev"
    return "train"


def iter_librispeech(src: Path) -> Iterator[tuple[str, Path, str, str, str]]:
    """(id, audio, text, voice, split) from `<spk>/<chapter>/<spk>-<chapter>.trans.txt` files."""
    for trans in sorted(src.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{utt_id}.flac"
            speaker = utt_id.split("-")[0]
            yield utt_id, audio, sentence_case(text), f"librispeech:{speaker}", split_of(trans, src)


def iter_mls(src: Path) -> Iterator[tuple[str, Path, str, str, str]]:
    """(id, audio, text, voice, split) from `transcripts.txt` + `audio/<spk>/<book>/<id>.flac`."""
    for trans in sorted(src.rglob("transcripts.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.partition("\t")
            speaker, book = utt_id.split("_")[:2]
            folder = trans.parent / "audio" / speaker / book
            audio = next(
                (
                    folder / f"{utt_id}{s}"
                    for s in AUDIO_SUFFIXES
                    if (folder / f"{utt_id}{s}").exists()
                ),
                folder / f"{utt_id}.flac",
            )
            yield utt_id, audio, sentence_case(text), f"mls:{speaker}", split_of(trans, src)


def iter_folder(src: Path) -> Iterator[tuple[str, Path, str, str, str]]:
    """(id, audio, text, voice, split) for each audio file with a same-named `.txt` beside it."""
    for audio in sorted(p for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
        txt = audio.with_suffix(".txt")
        if not txt.exists():
            log.warning("no transcript for %s, skipped", audio)
            continue
        text = " ".join(txt.read_text(encoding="utf-8").split())
        rel = audio.relative_to(src).with_suffix("")
        utt_id = re.sub(r"[^A-Za-z0-9_-]+", "_", str(rel))
        speaker = rel.parts[0] if len(rel.parts) > 1 else src.name
        yield utt_id, audio, text, f"folder:{speaker}", split_of(audio, src)


def iter_asterisk(
    src: Path, transcripts: Path = ASTERISK_TRANSCRIPTS
) -> Iterator[tuple[str, Path, str, str, str]]:
    """Asterisk's English prompts (`name: transcript` list); split is always eval."""
    opener = gzip.open if transcripts.suffix == ".gz" else open
    with opener(transcripts, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            name, sep, text = line.partition(":")
            text = " ".join(text.split())
            if not sep or line.startswith(";") or not text or "[" in text:
                continue  # comments and tones ("[this is a simple beep tone]")
            audio = next(
                (src / f"{name}{s}" for s in AUDIO_SUFFIXES if (src / f"{name}{s}").exists()), None
            )
            if audio is not None:
                yield (
                    "asterisk-" + re.sub(r"[^A-Za-z0-9_-]+", "_", name),
                    audio,
                    text,
                    ("asterisk:allison"),
                    "eval",
                )


def iter_corpus(kind: str, src: Path, transcripts: Path | None) -> Iterator[tuple]:
    """The rows of one corpus kind."""
    if kind == "librispeech":
        return iter_librispeech(src)
    if kind == "mls":
        return iter_mls(src)
    if kind == "folder":
        return iter_folder(src)
    if kind == "asterisk":
        return iter_asterisk(src, transcripts or ASTERISK_TRANSCRIPTS)
    raise CorpusImportError(f"unknown corpus kind {kind!r}; choose from {KINDS}")


def import_corpus(
    kind: str,
    src: str | Path | None,
    out_manifest: str | Path,
    transcripts: str | Path | None = None,
) -> ImportReport:
    """Write a manifest for a real corpus; returns counts (read the manifest for the lines).

    `kind` is "librispeech" (`<spk>/<chapter>/<spk>-<chapter>.trans.txt` + `.flac`), "mls"
    (`transcripts.txt` + `audio/<spk>/<book>/<id>.flac`, any split folder below `src`),
    "folder" (each audio file with a `.txt` transcript of the same name) or "asterisk" (the
    Debian `asterisk-core-sounds-en` prompts; `src` defaults to their folder, `transcripts` to
    the packaged list; eval split only). Lines whose audio is missing or unreadable are skipped
    with a warning. Audio paths are written relative to the manifest's folder where possible.
    """
    src = Path(src) if src else ASTERISK_SOUNDS
    if not src.is_dir():
        raise CorpusImportError(f"{kind} source {src} is not a folder")
    out_manifest = Path(out_manifest)
    known = {}
    if out_manifest.exists():
        known = {u.audio: u.duration for u in read_manifest(out_manifest, skip_bad=True)}
    rows = iter_corpus(kind, src.resolve(), Path(transcripts) if transcripts else None)
    utterances, skipped = [], 0
    for utt_id, audio, text, voice, split in tqdm(rows, desc=f"import {kind}", unit=" utt"):
        duration = known.get(str(audio)) or audio_duration(audio)
        if duration is None or not text:
            skipped += 1
            continue
        utterances.append(
            Utterance(
                id=utt_id, audio=str(audio), text=text, duration=duration, voice=voice, split=split
            )
        )
    if not utterances:
        raise CorpusImportError(f"no utterances found in {src} for kind {kind!r}")
    write_manifest(out_manifest, utterances)
    log.info("imported %d %s utterances -> %s", len(utterances), kind, out_manifest)
    return ImportReport(
        manifest=str(out_manifest),
        kind=kind,
        count=len(utterances),
        skipped=skipped,
        per_split=dict(Counter(u.split for u in utterances)),
        hours=round(sum(u.duration or 0.0 for u in utterances) / 3600, 3),
    )


def audio_duration(audio: Path) -> float | None:
    """Seconds of audio from the file header, or None (with a warning) if it cannot be read."""
    try:
        return round(sf.info(str(audio)).duration, 3)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        log.warning("unreadable audio %s skipped: %s", audio, err)
        return None
