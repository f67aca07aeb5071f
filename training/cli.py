"""`speechchat` verbs of the training pipeline; each parses arguments and calls one function."""

from __future__ import annotations

import argparse
from pathlib import Path

from model.config import ENCODER_KINDS


def add_corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("data/corpus/sentences.jsonl"))
    p.add_argument("--recipe", default="default", help="recipe name or YAML file")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")


def run_corpus(args: argparse.Namespace) -> int:
    from training.config import load_recipe
    from training.corpus import build_corpus

    print(build_corpus(args.out, load_recipe(args.recipe).corpus, force=args.force))
    return 0


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sentences", type=Path, help="sentence set (.jsonl from `corpus`, or .txt)")
    p.add_argument("--out", type=Path, default=Path("data/corpus"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="render only the first N sentences")
    p.add_argument("--recipe", default="default")


def run_synth(args: argparse.Namespace) -> int:
    from training.config import load_recipe
    from training.synth import synthesize_corpus

    cfg = load_recipe(args.recipe).synth
    print(synthesize_corpus(args.sentences, args.out, args.workers, cfg, args.limit))
    return 0


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["librispeech", "mls", "folder"])
    p.add_argument("src", type=Path, help="the corpus folder")
    p.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")


def run_import(args: argparse.Namespace) -> int:
    from training.importers import import_corpus

    print(import_corpus(args.kind, args.src, args.out))
    return 0


def add_augment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="lines to copy (text and response kept)")
    p.add_argument("--out", type=Path, required=True, help="folder for the manifest and audio")
    p.add_argument("--copies", type=int, default=1, help="augmented copies of each line")
    p.add_argument("--limit", type=int, default=None, help="only the first N lines")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--pitch-cents", type=float, nargs=2, default=(150.0, 500.0), metavar=("LO", "HI")
    )
    for step, default in (("pitch", 1.0), ("speed", 0.0), ("reverb", 0.0), ("telephone", 0.0),
                          ("noise", 0.0)):  # fmt: skip
        p.add_argument(f"--p-{step}", type=float, default=default, help=f"chance of {step}")


def run_augment(args: argparse.Namespace) -> int:
    from training.augment import augment_manifest
    from training.config import AugmentConfig

    cfg = AugmentConfig(
        p_speed=args.p_speed, p_reverb=args.p_reverb, p_telephone=args.p_telephone,
        p_noise=args.p_noise, p_pitch=args.p_pitch, pitch_cents_range=tuple(args.pitch_cents),
    )  # fmt: skip
    print(augment_manifest(args.manifest, args.out, cfg, args.copies, args.workers, args.limit))
    return 0


