"""Augmentation of synthesized speech: speed, reverb and telephone band via sox, then additive
coloured noise at an SNR via numpy. `draw_augmentation` makes every random draw up front, and the
noise is seeded by the utterance id, so a rerun reproduces the same audio.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from training.config import SAMPLE_RATE, AugmentConfig
from training.engines import run_command
from training.errors import SynthesisError

PEAK_DBFS = -3.0  # dB, level every utterance is normalised to before noise is added
TELEPHONE_BAND = "300-3400"  # Hz
TELEPHONE_RATE = 8000  # Hz


def draw_augmentation(rng: random.Random, cfg: AugmentConfig) -> dict[str, Any]:
    """The augmentation steps for one utterance; an empty dict is clean audio."""
    chain: dict[str, Any] = {}
    if rng.random() < cfg.p_speed:
        chain["speed"] = round(rng.uniform(*cfg.speed_range), 3)
    if rng.random() < cfg.p_reverb:
        chain["reverb"] = round(rng.uniform(*cfg.reverberance_range), 1)
    if rng.random() < cfg.p_telephone:
        chain["telephone"] = True
    if rng.random() < cfg.p_noise:
        chain["noise"] = rng.choice(cfg.noise_colors)
        chain["snr_db"] = round(rng.uniform(*cfg.snr_range), 1)
    return chain


def color_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-power white, pink (1/f) or brown (1/f^2) noise, shaped in the frequency domain."""
    white = rng.standard_normal(n)  # [N]
    exponent = {"white": 0.0, "pink": 0.5, "brown": 1.0}[color]
    spectrum = np.fft.rfft(white)  # [N // 2 + 1]
    freqs = np.fft.rfftfreq(n)  # [N // 2 + 1]
    spectrum[1:] /= freqs[1:] ** exponent
    spectrum[0] = 0.0
    noise = np.fft.irfft(spectrum, n)  # [N]
    return noise / (np.sqrt(np.mean(noise**2)) + 1e-12)


def sox_effects(augment: dict[str, Any]) -> list[str]:
    """sox effect arguments for the speed, reverb and telephone steps, ending at 16 kHz."""
    effects = ["remix", "-", "gain", "-n", "-6"]
    if "speed" in augment:
        effects += ["speed", str(augment["speed"])]
    if "reverb" in augment:
        effects += ["reverb", str(augment["reverb"])]
    if augment.get("telephone"):
        effects += ["sinc", TELEPHONE_BAND, "rate", str(TELEPHONE_RATE)]
    return effects + ["rate", str(SAMPLE_RATE), "gain", "-n", str(PEAK_DBFS)]


def augment_audio(in_wav: Path, augment: dict[str, Any], seed: str, timeout_s: float) -> np.ndarray:
    """Engine output -> 16 kHz mono float32 with the augmentation chain applied."""
    cmd = [
        "sox",
        "-V1",
        str(in_wav),
        "-t",
        "raw",
        "-e",
        "floating-point",
        "-b",
        "32",
        "-c",
        "1",
        "-r",
        str(SAMPLE_RATE),
        "-",
        *sox_effects(augment),
    ]
    audio = np.frombuffer(run_command(cmd, timeout_s), dtype=np.float32).copy()  # [N]
    if audio.size == 0 or not np.isfinite(audio).all():
        raise SynthesisError(f"sox produced no usable audio from {in_wav}")
    if "noise" in augment:
        rng = np.random.default_rng(int.from_bytes(seed.encode()[-8:], "little"))
        power = np.mean(audio**2)
        noise = color_noise(audio.size, augment["noise"], rng)  # [N]
        audio = audio + noise * np.sqrt(power / 10 ** (augment["snr_db"] / 10))  # [N]
        audio = audio / max(1.0, float(np.abs(audio).max()) / 0.99)  # [N]
    return audio.astype(np.float32)
