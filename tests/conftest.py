"""Shared fixtures: tiny random Llamas with real tokenizers, the embedded stack, real speech."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Llama-2-chat's own template (meta-llama/Llama-2-7b-chat-hf tokenizer_config.json)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


@pytest.fixture(scope="session")
def default_llm_dir() -> Path:
    """The embedded SmolLM2 as a cached HF directory (dequantized once per cache folder)."""
    from model.llm import resolve_llm_dir

    return resolve_llm_dir("default")[0]


def _write_tiny_llm(out: Path, source: Path, chat_template: str | None) -> Path:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from tests.tiny import tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(source)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """SmolLM2's tokenizer for the tiny Llamas: `SPEECHCHAT_TEST_TOKENIZER` (a folder with its
    tokenizer files, for a machine without the embedded LLM, e.g. a GPU box), else the
    embedded LLM's directory."""
    folder = os.environ.get("SPEECHCHAT_TEST_TOKENIZER")
    return Path(folder) if folder else request.getfixturevalue("default_llm_dir")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer and ChatML template."""
    return _write_tiny_llm(tmp_path_factory.mktemp("tiny-chatml"), tokenizer_dir, None)


@pytest.fixture(scope="session")
def tiny_llama2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama whose chat template is Llama-2-chat's `[INST]` format."""
    return _write_tiny_llm(
        tmp_path_factory.mktemp("tiny-llama2"), tokenizer_dir, LLAMA2_CHAT_TEMPLATE
    )


@pytest.fixture(scope="session")
def tiny_llm(tiny_llm_dir: Path):
    from model.llm import load_llm

    return load_llm(str(tiny_llm_dir))


@pytest.fixture(scope="session")
def smol_llm():
    """The embedded default LLM (SmolLM2-135M-Instruct), float32 on CPU."""
    from model.llm import load_llm

    return load_llm("default")


@pytest.fixture(scope="session")
def speak(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., torch.Tensor]:
    """Synthesize English speech with espeak-ng at test time -> mono 16 kHz waveform [T]."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make test installs it from Debian)")
    from model.audio import load_audio_file

    folder = tmp_path_factory.mktemp("speech")

    def _speak(text: str, voice: str = "en-us", speed: int = 150) -> torch.Tensor:
        out = folder / f"{abs(hash((text, voice, speed)))}.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        return load_audio_file(out)

    return _speak
