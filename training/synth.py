"""Step 2, speech synthesis: render the sentence set with several engines, augment, store FLAC.

Each utterance is `<engine>:<voice>` (engines in `training/engines.py`) speaking one sentence at a
drawn rate and pitch, then an augmentation chain (`training/augment.py`: speed, reverb, telephone
band via sox; additive noise at an SNR via numpy), every draw from an RNG seeded by the utterance
id so a rerun reproduces it. Output: 16 kHz mono FLAC under `<out>/audio/<split>/` and one
manifest per split (`train.jsonl`, `dev.jsonl`, `eval.jsonl`); training code reads `train.jsonl`
only, and `eval.jsonl` never. The `synthesize_<engine>` functions are re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
from tqdm import tqdm

from training.augment import augment_audio, draw_augmentation, is_valid_flac
from training.config import SAMPLE_RATE, SynthConfig
from training.corpus import Sentence, read_sentences
from training.engines import (
    SYNTHESIZERS,
    split_voice,
    synthesize_espeak,
    synthesize_festival,
    synthesize_flite,
    synthesize_piper,
    voice_available,
)
from training.errors import SynthesisError
from training.manifest import Utterance, append_manifest, read_manifest, write_manifest

__all__ = [  # the synthesize_<engine> functions live in training.engines
    "RenderPlan",
    "SynthReport",
    "SynthesisError",
    "choose_voice",
    "count_by",
    "is_valid_flac",
    "plan_to_utterance",
    "plan_utterances",
    "render_safely",
    "render_utterance",
    "resume_done",
    "run_plans",
    "synthesize_corpus",
    "synthesize_espeak",
    "synthesize_festival",
    "synthesize_flite",
    "synthesize_piper",
    "voice_pool",
]

log = logging.getLogger(__name__)

DEV_VOICE_SHARE = 0.5  # of dev sentences spoken by a dev-only voice


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


def choose_voice(rng: random.Random, pool: tuple[str, ...], weights: dict[str, float]) -> str:
    """An engine drawn by weight among those in `pool`, then one of its voices uniformly."""
    engines = sorted({split_voice(v)[0] for v in pool})
    engine_weights = [weights.get(e, 0.0) for e in engines]
    if sum(engine_weights) <= 0:
        engine_weights = [1.0] * len(engines)
    engine = rng.choices(engines, engine_weights)[0]
    return rng.choice([v for v in pool if split_voice(v)[0] == engine])


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
