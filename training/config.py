"""Training configuration: frozen dataclasses, loaded from YAML recipes in `training/recipes/`.

One of the three homes for configuration (see STYLE.md). A recipe is a YAML mapping with one
section per pipeline step (`corpus:`, `synth:`, ...); `load_recipe` builds the sections this
module knows and fails on unknown keys inside them, naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"
SAMPLE_RATE = 16000  # Hz, what every synthesized or converted utterance is stored at

# voice ids are "<engine>:<voice>"; see training/synth.py for the engines
DEFAULT_TRAIN_VOICES = (
    "piper:en_US-joe-medium",
    "espeak:en-us",
    "espeak:en-us+m3",
    "espeak:en-us+f2",
    "espeak:en-us+f4",
    "espeak:en-us+klatt4",
    "espeak:en-gb+m5",
    "espeak:en-gb+f3",
    "espeak:en-gb-x-rp+m2",
    "espeak:en-gb-x-rp+f5",
    "espeak:en-gb-scotland+m4",
    "espeak:en-gb-x-gbclan+f1",
    "espeak:en-gb-x-gbcwmd+m6",
    "espeak:en-us+benjamin",
    "espeak:en-us+Annie",
    "flite:kal",
    "flite:awb",
    "festival:kal_diphone",
    "festival:ked_diphone",
)
DEFAULT_DEV_VOICES = (
    "espeak:en-029+m7",
    "espeak:en-us-nyc+f5",
    "espeak:en-us+klatt2",
    "flite:rms",
)
# held out for independent evaluation: never rendered for train or dev sentences
DEFAULT_EVAL_VOICES = ("flite:slt", "festival:cmu_us_slt_arctic_hts")


@dataclass(frozen=True)
class CorpusConfig:
    """Step 1: which offline texts become the sentence set, and how it is filtered and split."""

    min_words: int = 3
    max_words: int = 30
    dev_fraction: float = 0.04  # of sentences, by hash of the sentence
    eval_fraction: float = 0.03  # of sentences, by hash; spoken only by eval voices
    sources: tuple[str, ...] = ("wordnet", "fortunes", "gcide", "devil", "jargon", "templates")
    # caps keep the set near 40,000 sentences and the archaic GCIDE quotations a small share
    max_per_source: dict[str, int] = field(
        default_factory=lambda: {"wordnet": 14000, "fortunes": 9000, "gcide": 3000, "jargon": 2500}
    )
    fortune_exclude: tuple[str, ...] = (
        "ascii-art",
        "art",
        "ethnic",
        "men-women",
        "drugs",
        "perl",
        "translate-me",
        "zippy",
    )
    template_sentences: int = 12000  # questions and requests built from WordNet lemmas
    llm_questions: int = 0  # questions and requests written by the frozen LLM (0: off)
    llm: str = "default"  # spec for model.llm.load_llm
    llm_batch_size: int = 16
    llm_max_new_tokens: int = 32  # tokens
    llm_temperature: float = 0.6
    seed: int = 0
    wordnet_dir: str = "/usr/share/wordnet"
    fortune_dir: str = "/usr/share/games/fortunes"
    dictd_dir: str = "/usr/share/dictd"

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(
                f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}"
            )
        if (
            self.dev_fraction < 0
            or self.eval_fraction < 0
            or (self.dev_fraction + self.eval_fraction >= 1)
        ):
            raise ValueError("dev_fraction and eval_fraction must be >= 0 and sum below 1")


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation chain drawn per utterance by a seeded RNG; each step independently."""

    p_speed: float = 0.3
    speed_range: tuple[float, float] = (0.9, 1.1)  # tempo and pitch factor (sox `speed`)
    p_reverb: float = 0.2
    reverberance_range: tuple[float, float] = (10.0, 70.0)  # % (sox `reverb`)
    p_telephone: float = 0.1  # 300-3400 Hz band, 8 kHz and back
    p_noise: float = 0.3
    snr_range: tuple[float, float] = (5.0, 30.0)  # dB
    noise_colors: tuple[str, ...] = ("white", "pink", "brown")
    # pitch and formants shifted together, duration kept (sox `pitch`): lower voices to higher
    # ones; `synth` leaves it off (0), `augment` turns it on. Drawn only when p_pitch > 0, so the
    # chains drawn for a corpus rendered before it existed stay the same.
    p_pitch: float = 0.0
    pitch_cents_range: tuple[float, float] = (150.0, 500.0)


@dataclass(frozen=True)
class SynthConfig:
    """Step 2: voices, prosody ranges and augmentation for rendering the sentence set."""

    train_voices: tuple[str, ...] = DEFAULT_TRAIN_VOICES
    dev_voices: tuple[str, ...] = DEFAULT_DEV_VOICES  # render dev sentences only
    eval_voices: tuple[str, ...] = DEFAULT_EVAL_VOICES  # render eval sentences only
    engine_weights: dict[str, float] = field(
        default_factory=lambda: {"piper": 0.35, "espeak": 0.35, "flite": 0.15, "festival": 0.15}
    )
    renditions: int = 1  # voices per sentence
    rate_range: tuple[float, float] = (0.85, 1.15)  # speaking rate, 1.0 = the voice's own
    pitch_range: tuple[float, float] = (0.8, 1.25)  # pitch factor where the engine has one
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_seconds: float = 30.0  # s, longer renderings are dropped
    timeout_s: float = 120.0  # s, per engine call
    seed: int = 0

    def __post_init__(self) -> None:
        overlap = (set(self.train_voices) | set(self.dev_voices)) & set(self.eval_voices)
        if overlap:
            raise ValueError(f"eval voices must never render train or dev text: {sorted(overlap)}")
        if set(self.train_voices) & set(self.dev_voices):
            raise ValueError("a voice cannot be both a train and a dev voice")
        if self.renditions < 1:
            raise ValueError(f"renditions must be >= 1, got {self.renditions}")


