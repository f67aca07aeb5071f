"""`speechchat serve`: flags -> `Settings` (over `SPEECHCHAT_*` env) -> uvicorn.

With no flags it serves the embedded default (SmolLM2 + the shipped encoder, text only if none
is shipped yet) on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
from typing import Any

from server.settings import Settings

# flag -> settings field; each flag defaults to None so only the flags given override the env
FLAGS: dict[str, tuple[type, str]] = {
    "--llm": (str, "LLM spec: 'default', an HF directory or a .gguf file"),
    "--encoder": (str, "encoder checkpoint directory, 'default', or 'none' for text only"),
    "--device": (str, "torch device (cpu, cuda, cuda:1)"),
    "--dtype": (str, "float32, float16 or bfloat16"),
    "--served-model-name": (str, "model id shown by /v1/models"),
    "--host": (str, "address to listen on (default 127.0.0.1)"),
    "--port": (int, "port (default 8000)"),
    "--api-keys": (str, "comma-separated accepted bearer tokens"),
    "--cors-origins": (str, "comma-separated origins allowed by CORS"),
    "--max-audio-seconds": (float, "longest audio per turn, s"),
    "--max-request-bytes": (int, "largest request body, bytes"),
    "--max-sessions": (int, "sessions held at once"),
    "--kv-budget-bytes": (int, "bytes of KV cache the worker may hold"),
    "--session-idle-timeout-s": (float, "s before an unused REST session is closed"),
    "--max-batch": (int, "requests decoded together"),
    "--num-threads": (int, "torch threads of the model thread"),
    "--stream-window-s": (float, "s of streamed audio per window encoded while it arrives"),
    "--default-max-tokens": (int, "tokens when a request names none"),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every setting; unset flags leave the `SPEECHCHAT_*` value (or default)."""
    for flag, (kind, help_text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument("--log-level", default="info", help="uvicorn log level")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag in FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            overrides[flag.lstrip("-").replace("-", "_")] = value
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    """Build the app from the settings and serve it until interrupted."""
    import uvicorn

    from server.app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        ws_max_size=settings.max_request_bytes,
    )
    return 0
