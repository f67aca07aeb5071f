"""Decode attention alone (CUDA): one query per row over its cached keys, as the graphed decode
step runs it per layer, through each SDPA backend, two batched matmuls (`grouped_attention`) and
a split-K Triton kernel ("flash decoding"), against the time to read the K/V once.

Why: on an H100 (Llama-2-7B shape, bf16, one row, 256 keys) the step's attention is SDPA's
memory-efficient kernel at ~13 us a layer (0.42 ms of the 6.2 ms step) while its K/V (4 MB a
layer) stream in ~1.4 us; its tiles are 64 queries tall and each row has one. 0.3 ms off the
step is what stands between the worker and 75% of the bandwidth bound.

Usage:
  python bench/bench_attention.py                     # Llama-2-7B shape: 32 heads of 128
  python bench/bench_attention.py --heads 32 --kv-heads 8 --rows 1 16 --keys 256 1024 4096
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.engine_decode import grouped_attention, position_bias  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

REPS = 200
CHUNK = 64  # keys per program of the split-K kernel

if triton is not None:

    @triton.jit
    def _partial_kernel(
        q_ptr, k_ptr, v_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr, scale,
        HKV, G, S,
        sq_b, sq_h, sq_g, sk_b, sk_h, sk_k, sv_b, sv_h, sv_k,
        DH: tl.constexpr, BLOCK_G: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        """One (row, K/V head) and one chunk of keys: the chunk's max, sum of exp and
        exp-weighted values for each of the head's G queries."""
        bh, s = tl.program_id(0), tl.program_id(1)
        b, h = bh // HKV, bh % HKV
        n = tl.load(lens_ptr + b)  # this row's keys
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, DH)
        k = s * CHUNK + tl.arange(0, CHUNK)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :],
                    mask=g[:, None] < G, other=0.0)  # fmt: skip
        keys = tl.load(k_ptr + b * sk_b + h * sk_h + k[:, None] * sk_k + d[None, :],
                       mask=k[:, None] < n, other=0.0)  # fmt: skip
        scores = tl.dot(q, tl.trans(keys)).to(tl.float32) * scale  # [BLOCK_G, CHUNK]
        scores = tl.where(k[None, :] < n, scores, float("-inf"))
        m = tl.max(scores, axis=1)  # [BLOCK_G]
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp(scores - m_safe[:, None])
        l_sum = tl.sum(p, axis=1)
        values = tl.load(v_ptr + b * sv_b + h * sv_h + k[:, None] * sv_k + d[None, :],
                         mask=k[:, None] < n, other=0.0)  # fmt: skip
        acc = tl.dot(p.to(values.dtype), values)  # [BLOCK_G, DH] (fp32)
        row = (bh * S + s) * BLOCK_G + g
        tl.store(m_ptr + row, m)
        tl.store(l_ptr + row, l_sum)
        tl.store(acc_ptr + row[:, None] * DH + d[None, :], acc)

    @triton.jit
    def _combine_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, G, S, so_bh, so_g,
        DH: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        """Rescale each chunk's partial sums to the largest max and add them up."""
        bh = tl.program_id(0)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, DH)
        for gi in range(0, G):
            rows = (bh * S + s) * BLOCK_G + gi
            m = tl.load(m_ptr + rows, mask=s < S, other=float("-inf"))
            top = tl.max(m, axis=0)
            w = tl.where(s < S, tl.exp(m - top), 0.0)  # chunks past the row's keys: 0
            total = tl.sum(w * tl.load(l_ptr + rows, mask=s < S, other=0.0), axis=0)
            acc = tl.load(acc_ptr + rows[:, None] * DH + d[None, :], mask=s[:, None] < S, other=0.0)
            out = tl.sum(acc * w[:, None], axis=0) / total  # [DH]
            tl.store(out_ptr + bh * so_bh + gi * so_g + d, out.to(out_ptr.dtype.element_ty))


