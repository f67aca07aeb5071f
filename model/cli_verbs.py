"""`speechchat transcribe` and `speechchat reply`: the one-shot model API from a shell."""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path


def add_transcribe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="audio files (wav, flac, ogg, mp3)")
    parser.add_argument("--whisper", default="default", help="'default' or a local HF Whisper dir")
    parser.add_argument("--beams", type=int, default=1, help="beam search width (1: greedy)")
    parser.add_argument("--lora", default=None, help="a tune-asr adapter folder merged in")


def run_transcribe(args: argparse.Namespace) -> int:
    from model.asr import WhisperASR
    from model.audio import load_audio_file

    asr = WhisperASR.from_source(args.whisper, beams=args.beams, lora=args.lora)
    for path in args.files:
        print(f"{path}\t{asr.transcribe(load_audio_file(path))}")
    return 0


def add_reply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="the user's text turn")
    parser.add_argument("--audio", type=Path, help="an audio file as the user's turn")
    parser.add_argument("--llm", default="default", help="'default', a local HF dir or a .gguf")
    parser.add_argument("--encoder", default=None, help="encoder checkpoint dir or 'default'")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")


def build_user_message(text: str | None, audio: Path | None) -> dict:
    """An OpenAI-format user message from a text and/or an audio file."""
    parts: list[dict] = []
    if text:
        parts.append({"type": "text", "text": text})
    if audio is not None:
        data = base64.b64encode(audio.read_bytes()).decode()
        parts.append({"type": "input_audio", "input_audio": {"data": data, "format": None}})
    if not parts:
        raise SystemExit("give a text prompt, --audio FILE, or both")
    return {"role": "user", "content": parts}


def run_reply(args: argparse.Namespace) -> int:
    from model.speech_llm import SpeechLLM

    encoder = args.encoder or ("default" if args.audio else None)
    model = SpeechLLM.from_specs(llm=args.llm, encoder=encoder, device=args.device)
    messages = [build_user_message(args.text, args.audio)]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    for delta in model.respond(messages, args.max_tokens, args.temperature):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