@dataclass(frozen=True)
class Recipe:
    """The sections of one recipe file that the data steps read."""

    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


def build_config(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """A dataclass `cls` from a mapping: nested dataclasses built, lists made tuples."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {key: coerce_value(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    return cls(**kwargs)


def coerce_value(hint: Any, value: Any, where: str) -> Any:
    """YAML value -> the field's type (dataclass, tuple); other values pass through."""
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, where)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file, or the name of one in `training/recipes/` without `.yaml`."""
    path = Path(path)
    if not path.exists() and (RECIPES_DIR / f"{path}.yaml").exists():
        return RECIPES_DIR / f"{path}.yaml"
    return path


def read_recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load_recipe(path: str | Path) -> Recipe:
    """The `corpus` and `synth` sections of a recipe file (missing sections take defaults).

    `path` is a file, or the name of one in `training/recipes/` without `.yaml`. Other
    sections (later pipeline steps) are left for their own loaders.
    """
    path = resolve_recipe(path)
    data = read_recipe(path)
    hints = typing.get_type_hints(Recipe)
    sections = {
        name: build_config(hints[name], data[name], f"{path}:{name}")
        for name in ("corpus", "synth")
        if name in data
    }
    return Recipe(**sections)


@dataclass(frozen=True)
class AlignConfig:
    """Step 6: modal-invariance alignment of an encoder to the frozen LLM."""

    llm: str = "default"
    system_prompt: str | None = None  # None: the chat template's own default
    encoder_kind: str = "whisper"
    encoder_preset: str = "small"  # conformer sizes (model.config.ENCODER_PRESETS)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # start from this encoder checkpoint (e.g. CTC-pretrained)
    # whisper: train this many top Whisper layers with the adapter (None: as the preset or the
    # init checkpoint says), at `whisper_lr_scale` times the adapter's learning rate
    trainable_layers: int | None = None
    whisper_lr_scale: float = 0.1
    steps: int = 2000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    kl_weight: float = 0.0  # > 0 adds KL to the text-prompted LLM (Ultravox-style)
    kl_temperature: float = 1.0
    # > 0 adds token CTC on the transcript (training/token_ctc.py): spoken words kept near the
    # typed words' embeddings while the answers are learned
    ctc_weight: float = 0.0
    ctc_min_count: int = 2  # tokens seen fewer times in the train transcripts are not classified
    # > 0 penalises the outputs' departure from the encoder's untrained start (whisper_decoder:
    # the correction's squared norm over the mixture's), keeping the spoken words' embeddings
    # near the typed words' while the answers are learned
    anchor_weight: float = 0.0
    max_response_tokens: int = 48  # tokens; responses are truncated for speed
    max_audio_seconds: float = 30.0  # s
    frame_cache: str | None = None  # folder for the frozen Whisper's outputs, computed once
    eval_every: int = 200  # steps
    eval_batches: int = 20
    save_every: int = 200  # steps
    num_workers: int = 2
    max_minutes: float | None = None  # min of wall clock; stop early (checkpointed) when reached
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> AlignConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CTCConfig:
    """Step 5: CTC pretraining (conformer: characters; whisper adapter: the LLM's tokens)."""

    llm: str = "default"  # the LLM whose width (and, for whisper, tokens) the encoder learns
    system_prompt: str | None = None  # whisper: the template the typed tokens are rendered in
    encoder_kind: str = "conformer"
    encoder_preset: str = "small"
    encoder_overrides: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # whisper: start from this encoder checkpoint
    trainable_layers: int | None = None  # whisper: as AlignConfig's (None: as preset or init)
    whisper_lr_scale: float = 0.1  # whisper: trained Whisper layers' rate / the adapter's
    min_token_count: int = 2  # whisper: LLM tokens rarer than this in train text are not targets
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    max_audio_seconds: float = 30.0  # s
    frame_cache: str | None = None  # whisper: folder for the frozen encoder's outputs
    eval_every: int = 500  # steps
    eval_batches: int = 10
    num_workers: int = 2
    max_minutes: float | None = None  # min of wall clock; stop early when reached
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AsrTuneConfig:
    """Whisper's own ASR fine-tuned on the corpus's (audio, transcript) pairs, as LoRA adapters."""

    whisper_source: str = "default"  # the Whisper the adapters attach to
    rank: int = 16  # LoRA rank of every adapted projection
    alpha: float = 32.0  # LoRA scale numerator (scale = alpha / rank)
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    steps: int = 500
    batch_size: int = 4
    lr: float = 5e-4
    warmup_steps: int = 25
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_audio_seconds: float = 30.0  # s, one Whisper window; longer lines are skipped
    eval_every: int = 100  # steps; dev WER (greedy) on up to `dev_lines`
    dev_lines: int = 128
    save_every: int = 50  # steps
    max_minutes: float | None = None  # min of wall clock; stop early when reached
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_step_config(cls: type, section: str, path: str | Path | None, **overrides: Any) -> Any:
    """One step's section of a recipe (defaults when absent), with non-None overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        data = read_recipe(path).get(section, {})
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return build_config(cls, data, f"{path}:{section}")
