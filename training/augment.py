"""Augmentation of speech: speed, pitch, reverb and telephone band via sox, then additive
coloured noise at an SNR via numpy. `draw_augmentation` makes every random draw up front, and the
noise is seeded by a hash of the utterance id, so a rerun reproduces the same audio. `synth`
augments as it renders; `augment_manifest` (`speechchat augment`) adds augmented copies of any
manifest's lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from training.config import SAMPLE_RATE, AugmentConfig
from training.engines import run_command
from training.errors import SynthesisError
from training.manifest import Utterance, read_manifest, write_manifest

log = logging.getLogger(__name__)

PEAK_DBFS = -3.0  # dB, level every utterance is normalised to before noise is added
TELEPHONE_BAND = "300-3400"  # Hz
TELEPHONE_RATE = 8000  # Hz
AUGMENT_TIMEOUT_S = 60.0  # s a sox run may take


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
    if cfg.p_pitch > 0 and rng.random() < cfg.p_pitch:
        chain["pitch_cents"] = round(rng.uniform(*cfg.pitch_cents_range))
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
    """sox effect arguments for the speed, pitch, reverb and telephone steps, ending at 16 kHz."""
    effects = ["remix", "-", "gain", "-n", "-6"]
    if "speed" in augment:
        effects += ["speed", str(augment["speed"])]
    if "pitch_cents" in augment:
        effects += ["pitch", str(augment["pitch_cents"])]
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
        rng = np.random.default_rng(
            int.from_bytes(hashlib.sha1(seed.encode()).digest()[:8], "little")
        )
        power = np.mean(audio**2)
        noise = color_noise(audio.size, augment["noise"], rng)  # [N]
        audio = audio + noise * np.sqrt(power / 10 ** (augment["snr_db"] / 10))  # [N]
        audio = audio / max(1.0, float(np.abs(audio).max()) / 0.99)  # [N]
    return audio.astype(np.float32)


def is_valid_flac(path: Path) -> bool:
    """A readable 16 kHz mono FLAC with samples in it."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, OSError):
        return False
    return (
        info.format == "FLAC"
        and info.samplerate == SAMPLE_RATE
        and info.channels == 1
        and (info.frames > 0)
    )


@dataclass(frozen=True)
class AugmentReport:
    out: str  # the manifest written
    lines: int  # its lines (copies of every source line, as rendered)
    rendered: int
    skipped: int  # already rendered by an earlier run
    failed: int
    seconds: float
    errors: list[str]


def augment_copy(
    utt: Utterance, copy: int, out_dir: Path, cfg: AugmentConfig
) -> tuple[Utterance, bool]:
    """Copy number `copy` of `utt`: its audio through a chain drawn for the copy's id, the same
    text, response and split; `augmented_from` names the source line. Also whether it was
    rendered now (False: an earlier run's file was valid)."""
    uid = copy_id(utt, copy)
    chain = draw_augmentation(random.Random(uid), cfg)
    target = augmented_path(out_dir, utt, copy)
    rendered = not is_valid_flac(target)
    if rendered:
        audio = augment_audio(Path(utt.audio), chain, uid, AUGMENT_TIMEOUT_S)  # [N]
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_suffix(".tmp.flac")
        sf.write(str(staged), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(staged, target)
    extra = {**utt.extra, "augment": chain, "augmented_from": utt.id}
    duration = round(sf.info(str(target)).duration, 3)
    line = dataclasses.replace(utt, id=uid, audio=str(target), duration=duration, extra=extra)
    return line, rendered


def augment_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    cfg: AugmentConfig,
    copies: int = 1,
    workers: int = 2,
    limit: int | None = None,
) -> AugmentReport:
    """`copies` augmented copies of every line of `manifest` (the first `limit` lines) into
    `out_dir/<manifest name>` and `out_dir/audio/`, keeping text and response, so a corpus that
    already has responses grows without asking the LLM again. Each copy's chain is drawn from its
    id, so a rerun renders the same audio; copies already on disk are not rendered again."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(u, c) for u in read_manifest(manifest)[:limit] for c in range(copies)]
    lines, errors, rendered = [], [], 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # the work runs in sox
        futures = [pool.submit(augment_copy, u, c, out_dir, cfg) for u, c in jobs]
        for (utt, copy), future in tqdm(
            zip(jobs, futures, strict=True), total=len(jobs), desc="augment", unit=" utt"
        ):
            try:
                line, fresh = future.result()
            except (SynthesisError, RuntimeError, OSError) as err:  # one bad file: skip it
                errors.append(f"{copy_id(utt, copy)}: {err}")
                log.warning("augment failed: %s", errors[-1])
                continue
            lines.append(line)
            rendered += fresh
    out = out_dir / Path(manifest).name
    write_manifest(out, lines)
    return AugmentReport(
        out=str(out), lines=len(lines), rendered=rendered, skipped=len(lines) - rendered,
        failed=len(errors), seconds=round(time.perf_counter() - start, 2), errors=errors[:20],
    )  # fmt: skip


def copy_id(utt: Utterance, copy: int) -> str:
    return f"{utt.id}+aug{copy}"


def augmented_path(out_dir: Path, utt: Utterance, copy: int) -> Path:
    uid = copy_id(utt, copy)
    return out_dir / "audio" / hashlib.sha1(uid.encode()).hexdigest()[:2] / f"{uid}.flac"
