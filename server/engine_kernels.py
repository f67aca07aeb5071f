"""A lean Llama's layers on CPU through the C++ kernels of server/cpu_attention.py: everything
between the projections (attention with its rotary embedding and K/V writes, RMSNorm after each
residual add, SiLU-and-multiply) as ~8 calls a layer where torch ops take ~40. Used by
`LeanDecode` for decode steps of several rows and for packed prefills (attention there stays
SDPA), where the kernels built.

Dims: B decoding rows, N rows through the layers, H query heads, Hkv key/value heads, Dh head
width, D LLM width, I MLP width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from server import cpu_attention
from server.engine_batch import Arena

if TYPE_CHECKING:
    from server.engine_lean import Attend, LeanDecode, LeanLayer


def norm_args(norm: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """A Llama RMSNorm module's (weight, eps) as the kernels take them."""
    return norm.weight, norm.variance_epsilon


def step_layers(
    lean: LeanDecode,
    kernel: object,
    arena: Arena,
    lo: int,
    hi: int,
    x: torch.Tensor,
    pos: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """A decode step's layers for rows [lo, hi) at positions pos [B], cos/sin [B, 1, Dh] from
    the rotary module; x [B, D] (added to in place) -> the final norm's output [B, D]."""
    rows, b = torch.arange(lo, hi), hi - lo
    cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()  # [B, Dh] each

    def attend(layer: LeanLayer, h: torch.Tensor, index: int) -> torch.Tensor:
        q, k, v = (
            layer.qkv(h)
            .view(b, -1, lean.head_dim)
            .split([lean.heads, lean.kv_heads, lean.kv_heads], dim=1)
        )  # [B, H, Dh], [B, Hkv, Dh] x2: views
        att = cpu_attention.decode_attention(
            kernel, arena.data[index], q, k, v, rows, pos, layer.scaling, cos, sin
        )  # [B, H, Dh]
        return layer.o_proj(att.view(b, -1))  # [B, D]

    return norm_layers(lean, kernel, x, attend)


def norm_layers(lean: LeanDecode, kernel: object, x: torch.Tensor, attend: Attend) -> torch.Tensor:
    """x [N, D] (rows contiguous; added to in place) through every decoder layer with the
    kernels' RMSNorm (each after its residual add) and SiLU-and-multiply around the
    projections; `attend(layer, normed, layer_index)` -> [N, D] -> the final norm's output
    [N, D]."""
    norms = [layer.norm_in for layer in lean.layers[1:]] + [lean.norm]  # after each layer
    h = cpu_attention.rms_norm(kernel, x, *norm_args(lean.layers[0].norm_in))
    for i, (layer, norm_next) in enumerate(zip(lean.layers, norms, strict=True)):
        h = cpu_attention.add_rms_norm(kernel, x, attend(layer, h, i), *norm_args(layer.norm_post))
        gate_up = layer.gate_up(h)  # [N, 2 I]
        if lean.silu:
            h = cpu_attention.silu_mul(kernel, gate_up)  # [N, I]
        else:
            gate, up = gate_up.chunk(2, -1)
            h = layer.act(gate) * up
        delta = layer.down_proj(h)  # [N, D]
        h = cpu_attention.add_rms_norm(kernel, x, delta, *norm_args(norm_next))
    return h
