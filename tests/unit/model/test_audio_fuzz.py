"""model/audio.py under fuzzing: random bytes, format magics with noise, truncated and
bit-flipped files only ever raise its typed errors, and whatever decodes is a finite mono
float32 waveform."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model.audio import SUPPORTED_FORMATS, decode_audio
from model.errors import AudioDecodeError, AudioTooLongError
from tests.unit.model.test_audio import CODECS, encode, make_tone

FUZZ_ROUNDS = 60  # per seed file
MAGICS = [
    b"RIFF\x00\x00\x00\x00WAVE",
    b"fLaC",
    b"OggS",
    b"\xff\xfb",
    b"ID3\x03\x00\x00\x00\x00\x00\x00",
]


def _decode_or_typed_error(data: bytes, fmt: str | None) -> None:
    try:
        waveform = decode_audio(data, fmt, pcm_rate=16000, max_seconds=30)
    except (AudioDecodeError, AudioTooLongError):
        return
    assert waveform.dtype == torch.float32 and waveform.dim() == 1
    assert bool(torch.isfinite(waveform).all())


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_fuzzed_bytes_only_raise_typed_errors():
    rng = random.Random(1234)
    tone = np.stack([make_tone(8000, 0.3), make_tone(8000, 0.3, hz=700)], axis=1)
    seeds = [encode(tone, 8000 if c[1] != "OGG" else 16000, c[1], c[2]) for c in CODECS]
    for _ in range(FUZZ_ROUNDS):
        noise = rng.randbytes(rng.randint(1, 2000))
        _decode_or_typed_error(noise, None)
        _decode_or_typed_error(rng.choice(MAGICS) + noise, rng.choice([None, *SUPPORTED_FORMATS]))
    for seed in seeds:
        for size in range(0, 120, 3):
            _decode_or_typed_error(seed[:size], None)
        for _ in range(FUZZ_ROUNDS):
            mutated = bytearray(seed)
            for _ in range(rng.randint(1, 12)):
                # half the flips land in the header, where parsers are most fragile
                span = len(mutated) if rng.random() < 0.5 else min(len(mutated), 200)
                mutated[rng.randrange(span)] = rng.getrandbits(8)
            _decode_or_typed_error(bytes(mutated), rng.choice([None, *SUPPORTED_FORMATS]))
