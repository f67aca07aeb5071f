"""Real speech for the benchmarks: sentences spoken by espeak-ng (a Debian package, offline),
padded with silence to a fixed length where every turn should cost the encoder the same.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import torch

from model.audio import load_audio_file
from model.config import SAMPLE_RATE

WORDS_PER_MINUTE = 150  # espeak-ng's speaking rate
SPOKEN_TURNS = (  # ten questions of 4-5 s at that rate, one per turn of a session
    "What is the capital of France, and what river runs through the middle of it?",
    "Could you tell me how many legs a spider has and why it needs so many?",
    "Which planet in our solar system is the largest, and how far away is it?",
    "Please name three animals that live in the ocean and eat only small fish.",
    "How long does it take to boil an egg so that the middle stays soft?",
    "What is the opposite of night, and when does the sun rise in the summer?",
    "Can you suggest a good name for a small brown dog that likes to run?",
    "Why is the sky blue on a clear day but red when the sun goes down?",
    "Tell me a short fact about honey bees and the flowers that they visit.",
    "What should I pack for a weekend trip to the mountains in the winter?",
)


def speak(text: str, seconds: float | None = None) -> torch.Tensor:
    """`text` spoken by espeak-ng -> float32 waveform [T_wav] at 16 kHz, padded with silence
    (or cut) to `seconds` when given."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-s", str(WORDS_PER_MINUTE), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        wav = load_audio_file(path)  # [T_wav]
    if seconds is None:
        return wav
    n = int(seconds * SAMPLE_RATE)
    return torch.nn.functional.pad(wav[:n], (0, max(0, n - wav.shape[0])))  # [n]


def spoken_turns(seconds: float) -> list[torch.Tensor]:
    """SPOKEN_TURNS as waveforms [T_wav] of `seconds` each."""
    return [speak(text, seconds) for text in SPOKEN_TURNS]
