"""Decode attention for the graphed CUDA step: one query per row (its G grouped heads) over that
row's cached keys, split over the keys ("flash decoding"), with the step's new K/V written into
the arena by the same kernel.

Own Triton kernel because SDPA's kernels tile 64 queries tall and a decode row has one (on an
H100, Llama-2-7B shape, bf16, one row, 256 keys: ~13 us a layer, 0.42 ms of the 6.2 ms step,
while the layer's K/V stream in ~1.4 us), flash-attn's split-KV decode is not a dependency we
can install offline, and the step also spends one indexed-copy kernel a layer writing the new
K/V, which this kernel folds in. Each program takes one (row, K/V head, split of the keys),
walks its keys in blocks with an online softmax and either writes the output (one split) or
partial max / sum / weighted values that `_combine_kernel` rescales and adds. The split count
follows the grid's size (`splits_for`); `pick_attention` times it against SDPA on the device
when the fused pieces are built and keeps the faster.

Measured on an H100 (Llama-2-7B shape, bf16; `bench/bench_attention.py`, us a call from a CUDA
graph, the kernel's own K/V write included): one row at 256 / 1,024 / 4,096 keys 7.4 / 11.6 /
33.2 against SDPA's memory-efficient kernel's 12.1 / 40.9 / 170.3 (cuDNN's 7.6 / 9.9 / 29.1,
which the step avoids: server/engine_lean.py); 16 rows 29.8 / 92.8 / 335.9 against 38.5 /
128.0 / 477.5. The graphed one-row step (`bench/bench_step.py`): 5.92 ms against 6.34 with
SDPA, 76% of the weights' streaming time.

Dims: B rows, Hkv K/V heads, G query heads per K/V head, Dh head width, K key columns,
S splits of the keys.
"""

from __future__ import annotations

import contextlib
import logging
import math
from functools import partial

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the step keeps SDPA
    triton = None

BLOCK = 64  # keys a program holds at once
MAX_SPLITS = 64  # splits of one row's keys (the combine reads them in one block)
TIMING_REPS = 100

if triton is not None:

    @triton.jit(do_not_specialize=["span", "splits"])
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, new_ptr, pos_ptr, out_ptr, m_ptr, l_ptr, acc_ptr, scale,
        HKV, G, span, splits,
        sq_b, sq_h, sq_g, sk_b, sk_h, sk_k, sv_b, sv_h, sv_k, sn_b, sn_kv, sn_h, so_b, so_h, so_g,
        DH: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK: tl.constexpr, FINAL: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Row b, K/V head h, keys [s span, (s + 1) span) up to the row's position: write the
        new K/V at the position (the program whose keys hold it), then attend."""
        bh, s = tl.program_id(0), tl.program_id(1)
        b, h = bh // HKV, bh % HKV
        pos = tl.load(pos_ptr + b)  # the new token's column: keys 0..pos are attended
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, DH)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :],
                    mask=g[:, None] < G, other=0.0)  # fmt: skip
        k_new = tl.load(new_ptr + b * sn_b + h * sn_h + d)  # [Dh]
        v_new = tl.load(new_ptr + b * sn_b + sn_kv + h * sn_h + d)
        start = s * span
        end = tl.minimum(start + span, pos + 1)
        if (pos >= start) & (pos < start + span):
            tl.store(k_ptr + b * sk_b + h * sk_h + pos * sk_k + d, k_new)
            tl.store(v_ptr + b * sv_b + h * sv_h + pos * sv_k + d, v_new)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, DH], tl.float32)
        for i in range(0, span, BLOCK):  # a split's blocks past the row's keys: no loads
            k = start + i + tl.arange(0, BLOCK)
            valid = k < end
            here = (k == pos)[:, None]  # the new column: its values from the step, not memory
            keys = tl.load(k_ptr + b * sk_b + h * sk_h + k[:, None] * sk_k + d[None, :],
                           mask=valid[:, None], other=0.0)  # fmt: skip
            keys = tl.where(here, k_new[None, :], keys)
            scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))  # [BLOCK_G, BLOCK]
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: no NaN
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(scores - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            values = tl.load(v_ptr + b * sv_b + h * sv_h + k[:, None] * sv_k + d[None, :],
                             mask=valid[:, None], other=0.0)  # fmt: skip
            values = tl.where(here, v_new[None, :], values)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(values.dtype), values, input_precision=PRECISION
            )
            m_i = m_new
        if FINAL:
            out = acc / l_i[:, None]
            tl.store(out_ptr + b * so_b + h * so_h + g[:, None] * so_g + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)  # fmt: skip
        else:  # a split past the row's keys leaves max -inf, sum 0: weight 0 in the combine
            row = (bh * splits + s) * BLOCK_G + g
            tl.store(m_ptr + row, m_i)
            tl.store(l_ptr + row, l_i)
            tl.store(acc_ptr + row[:, None] * DH + d[None, :], acc)

    @triton.jit(do_not_specialize=["splits"])
    def _combine_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, HKV, G, splits, so_b, so_h, so_g,
        DH: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """One (row, K/V head, query head): each split's partial sums rescaled to the largest
        max and added."""
        bh, gi = tl.program_id(0), tl.program_id(1)
        b, h = bh // HKV, bh % HKV
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, DH)
        rows = (bh * splits + s) * BLOCK_G + gi
        live = s < splits
        m = tl.load(m_ptr + rows, mask=live, other=float("-inf"))
        top = tl.max(m, axis=0)  # finite: split 0 always holds key 0
        w = tl.where(live, tl.exp(m - top), 0.0)
        total = tl.sum(w * tl.load(l_ptr + rows, mask=live, other=0.0), axis=0)
        acc = tl.load(acc_ptr + rows[:, None] * DH + d[None, :], mask=live[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / total  # [Dh]
        tl.store(out_ptr + b * so_b + h * so_h + gi * so_g + d, out.to(out_ptr.dtype.element_ty))


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel takes this grouped query [B, Hkv, G, Dh]: Triton present, a power-of-2
    head width of at least 16 (its dot products), at most 64 query heads per K/V head."""
    dh = q.shape[-1]
    return triton is not None and dh >= 16 and dh & (dh - 1) == 0 and q.shape[2] <= 64


