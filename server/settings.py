"""Server settings: `SPEECHCHAT_*` environment variables, overridden by `speechchat serve` flags.

One of the three homes for configuration (STYLE.md). Lists (API keys, CORS origins) read from the
environment as comma-separated strings, e.g. `SPEECHCHAT_API_KEYS=key1,key2`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SPEECHCHAT_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MIB = 1 << 20  # bytes
GIB = 1 << 30  # bytes

CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Everything `speechchat serve` can be told; each field is also `SPEECHCHAT_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # model
    llm: str = Field("default", description="LLM spec: 'default', an HF directory or a .gguf file")
    encoder: str | None = Field(
        "default", description="encoder checkpoint directory, 'default', or empty for text only"
    )
    device: str = Field("cpu", description="torch device, e.g. cpu, cuda, cuda:1")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="model dtype; None: the LLM loader's choice for the device"
    )
    served_model_name: str | None = Field(
        None, description="model id shown by /v1/models; None: the LLM's own name"
    )
    # network
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    api_keys: CsvList = Field(
        default_factory=list, description="accepted bearer tokens; empty: open"
    )
    cors_origins: CsvList = Field(default_factory=list, description="origins allowed by CORS")
    # limits
    max_audio_seconds: float = Field(60.0, gt=0, description="s, longest audio accepted per turn")
    max_request_bytes: int = Field(25 * MIB, gt=0, description="bytes, largest request body")
    max_sessions: int = Field(256, ge=1, description="sessions held at once (REST + WebSocket)")
    kv_budget_bytes: int = Field(2 * GIB, gt=0, description="bytes of KV cache the worker may hold")
    session_idle_timeout_s: float = Field(
        900.0, gt=0, description="s a REST session may sit unused before it is closed"
    )
    max_batch: int = Field(32, ge=1, description="requests decoded together")
    prefill_chunk: int = Field(
        512, ge=1, description="prompt tokens prefilled per step, all requests together"
    )
    prefill_rows: int = Field(8, ge=1, description="requests prefilled side by side")
    decode_step: Literal["compiled", "lean", "hf"] = Field(
        "compiled",
        description="'lean': fused Llama step (other models use 'hf'); 'compiled': 'lean' plus,"
        " on CPU, a one-row step compiled by inductor and C++ kernels for attention, norms and"
        " SiLU (need a C++ compiler; 10-20 s and ~30 s at the first start, then their caches;"
        " each falls back to the lean step's own way) and, on CUDA, every decode step"
        " replayed from CUDA graphs with its pointwise work fused by inductor (needs Triton); 'hf':"
        " transformers' forward",
    )
    num_threads: int | None = Field(None, ge=1, description="torch threads of the model thread")
    stream_window_s: float = Field(
        3.0, ge=0, description="s of streamed audio encoded per window while the user speaks; 0: "
        "encode at commit",
    )  # fmt: skip
    stream_prefill: bool = Field(
        True, description="prefill encoded windows into the session's KV cache before the commit"
    )
    # generation defaults
    default_max_tokens: int = Field(256, ge=1, description="tokens when a request names none")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask")
    default_temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="when a request names none (greedy suits small models)"
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("encoder", "dtype", "served_model_name", mode="before")
    @classmethod
    def empty_is_none(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
