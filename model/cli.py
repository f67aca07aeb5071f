"""The `speechchat` command: a thin dispatcher; each package registers its own verbs.

Every verb parses its arguments and calls one library function (STYLE.md: the function is what
tests call). Packages are imported only when their verb runs, so `speechchat --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# verb -> (module holding `add_<verb>_arguments(parser)` and `run_<verb>(args)`, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "serve": (
        "server.cli",
        "serve the HTTP/WebSocket API (default: SmolLM2 + the shipped encoder)",
    ),
    "transcribe": (
        "model.cli_verbs",
        "transcribe audio files with the cascade ASR (Whisper tiny.en)",
    ),
    "reply": ("model.cli_verbs", "answer one text or audio prompt locally, no server"),
    "corpus": ("training.cli", "build the English sentence set from offline sources"),
    "synth": ("training.cli", "synthesize a sentence set to speech (16 kHz flac + manifests)"),
    "import": ("training.cli", "import LibriSpeech, MLS or a folder of audio + .txt"),
    "augment": ("training.cli", "add augmented copies (pitch, speed, noise...) of a manifest"),
    "synth-qa": ("training.cli", "synthesize the spoken-QA set (reserved voices, or --split dev)"),
    "respond": ("training.cli", "add the frozen LLM's answer to every manifest line"),
    "pretrain-ctc": ("training.cli", "character CTC pretraining of the conformer encoder"),
    "tune-asr": ("training.cli", "adapt Whisper to the corpus's voices (LoRA on its transcripts)"),
    "align": ("training.cli", "modal-invariance alignment of an encoder to the frozen LLM"),
    "scale-correction": (
        "training.cli",
        "pull a whisper_decoder encoder part of the way back to its untrained start",
    ),
    "evaluate": ("training.cli", "perplexity and QA: text vs end-to-end vs cascade"),
}


def _module_name(verb: str) -> str:
    return verb.replace("-", "_")


def build_parser(verbs: dict[str, tuple[str, str]] = VERBS) -> argparse.ArgumentParser:
    """The top-level parser: picks the verb; the verb's own parser reads the rest."""
    parser = argparse.ArgumentParser(prog="speechchat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module, help_text) in verbs.items():
        sub.add_parser(verb, help=help_text, add_help=False).set_defaults(_module=module)
    return parser


def build_verb_parser(verb: str, module: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"speechchat {verb}", description=VERBS[verb][1])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    getattr(module, f"add_{_module_name(verb)}_arguments")(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    known, rest = build_parser().parse_known_args(argv)
    module = importlib.import_module(known._module)
    args = build_verb_parser(known.verb, module).parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(getattr(module, f"run_{_module_name(known.verb)}")(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