def splits_for(rows: int, kv_heads: int, k_len: int, device: torch.device) -> int:
    """Splits of each row's keys: enough programs for about two per multiprocessor, each with
    at least one block of keys."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if (
        device.type == "cuda") else 8  # fmt: skip
    want = math.ceil(2 * units / (rows * kv_heads))
    return max(1, min(want, MAX_SPLITS, triton.cdiv(k_len, BLOCK)))


def flash_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    new_kv: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hkv, G, Dh]; keys/values [B, Hkv, K, Dh] (views of the arena, last dim contiguous);
    new_kv [B, 2, Hkv, Dh] this step's K/V, written at column pos [B] of each row; row b attends
    to keys 0..pos[b] -> [B, Hkv, G, Dh]. `splits`: of the keys (default `splits_for`)."""
    b, hkv, g, dh = q.shape
    k_len = keys.shape[2]
    splits = splits or splits_for(b, hkv, k_len, q.device)
    span = triton.cdiv(triton.cdiv(k_len, splits), BLOCK) * BLOCK
    splits = triton.cdiv(k_len, span)
    block_g = max(16, triton.next_power_of_2(g))  # tl.dot needs 16 rows
    out = torch.empty_like(q)  # [B, Hkv, G, Dh]
    final = splits == 1
    parts = b * hkv * splits * block_g * (not final)
    m = q.new_empty(max(parts, 1), dtype=torch.float32)
    l_sum, acc = torch.empty_like(m), q.new_empty(max(parts * dh, 1), dtype=torch.float32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32: unused for 16-bit inputs
    _split_kernel[(b * hkv, splits)](
        q, keys, values, new_kv, pos, out, m, l_sum, acc, scale, hkv, g, span, splits,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        new_kv.stride(0), new_kv.stride(1), new_kv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        DH=dh, BLOCK_G=block_g, BLOCK=BLOCK, FINAL=final, PRECISION=precision,
    )  # fmt: skip
    if not final:
        _combine_kernel[(b * hkv, g)](
            m, l_sum, acc, out, hkv, g, splits, out.stride(0), out.stride(1), out.stride(2),
            DH=dh, BLOCK_G=block_g, BLOCK_S=MAX_SPLITS,
        )  # fmt: skip
    return out


def sdpa_decode(
    q: torch.Tensor,
    kv: torch.Tensor,
    new_kv: torch.Tensor,
    pos: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same step as torch ops (the fused step's other path): kv [2, B, Hkv, K, Dh] (a view
    of the arena) gets new_kv by one indexed copy, then SDPA over the columns with an additive
    mask `bias` [B, 1, 1, K] -> [B, Hkv, G, Dh]."""
    kv[:, torch.arange(q.shape[0], device=q.device), :, pos] = new_kv  # [B, 2, Hkv, Dh]
    return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias, scale=scale)


def graph_us(run, context=contextlib.nullcontext, reps: int = TIMING_REPS) -> float:
    """Mean GPU time of one call, replayed from a CUDA graph of `reps` calls (as the step
    runs: no launch cost; the Triton launcher's own is tens of us), inside `context()`."""
    with context():
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def pick_attention(
    kv_heads: int, groups: int, head_dim: int, dtype: torch.dtype, backends=contextlib.nullcontext
) -> str:
    """The kernel ("flash") where it beats SDPA for one row at 256 and at 2,048 keys on this
    CUDA device (each timed alone, `graph_us`; SDPA inside `backends()`, the step's choice of
    SDPA kernels), else "sdpa"."""
    from server.engine_decode import position_bias

    device = torch.device("cuda")
    q = torch.randn(1, kv_heads, groups, head_dim, device=device, dtype=dtype)
    if not supports(q):
        return "sdpa"
    times: dict[str, list[float]] = {"sdpa": [], "flash": []}
    scale = head_dim**-0.5
    for k_len in (256, 2048):
        kv = torch.randn(2, 1, kv_heads, k_len, head_dim, device=device, dtype=dtype)
        new = torch.randn(1, 2, kv_heads, head_dim, device=device, dtype=dtype)
        pos = torch.tensor([k_len - 1], device=device)
        bias = position_bias(pos, k_len, dtype)
        sdpa = partial(sdpa_decode, q, kv, new, pos, bias, scale)
        times["sdpa"].append(graph_us(sdpa, backends))
        times["flash"].append(graph_us(partial(flash_decode, q, kv[0], kv[1], new, pos, scale)))
    faster = all(f < s for f, s in zip(times["flash"], times["sdpa"], strict=True))
    best = "flash" if faster else "sdpa"
    log.info(
        "decode attention, 256 / 2048 keys: sdpa %s us, flash %s us -> %s",
        " / ".join(f"{t:.1f}" for t in times["sdpa"]),
        " / ".join(f"{t:.1f}" for t in times["flash"]), best,
    )  # fmt: skip
    return best