def add_respond_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: rewrite the manifest")
    p.add_argument("--llm", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="the LLM's: float32, bfloat16 (CUDA's default)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32, help="prompts in flight (or per batch)")
    p.add_argument(
        "--engine",
        choices=["worker", "generate"],
        default="worker",
        help="the server's worker (continuous batching) or transformers' generate",
    )


def run_respond(args: argparse.Namespace) -> int:
    from training.responses import respond_manifest

    respond_manifest(
        args.manifest,
        args.out,
        args.llm,
        args.device,
        args.system,
        args.max_tokens,
        args.batch_size,
        args.engine,
        args.dtype,
    )
    return 0


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """What every training step takes: data, run folder, recipe, schedule, device, time limit."""
    p.add_argument(
        "--manifest",
        type=Path,
        action="append",
        required=True,
        help="manifest(s); train lines train, dev lines measure (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="run folder (resumes if it exists)")
    p.add_argument("--recipe", default=None, help="recipe name or YAML file")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock limit")


def _run_overrides(args: argparse.Namespace) -> dict:
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_minutes": args.max_minutes,
    }


def _add_training_common(p: argparse.ArgumentParser) -> None:
    _add_run_arguments(p)
    p.add_argument("--workers", type=int, default=None, help="data loader workers")
    p.add_argument("--encoder-kind", choices=list(ENCODER_KINDS), default=None)
    p.add_argument(
        "--init",
        default=None,
        help='start from this encoder checkpoint ("default": the shipped one)',
    )
    p.add_argument(
        "--frame-cache", default=None, help="folder caching a frozen Whisper's outputs (whisper)"
    )


def _common_overrides(args: argparse.Namespace) -> dict:
    return {
        **_run_overrides(args),
        "num_workers": args.workers,
        "encoder_kind": args.encoder_kind,
        "init": args.init,
        "frame_cache": args.frame_cache,
    }


def add_pretrain_ctc_arguments(p: argparse.ArgumentParser) -> None:
    _add_training_common(p)


def run_pretrain_ctc(args: argparse.Namespace) -> int:
    from training.config import CTCConfig, load_step_config
    from training.ctc import pretrain_ctc

    cfg = load_step_config(CTCConfig, "ctc", args.recipe, **_common_overrides(args))
    print(pretrain_ctc(cfg, args.manifest, args.out, args.device))
    return 0


def add_tune_asr_arguments(p: argparse.ArgumentParser) -> None:
    _add_run_arguments(p)  # its recipe section is asr_tune:, dev lines measure WER
    p.add_argument("--rank", type=int, default=None, help="LoRA rank")
    p.add_argument("--whisper", default=None, help="'default' or a local HF Whisper dir")


def run_tune_asr(args: argparse.Namespace) -> int:
    from training.asr_tune import tune_asr
    from training.config import AsrTuneConfig, load_step_config

    overrides = {**_run_overrides(args), "rank": args.rank, "whisper_source": args.whisper}
    cfg = load_step_config(AsrTuneConfig, "asr_tune", args.recipe, **overrides)
    print(tune_asr(cfg, args.manifest, args.out, args.device))
    return 0


def add_align_arguments(p: argparse.ArgumentParser) -> None:
    _add_training_common(p)
    p.add_argument("--kl-weight", type=float, default=None, help="> 0 adds KL distillation")
    p.add_argument("--ctc-weight", type=float, default=None, help="> 0 adds token CTC")
    p.add_argument(
        "--anchor-weight", type=float, default=None, help="> 0 pulls towards the untrained start"
    )
    p.add_argument("--max-response-tokens", type=int, default=None, help="truncate targets")
    p.add_argument(
        "--trainable-layers", type=int, default=None, help="whisper: top layers trained too"
    )
    p.add_argument(
        "--whisper-lr-scale", type=float, default=None, help="their rate / the adapter's"
    )


def run_align(args: argparse.Namespace) -> int:
    from training.align import align
    from training.config import AlignConfig, load_step_config

    cfg = load_step_config(
        AlignConfig,
        "align",
        args.recipe,
        **_common_overrides(args),
        kl_weight=args.kl_weight,
        ctc_weight=args.ctc_weight,
        anchor_weight=args.anchor_weight,
        max_response_tokens=args.max_response_tokens,
        trainable_layers=args.trainable_layers,
        whisper_lr_scale=args.whisper_lr_scale,
    )
    print(align(cfg, args.manifest, args.out, args.device))
    return 0


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--encoder", required=True, help="checkpoint dir or 'default'")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: next to it)")
    p.add_argument("--llm", default="default")
    p.add_argument("--split", default=None, help="only lines of this split (default: all)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--two-turn", type=int, default=16, help="two-turn conversations per case")
    p.add_argument("--dtype", default=None, help="the LLM's: float32, bfloat16 (CUDA's default)")
    p.add_argument(
        "--stock-cascade",
        action="store_true",
        help="cascade with plain tiny.en, not the encoder's own (LoRA-tuned) Whisper",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    out = args.out or args.manifest.with_suffix("").with_name(args.manifest.stem + "-eval")
    evaluate(
        args.manifest,
        args.encoder,
        out,
        args.llm,
        args.split,
        args.limit,
        args.device,
        args.two_turn,
        args.dtype,
        args.stock_cascade,
    )
    return 0


def add_scale_correction_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("encoder", help="a whisper_decoder checkpoint dir or 'default'")
    p.add_argument("--scale", type=float, required=True, help="weight of the trained correction")
    p.add_argument("--out", type=Path, required=True, help="checkpoint dir to write")
    p.add_argument("--llm", default="default")
    p.add_argument("--asr-beams", type=int, default=None, help="Whisper's beams (1: greedy)")
    p.add_argument(
        "--whisper-lora", type=Path, default=None, help="a tune-asr adapter folder for Whisper"
    )


def run_scale_correction(args: argparse.Namespace) -> int:
    from training.interpolate import scale_correction

    path = scale_correction(
        args.encoder, args.scale, args.out, args.llm, args.asr_beams, args.whisper_lora
    )
    print(path)
    return 0


def add_synth_qa_arguments(p: argparse.ArgumentParser) -> None:
    from training.spoken_qa import EVAL_VOICES

    p.add_argument("--out", type=Path, default=Path("data/qa"))
    p.add_argument(
        "--voice",
        action="append",
        default=None,
        help=f"engine:name, repeatable (default: the reserved {', '.join(EVAL_VOICES)})",
    )
    p.add_argument(
        "--split",
        choices=("eval", "dev"),
        default="eval",
        help="dev: a recipe's dev voices, for choosing encoders; eval: reserved voices only",
    )


def run_synth_qa(args: argparse.Namespace) -> int:
    from training.spoken_qa import EVAL_VOICES, synthesize_spoken_qa

    voices = tuple(args.voice or EVAL_VOICES)
    print(synthesize_spoken_qa(args.out, voices=voices, split=args.split))
    return 0