def split_k_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Hkv, G, Dh]; keys/values [B, Hkv, K, Dh] (strided views of the arena, last dim
    contiguous); lens [B] keys each row attends to -> [B, Hkv, G, Dh]."""
    b, hkv, g, dh = q.shape
    k_len = keys.shape[2]
    s = triton.cdiv(k_len, CHUNK)
    block_g = max(16, triton.next_power_of_2(g))  # tl.dot needs 16 rows
    m = q.new_empty(b * hkv * s * block_g, dtype=torch.float32)
    l_sum, acc = torch.empty_like(m), q.new_empty(b * hkv * s * block_g * dh, dtype=torch.float32)
    _partial_kernel[(b * hkv, s)](
        q, keys, values, lens, m, l_sum, acc, scale, hkv, g, s,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        DH=dh, BLOCK_G=block_g, CHUNK=CHUNK,
    )  # fmt: skip
    out = torch.empty_like(q)  # [B, Hkv, G, Dh] contiguous
    _combine_kernel[(b * hkv,)](
        m, l_sum, acc, out, g, s, out.stride(1), out.stride(2),
        DH=dh, BLOCK_G=block_g, BLOCK_S=triton.next_power_of_2(s),
    )  # fmt: skip
    return out


def candidates(q, keys, values, bias, lens, scale: float) -> list:
    """Calls to time, in the table's order after "read K/V": q [B, Hkv, G, Dh], keys/values
    [B, Hkv, K, Dh], bias [B, 1, 1, K], lens [B]."""
    rows, dh = q.shape[0], q.shape[-1]

    def sdpa(backend, mask=bias):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

        return run

    cases = [
        sdpa(SDPBackend.EFFICIENT_ATTENTION),
        sdpa(SDPBackend.CUDNN_ATTENTION),
        sdpa(SDPBackend.FLASH_ATTENTION, None),  # * no mask: every key, an upper bound
        sdpa(SDPBackend.MATH),
        lambda: grouped_attention(q.view(rows, -1, 1, dh), keys, values, bias, scale),
    ]
    if triton is not None:
        cases.append(lambda: split_k_attention(q, keys, values, lens, scale))
    return cases


def time_us(fn, reps: int = REPS) -> float:
    """Mean time of one call replayed from a CUDA graph of `reps` calls (as the step runs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--keys", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    hkv, g, dh = args.kv_heads, args.heads // args.kv_heads, args.head_dim
    scale = 1 / math.sqrt(dh)
    cap = max(args.keys) + 128
    print(f"{torch.cuda.get_device_name()}, {args.heads} query / {hkv} K/V heads of {dh}, bf16; "
          f"us a call, replayed from a CUDA graph")  # fmt: skip
    names = ["read K/V", "efficient", "cudnn", "flash*", "math", "matmuls"]
    names += ["split-K triton"] * (triton is not None)
    print(f"{'rows':>4} {'keys':>5} " + " ".join(f"{n:>14}" for n in names))
    for rows in args.rows:
        arena = torch.randn(2, rows, hkv, cap, dh, device=dev, dtype=dtype)  # as the engine's
        for k_len in args.keys:
            keys, values = arena[0, :, :, :k_len], arena[1, :, :, :k_len]  # strided views
            q = torch.randn(rows, hkv, g, dh, device=dev, dtype=dtype)
            pos = torch.randint(k_len // 2, k_len, (rows,), device=dev)
            pos[0] = k_len - 1
            bias = position_bias(pos, k_len, dtype)  # [B, 1, 1, K]
            lens = (pos + 1).to(torch.int32)
            expected = grouped_attention(q.view(rows, -1, 1, dh), keys, values, bias, scale)
            expected = expected.view(rows, hkv, g, dh)
            kv_bytes = 2 * keys.numel() * keys.element_size()
            row = [kv_bytes / 3.0e12 * 1e6]  # at ~3 TB/s

            cases = candidates(q, keys, values, bias, lens, scale)
            for i, case in enumerate(cases):
                try:
                    got = case().reshape(rows, hkv, g, dh)
                    if names[i + 1] != "flash*":
                        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
                    row.append(time_us(case))
                except Exception as err:  # a backend that refuses these shapes
                    print(f"  {names[i + 1]}: {type(err).__name__}: {str(err)[:120]}")
                    row.append(float("nan"))
            print(f"{rows:>4} {k_len:>5} " + " ".join(f"{t:>14.1f}" for t in row))


if __name__ == "__main__":
    main()
