"""Encoder checkpoints: a directory with `config.json` and `encoder.safetensors` (DESIGN.md).

Only trainable weights are saved: a Whisper-initialised encoder stores its adapter (and any
fine-tuned top layers) and rebuilds the frozen rest from `whisper_source`, keeping checkpoints
small.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import EncoderConfig, LLMIdentity, PromptConfig
from model.encoders.base import AudioEncoder, build_encoder
from model.errors import CheckpointFormatError, CheckpointMismatchError
from model.llm import LoadedLLM

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "encoder.safetensors"
DEFAULT_SPEC = "default"
SHIPPED_DIR = Path(__file__).parent / "checkpoints" / "default"
LORA_DIR = "whisper_lora"  # a whisper_decoder checkpoint's copy of its Whisper's LoRA adapters
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors", "training.json")


def save_encoder(
    path: str | Path,
    encoder: AudioEncoder,
    llm: LLMIdentity,
    prompt: PromptConfig | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write `config.json` and the encoder's trainable weights into `path` (float32, or the dtype
    `encoder.stored_dtype` names: fine-tuned Whisper layers stay float16, as Whisper came)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = dict(encoder.named_parameters(remove_duplicate=False))  # tied weights too
    state = {
        name: t.detach().to("cpu", encoder.stored_dtype(name)).contiguous()
        for name, t in encoder.state_dict().items()
        if name not in params or params[name].requires_grad
    }
    encoder_config = encoder.config.to_dict()
    if encoder.config.whisper_lora:
        encoder_config["whisper_lora"] = keep_lora(Path(encoder.config.whisper_lora), path)
    config = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder_config,
        "llm": asdict(llm),
        "prompt": (prompt or PromptConfig()).to_dict(),
        "training": training or {},
    }
    save_file(state, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def keep_lora(source: Path, path: Path) -> str:
    """Copy the LoRA adapters in `source` into the checkpoint `path` (unless they are its own);
    return the name the checkpoint's config gives them."""
    target = path / LORA_DIR
    if source.resolve() != target.resolve():
        target.mkdir(exist_ok=True)
        for name in LORA_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
    return LORA_DIR


def read_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint's `config.json`, checked for the fields loading needs."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointFormatError(
            f"{path} is not an encoder checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    config = json.loads((path / CONFIG_FILE).read_text())
    missing = {"format_version", "encoder", "llm", "prompt"} - set(config)
    if missing or config["format_version"] != FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}/{CONFIG_FILE}: unknown format (missing {sorted(missing)})"
        )
    return config


def check_llm(saved: LLMIdentity, actual: LLMIdentity, path: Path) -> None:
    """Fail with both names when the checkpoint was aligned to another LLM."""
    if saved.hidden_size != actual.hidden_size or saved.vocab_size != actual.vocab_size:
        reason = (
            f"hidden {saved.hidden_size} vs {actual.hidden_size}, "
            f"vocab {saved.vocab_size} vs {actual.vocab_size}"
        )
    elif saved.embed_hash != actual.embed_hash:
        reason = "same sizes but different embedding weights"
    else:
        return
    raise CheckpointMismatchError(
        f"encoder checkpoint {path} was aligned to LLM {saved.name!r} but is being loaded with "
        f"LLM {actual.name!r} ({reason}); train an encoder for this LLM or load the matching one"
    )


def load_encoder(
    path: str | Path, llm: LoadedLLM | LLMIdentity, device: str | torch.device | None = None
) -> tuple[AudioEncoder, PromptConfig, dict[str, Any]]:
    """Rebuild an encoder from a checkpoint after checking it matches `llm`."""
    path = Path(path)
    config = read_config(path)
    actual = llm.identity if isinstance(llm, LoadedLLM) else llm
    check_llm(LLMIdentity(**config["llm"]), actual, path)
    enc_config = EncoderConfig.from_dict(config["encoder"])
    if enc_config.whisper_lora and not Path(enc_config.whisper_lora).is_absolute():
        lora = str(path / enc_config.whisper_lora)  # kept inside the checkpoint
        enc_config = dataclasses.replace(enc_config, whisper_lora=lora)
    if enc_config.kind == "whisper_decoder" and not isinstance(llm, LoadedLLM):
        raise CheckpointFormatError(f"{path}: a whisper_decoder encoder loads with its LLM itself")
    encoder = build_encoder(enc_config, llm if isinstance(llm, LoadedLLM) else None)
    state = load_file(str(path / WEIGHTS_FILE))
    result = encoder.load_state_dict(state, strict=False)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if result.unexpected_keys or missing:
        raise CheckpointFormatError(
            f"{path}: weights do not fit the configured encoder "
            f"(unexpected {result.unexpected_keys[:5]}, missing {missing[:5]})"
        )
    if device is None and isinstance(llm, LoadedLLM):
        device = llm.device
    encoder.to(device or "cpu").eval()
    return encoder, PromptConfig(**config["prompt"]), config.get("training", {})


def resolve_encoder_path(spec: str) -> Path:
    """`"default"` (the checkpoint shipped in the package) or a checkpoint directory."""
    path = SHIPPED_DIR if spec == DEFAULT_SPEC else Path(spec).expanduser()
    if spec == DEFAULT_SPEC and not (path / CONFIG_FILE).is_file():
        raise CheckpointFormatError(
            "no default encoder is shipped in this build; pass an encoder checkpoint directory "
            "(train one with `speechchat align`) or run text-only"
        )
    return path


def load_encoder_spec(spec: str, llm: LoadedLLM) -> tuple[AudioEncoder, PromptConfig]:
    """An encoder spec -> the encoder on the LLM's device and the prompt settings it was trained
    with."""
    encoder, prompt, _ = load_encoder(resolve_encoder_path(spec), llm)
    return encoder, prompt
