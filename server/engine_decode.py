"""A lean CPU decode step: GEMV-friendly weights, masks only where rows differ, GQA without copies.

Own helpers rather than transformers' defaults because a decode step on a small CPU model is
bound by how fast each `Linear` streams its weights and by per-op overhead, not by FLOPs:
- MKL's fp32 GEMV for `x @ W.T` with `W` stored [out, in] reads memory about a quarter slower
  than with the same values stored [in, out]; `lay_out_for_decode` keeps every `Linear`'s
  values but stores them transposed (the parameter is a transposed view, so every caller of the
  model, `generate` included, still sees the same [out, in] tensor and the same numbers).
- A single decoding row never needs a mask (it attends to all its columns), and rows of a batch
  need one additive float mask per step, not a boolean one that every layer converts again.
- Prefill chunks attend to a cached prefix through a mask, where transformers' SDPA path
  repeats every K/V head for grouped-query attention; `gqa_sdpa_forward` lets SDPA read the
  shared heads in place.

Dims: B rows, H query heads, Hkv key/value heads, Q query positions, K key positions, Dh head width.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

log = logging.getLogger(__name__)

GQA_SDPA = "speechchat_gqa_sdpa"  # the attention implementation the worker sets on its LLM


def gqa_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA that keeps K/V heads shared when a multi-query chunk comes with a mask; with a
    `packed_prefill` (server/engine_batch.py), attention per request over its own arena row."""
    packed = kwargs.pop("packed_prefill", None)
    if packed is not None:
        return packed_attention(module, query, packed, scaling)
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or query.shape[2] == 1 or groups == 1 or query.device.type != "cpu":
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=True,
    )  # [B, H, Q, Dh]  # fmt: skip
    return out.transpose(1, 2).contiguous(), None  # [B, Q, H, Dh]


def packed_attention(
    module: torch.nn.Module, query: torch.Tensor, packed, scaling: float | None
) -> tuple[torch.Tensor, None]:
    """query [1, H, Q_total, Dh] of several requests' chunks -> [1, Q_total, H, Dh]; each
    segment attends to its row's cached prefix and itself (already written by the cache)."""
    out = packed.attend(module.layer_idx, query, scaling)  # [1, H, Q_total, Dh]
    return out.transpose(1, 2).contiguous(), None  # [1, Q_total, H, Dh]


AttentionInterface.register(GQA_SDPA, gqa_sdpa_forward)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


def use_gqa_attention(model: torch.nn.Module) -> None:
    """Switch an SDPA model to `gqa_sdpa_forward` (same results; other kinds are left alone)."""
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(GQA_SDPA)


def lay_out_for_decode(model: torch.nn.Module, transposed: bool = True) -> int:
    """Store each CPU `Linear` weight transposed (same values, same shape), or with
    `transposed=False` back in the plain [out, in] layout; returns how many moved."""
    count = 0
    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if not isinstance(module, torch.nn.Linear) or weight is None:
                continue
            if weight.device.type != "cpu" or weight.ndim != 2:
                continue
            if transposed and weight.is_contiguous():  # [out, in] view of [in, out] storage
                weight.data = weight.data.t().contiguous().t()
            elif not transposed and weight.t().is_contiguous() and not weight.is_contiguous():
                weight.data = weight.data.contiguous()
            else:
                continue  # already laid out, or a view into a fused weight
            count += 1
    log.debug("laid out %d linear weights for CPU decode (transposed: %s)", count, transposed)
    return count


def make_decode_bias(
    positions: list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Rows attend to their columns 0..position -> additive [B, 1, 1, K]; None for one row."""
    if len(positions) == 1:
        return None
    return position_bias(torch.tensor(positions, device=device), max(positions) + 1, dtype)


def position_bias(pos: torch.Tensor, k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows at positions pos [B] attend to columns 0..position of `k_len` -> additive
    [B, 1, 1, K] (tensor ops only: a CUDA graph can hold them)."""
    cols = torch.arange(k_len, device=pos.device)  # [K]
    bias = torch.zeros(pos.shape[0], 1, 1, k_len, dtype=dtype, device=pos.device)
    return bias.masked_fill_((cols[None] > pos[:, None])[:, None, None], torch.finfo(dtype).min)


def grouped_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query per row over its keys as two batched matmuls, the query heads of a K/V head
    side by side: q [B, H, 1, Dh], keys/values [B, Hkv, K, Dh], bias [B, 1, 1, K] (None: every
    key) -> [B, H, 1, Dh]. For a batch of single queries this beats SDPA's CPU kernel (SmolLM2,
    16 rows: 13 ms a step).

    bf16 on CPU takes keys q^T [B, Hkv, K, G] (softmax over K): oneDNN copies a transposed key
    block out of the arena (SmolLM2, 2 cores, 16 rows, step at 100 / 300 / 800 keys: 41 / 55 /
    78 ms vs 42 / 60 / 103); fp32 is faster the plain way (65 / 74 / 94 vs 63-67 / 79 / 106)."""
    b, heads, _, dh = q.shape
    grouped = q.view(b, keys.shape[1], -1, dh)  # [B, Hkv, G, Dh]
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        scores = torch.matmul(keys, grouped.transpose(-1, -2)).float().mul_(scale)  # [B,Hkv,K,G]
        if bias is not None:
            scores = scores + bias.transpose(-1, -2)
        probs = torch.softmax(scores, dim=-2).to(q.dtype)
        out = torch.matmul(probs.transpose(-1, -2), values)  # [B, Hkv, G, Dh]
        return out.view(b, heads, 1, dh)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, K]
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values).view(b, heads, 1, dh)  # [B, H, 1, Dh]
