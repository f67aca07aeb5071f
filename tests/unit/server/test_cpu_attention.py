"""The CPU decode kernels. Attention writes each row's new key and value where the batched
matmuls' step would, attends as float32 attention over the same keys does (fp32 and bf16, with
and without grouped heads, rows out of order at different positions, rotating q and k itself as
transformers does), and refuses bad input with an error instead of reading outside the arena.
RMSNorm (with its residual add) and SiLU-and-multiply equal the modules' ops."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from server import cpu_attention
from server.engine_decode import grouped_attention, position_bias

ROWS, COLUMNS = 5, 48  # arena rows and columns


@pytest.fixture(scope="module")
def kernel():
    module = cpu_attention.load_kernel()
    if module is None:
        pytest.skip("the C++ kernel did not build here (see the warning)")
    return module


def reference(arena, q, k, v, rows, positions, scale):
    """The same step in float32 ops: write k/v, then masked attention per row."""
    arena = arena.clone()
    arena[0, rows, :, positions] = k
    arena[1, rows, :, positions] = v
    keys = arena[0, rows].float()  # [B, Hkv, C, Dh]
    values = arena[1, rows].float()
    bias = position_bias(positions, arena.shape[3], torch.float32)  # [B, 1, 1, C]
    out = grouped_attention(q.float()[:, :, None], keys, values, bias, scale)  # [B, H, 1, Dh]
    return arena, out[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim", [(4, 2, 16), (6, 2, 64), (4, 4, 128), (4, 2, 48)]
)
def test_kernel_matches_float32_attention(kernel, dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(0)
    arena = torch.randn(2, ROWS, kv_heads, COLUMNS, head_dim, generator=gen).to(dtype)
    rows = torch.tensor([3, 0, 4])  # out of order, row 1 and 2 left alone
    positions = torch.tensor([0, 17, 47])  # one key, some, the arena's last column
    q = (3 * torch.randn(3, heads, head_dim, generator=gen)).to(dtype)
    k = torch.randn(3, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(3, kv_heads, head_dim, generator=gen).to(dtype)
    expected_arena, expected = reference(arena, q, k, v, rows, positions, 0.3)
    got = cpu_attention.decode_attention(kernel, arena, q, k, v, rows, positions, 0.3)
    assert got.shape == (3, heads, head_dim) and got.dtype == dtype
    assert torch.equal(arena, expected_arena)  # the new K/V landed, nothing else moved
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's rounding
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_kernel_reads_strided_queries(kernel):
    """q/k/v as the step has them: head-strided views of one projection output."""
    gen = torch.Generator().manual_seed(1)
    arena = torch.randn(2, ROWS, 2, COLUMNS, 16, generator=gen)
    qkv = torch.randn(2, 8 * 16, generator=gen).view(2, 8, 16)  # [B, H + 2 Hkv, Dh]
    q, k, v = qkv.split([4, 2, 2], dim=1)  # views, not contiguous as a whole
    rows, positions = torch.tensor([1, 2]), torch.tensor([5, 9])
    expected_arena, expected = reference(arena, q, k, v, rows, positions, 0.25)
    got = cpu_attention.decode_attention(kernel, arena, q, k, v, rows, positions, 0.25)
    assert torch.equal(arena, expected_arena)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(positions=torch.tensor([COLUMNS])), "outside the arena"),
        (dict(rows=torch.tensor([ROWS])), "outside the arena"),
        (dict(rows=torch.tensor([0], dtype=torch.int32)), "int64"),
        (dict(q=torch.zeros(1, 3, 16)), "multiple of K/V heads"),
        (dict(k=torch.zeros(1, 2, 16, dtype=torch.bfloat16)), "share a dtype"),
        (dict(k=torch.zeros(1, 1, 16)), r"\[B, Hkv, Dh\]"),
        (
            dict(
                q=torch.zeros(2, 4, 16),
                k=torch.zeros(2, 2, 16),
                v=torch.zeros(2, 2, 16),
                rows=torch.tensor([2, 2]),
                positions=torch.tensor([1, 2]),
            ),
            "distinct",
        ),
    ],
)
def test_kernel_refuses_bad_input(kernel, change, message):
    args = dict(
        kv=torch.zeros(2, ROWS, 2, COLUMNS, 16), q=torch.zeros(1, 4, 16), k=torch.zeros(1, 2, 16),
        v=torch.zeros(1, 2, 16), rows=torch.tensor([0]), positions=torch.tensor([3]),
    )  # fmt: skip
    args |= change
    with pytest.raises(RuntimeError, match=message):
        cpu_attention.decode_attention(kernel, *args.values(), 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_rotates_as_transformers(kernel, dtype):
    """With cos/sin the kernel rotates q and k itself: the key it writes is the one
    `apply_rotary_pos_emb` gives, bit for bit, and the output that of attending the rotated q."""
    gen = torch.Generator().manual_seed(3)
    arena = torch.randn(2, ROWS, 2, COLUMNS, 64, generator=gen).to(dtype)
    q, k, v = (torch.randn(3, n, 64, generator=gen).to(dtype) for n in (6, 2, 2))
    rows, positions = torch.tensor([2, 0, 4]), torch.tensor([9, 0, 40])
    angles = positions[:, None] / 10_000 ** (torch.arange(32) / 32)  # [B, Dh / 2]
    cos = torch.cat([angles.cos()] * 2, dim=-1).to(dtype)  # [B, Dh], Llama's layout
    sin = torch.cat([angles.sin()] * 2, dim=-1).to(dtype)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)  # [B, heads, Dh]
    expected_arena, expected = reference(arena, q_rot, k_rot, v, rows, positions, 0.125)
    got = cpu_attention.decode_attention(kernel, arena, q, k, v, rows, positions, 0.125, cos, sin)
    assert torch.equal(arena, expected_arena)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu_attention.decode_attention(kernel, arena, q, k, v, rows, positions, 0.1, cos, None)
    with pytest.raises(RuntimeError, match="cos and sin"):
        cpu_attention.decode_attention(kernel, arena, q, k, v, rows, positions, 0.1, cos, sin[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norm_and_mlp_ops_equal_the_modules(kernel, dtype):
    gen = torch.Generator().manual_seed(4)
    x, delta = (torch.randn(5, 96, generator=gen).to(dtype) for _ in range(2))
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(96, generator=gen).to(dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=0, atol=0)
    torch.testing.assert_close(cpu_attention.rms_norm(kernel, x, norm.weight, 1e-5), norm(x), **tol)
    summed = x.clone()
    got = cpu_attention.add_rms_norm(kernel, summed, delta, norm.weight, 1e-5)
    assert torch.equal(summed, x + delta)  # the residual stream, added in place
    torch.testing.assert_close(got, norm(x + delta), **tol)
    gate_up = torch.randn(5, 2 * 80 + 16, generator=gen).to(dtype)[:, :160]  # rows strided
    gate, up = gate_up.chunk(2, -1)  # fp32: ATen's scalar and vector SiLU differ in the last bit
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(cpu_attention.silu_mul(kernel, gate_up), expected, **tol)


def test_norm_and_mlp_ops_refuse_bad_input(kernel):
    x = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="weight must be"):
        cpu_attention.rms_norm(kernel, x, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="delta must be"):
        cpu_attention.add_rms_norm(kernel, x, torch.zeros(2, 7), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_attention.rms_norm(kernel, x.half(), torch.ones(8).half(), 1e-5)
    with pytest.raises(RuntimeError, match=r"\[N, 2 I\]"):
        cpu_attention.silu_mul(kernel, torch.zeros(2, 7))


def test_kernels_run_on_the_intra_op_threads(kernel):
    """Built with OpenMP (its loops run serially without it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite's earlier tests may have left 1 on this thread
    try:
        assert kernel.parallel_tasks() == 2
    finally:
        torch.set_num_threads(before)


def test_kernel_calls_leave_the_thread_count_alone(kernel):
    """An engine thread set to 2 intra-op threads keeps them through kernel calls after another
    thread set 1 (built on at::parallel_for, the kernels' first call on the engine thread reset
    it to the count set last anywhere, and every prefill after it ran on one core)."""
    main_threads, seen = torch.get_num_threads(), []
    engine_ready, main_done = threading.Event(), threading.Event()

    def engine() -> None:
        torch.set_num_threads(2)
        torch.get_num_threads()  # torch's own lazy thread-count set-up for this thread, done
        engine_ready.set()
        main_done.wait()
        kernel.rms_norm(torch.ones(64, 16), torch.ones(16), 1e-5)
        seen.append((torch.get_num_threads(), kernel.parallel_tasks()))

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        engine_ready.wait()
        torch.set_num_threads(1)  # as the server's main thread does (server/threads.py)
    finally:
        main_done.set()
        thread.join()
        torch.set_num_threads(main_threads)
    assert seen == [(2, 2)]


def test_kernel_support_by_shape():
    lanes = cpu_attention.VECTOR_FLOATS[cpu_attention.capability()]
    assert cpu_attention.kernel_supports(torch.float32, 32, 32, 128)  # Llama-2-7B
    assert cpu_attention.kernel_supports(torch.bfloat16, 9, 3, 64)  # SmolLM2-135M
    assert not cpu_attention.kernel_supports(torch.float16, 9, 3, 64)
    assert not cpu_attention.kernel_supports(torch.float32, 8, 3, 64)
    assert not cpu_attention.kernel_supports(torch.float32, 4, 2, lanes + 1)


def test_a_failing_build_leaves_the_matmuls(monkeypatch, caplog):
    def refuse(**kwargs):
        raise RuntimeError("ninja is required to load C++ extensions")

    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", refuse)
    cpu_attention._load_kernel.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert cpu_attention.load_kernel() is None
    finally:
        cpu_attention._load_kernel.cache_clear()  # later callers build (or load) the real one
    assert "using batched matmuls" in caplog.text and "ninja" in caplog.text


RUNNABLE = {"AVX512": ["AVX512", "AVX2", "DEFAULT"], "AVX2": ["AVX2", "DEFAULT"]}


@pytest.mark.slow
@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_other_capabilities_build_and_attend_alike(cap):
    """The builds other machines get (AVX2, scalar), where this one can run them (~30 s each)."""
    if cap not in RUNNABLE.get(cpu_attention.capability(), ["DEFAULT"]):
        pytest.skip(f"this CPU cannot run the {cap} build")
    module = cpu_attention.build_kernel(cap)
    gen = torch.Generator().manual_seed(2)
    arena = torch.randn(2, ROWS, 2, COLUMNS, 64, generator=gen)
    q, k, v = (torch.randn(2, n, 64, generator=gen) for n in (6, 2, 2))
    rows, positions = torch.tensor([4, 1]), torch.tensor([30, 2])
    expected_arena, expected = reference(arena, q, k, v, rows, positions, 0.125)
    got = cpu_attention.decode_attention(module, arena, q, k, v, rows, positions, 0.125)
    assert torch.equal(arena, expected_arena)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    x, weight = torch.randn(3, 40, generator=gen), torch.randn(40, generator=gen)
    norm = LlamaRMSNorm(40, eps=1e-6)
    norm.weight.data = weight
    torch.testing.assert_close(module.rms_norm(x, weight, 1e-6), norm(x), rtol=1e-6, atol=1e-6)
    gate_up = torch.randn(3, 2 * 40, generator=gen)
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(
        module.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6
    )
