"""CPU decode steps' attention for several rows at once, as one C++ kernel over the K/V arena,
and the pointwise ops between their projections (RMSNorm with its residual add, SiLU-and-multiply).

Own kernels because neither SDPA's CPU kernels (tiled for long queries) nor batched matmuls fit
a decode step's one query per row over the arena: the matmuls copy each row's key block out of
the arena (bf16) and softmax, bias, rotary embedding and the K/V writes are ops of their own
(SmolLM2, 2 cores, 16 rows at 140 keys: ~120 us a layer here against 185-440 us); and a
16-row step runs ~40 small ops a layer between its projections (norms, rotary, SiLU, adds),
each a few microseconds of dispatch for a few microseconds of work. Built once per machine with
torch's C++ extension loader (g++ and ninja; ~30 s, then from torch's extension cache); where
that fails the engine keeps the batched matmuls (`server/engine_decode.grouped_attention`) and
the modules' ops.

Dims: B rows, H query heads, Hkv key/value heads, R arena rows, C arena columns, Dh head width.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / f for f in ("decode_attention.cpp", "decode_ops.cpp")]
FUNCTIONS = ["decode_attention", "rms_norm", "add_rms_norm", "silu_mul", "parallel_tasks"]
DTYPES = (torch.float32, torch.bfloat16)
# compiler flags per ATen CPU capability: the kernel's vector types follow CPU_CAPABILITY
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}
VECTOR_FLOATS = {"AVX512": 16, "AVX2": 8, "DEFAULT": 8}  # float lanes of at::vec::Vectorized
MAX_CHUNKS = 32  # Dh / lanes at most (kMaxChunks in the source)
_BUILD_LOCK = threading.Lock()  # engines starting on two threads build once


def capability() -> str:
    """The ATen CPU capability the kernel is built for (others build the scalar fallback)."""
    found = torch.backends.cpu.get_cpu_capability()
    return found if found in CAPABILITY_FLAGS else "DEFAULT"


def load_kernel():
    """The built extension module (`FUNCTIONS`), or None where building fails."""
    with _BUILD_LOCK:
        return _load_kernel()


@functools.cache
def _load_kernel():
    cap = capability()
    start = time.perf_counter()
    try:
        module = build_kernel(cap)
    except Exception as exc:  # no compiler or ninja, a failed build: the matmuls still work
        log.warning("CPU decode kernels unavailable, using batched matmuls and torch ops: %r", exc)
        return None
    log.info("CPU decode kernels (%s) ready in %.1f s", cap, time.perf_counter() - start)
    return module


def build_kernel(cap: str):
    """Build (or load from torch's extension cache) the kernel for CPU capability `cap`."""
    from torch.utils.cpp_extension import load_inline

    put_ninja_on_path()
    # no contracted multiply-adds: the rotary and pointwise ops round as torch's separate ops;
    # OpenMP for the row-parallel loops (csrc/parallel.h; the process's libgomp.so.1 is torch's
    # own, so the kernels share its threads)
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", f"-DCPU_CAPABILITY={cap}"]
    return load_inline(
        name=f"speechchat_decode_kernels_{cap.lower()}",
        cpp_sources=[source.read_text() for source in SOURCES],
        functions=FUNCTIONS,
        extra_cflags=[*flags, f"-DCPU_CAPABILITY_{cap}", *CAPABILITY_FLAGS[cap]],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(SOURCES[0].parent)],
    )


def put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a server started as .venv/bin/speechchat has the venv's
    ninja (the `ninja` package) without the venv on PATH."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def kernel_supports(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel handles this dtype and attention shape."""
    lanes = VECTOR_FLOATS[capability()]
    return (
        dtype in DTYPES
        and heads % kv_heads == 0
        and head_dim % lanes == 0
        and head_dim // lanes <= MAX_CHUNKS
    )


def decode_attention(
    module,
    kv: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write k/v [B, Hkv, Dh] into kv [2, R, Hkv, C, Dh] at (rows[b], positions[b]), then attend
    q [B, H, Dh] over each row's columns 0..positions[b] -> [B, H, Dh]. With cos/sin [B, Dh]
    (each row's, in q's dtype) q and k are rotated first (Llama's rotary embedding, rounded as
    `apply_rotary_pos_emb` rounds); without, they come rotated."""
    return module.decode_attention(kv, q, k, v, rows, positions, scale, cos, sin)


def rms_norm(module, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of x [N, D] (float32 inside, scaled in x's dtype) -> [N, D]."""
    return module.rms_norm(x, weight, eps)


def add_rms_norm(
    module, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x += delta in place (both [N, D]), then `rms_norm` of the sum -> [N, D]."""
    return module.add_rms_norm(x, delta, weight, eps)


def silu_mul(module, gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 I] (gate then up, rows contiguous) -> silu(gate) * up [N, I]."""
    return module.silu_mul(gate_up)
