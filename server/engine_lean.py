"""Llama decode steps and packed prefills as plain tensor ops over the arena rows, with fused
q/k/v and gate/up weights.

Own forward rather than the HF one because a decode step of a small model is bound by streaming
its weights plus per-op overhead: the HF modules' plumbing (cache objects, mask builders, kwargs
through every layer) and MKL's fp32 GEMM, which on this project's CPUs falls to a third of the
memory bandwidth for 2 to 16 rows. q/k/v and gate/up weights become views into one fused tensor
each (no second copy; HF's forward, `generate` and training see the same parameters). On CPU,
several rows (a batched step, a prefill chunk) read a second copy of the weights in oneDNN's
packed layout (`torch.ops.mkldnn`, the kernels inductor's CPU freezing pass uses): measured on
SmolLM2, 2 cores, all 121 projections take 31 ms for 4 rows and 60 for 16, against 83 and 82 ms
through `F.linear`, and 46 vs 62 ms for a 128-token chunk (per 10 layers); models over
`PACK_MAX_BYTES` skip the copy. With `compiled`, CPU decode steps attend (and write their K/V)
through the C++ kernel of server/cpu_attention.py where it builds. Used for Llama-architecture
models only (`lean_support` says why another is refused); others keep the HF forward.

Dims: B decoding rows, N prefill tokens (all segments), H query heads, Hkv key/value heads,
G query heads per K/V head, K key positions, Dh head width, D LLM width, I MLP width,
V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server import cpu_attention
from server.engine_batch import Arena, PackedPrefill, attention_shape
from server.engine_compiled import CompiledRowStep
from server.engine_decode import (
    grouped_attention,
    lay_out_for_decode,
    make_decode_bias,
    position_bias,
)
from server.engine_fused import NO_SPLIT, FusedPieces
from server.engine_graphs import GraphedDecode

log = logging.getLogger(__name__)

LEAN_MODEL_TYPES = ("llama",)  # configs whose decoder layer is exactly Llama's
PACK_ROWS = 16  # rows oneDNN's packed layout is tuned for (1 to 16 all run well with it)
PACK_PAD = 64  # zero rows added to a packed weight with a multiple of 1024 rows (pack_weight)
PACK_MAX_BYTES = 8 << 30  # bytes; larger CPU models decode from their own weights
PACK_DTYPES = (torch.float32, torch.bfloat16)
# CUDA attention: masks rule out flash; no cuDNN (`LeanDecode._attention_backends`)
CUDA_SDPA_BACKENDS = [
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.MATH,
]


class DecodeLinear:
    """x [N, in] -> x W^T + b [N, out]: through oneDNN's packed copy of W where there is one
    (CPU; from one row on it beats MKL's GEMV: SmolLM2, 2 cores, a one-row step 35 vs 45 ms in
    fp32, 24-27 vs 30-36 ms in bf16), else through W itself (an [out, in] view)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias  # [out] or None
        self.out = weight.shape[0]
        self.packed, self.packed_bias = pack_weight(weight, bias) if pack else (None, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.packed_bias, "none", [], "")
        return y if y.shape[-1] == self.out else y[:, : self.out]  # [N, out]


def pack_weight(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """oneDNN's packed copy of W [out, in] (and the bias to use with it). A weight whose `out`
    is a multiple of 1024 gets `PACK_PAD` zero rows first: oneDNN runs such shapes at half speed
    for 4 to 16 rows (SmolLM2's gate/up [3072, 576], 2 cores, 16 rows: 1085 us vs 547 us for
    [3136, 576]; 4 rows: 452 vs 368 us; the LM head [49152, 576] is as fast either way)."""
    w = weight.detach()
    if w.shape[0] % 1024 == 0:
        w = torch.cat([w, w.new_zeros(PACK_PAD, w.shape[1])])  # [out + PACK_PAD, in]
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(PACK_PAD)])
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS), bias


@dataclass
class LeanLayer:
    """One decoder layer as the step runs it."""

    norm_in: torch.nn.Module
    norm_post: torch.nn.Module
    qkv: DecodeLinear  # D -> (H + 2 Hkv) Dh
    o_proj: DecodeLinear  # H Dh -> D
    gate_up: DecodeLinear  # D -> 2 I
    down_proj: DecodeLinear  # I -> D
    act: torch.nn.Module
    scaling: float


def rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm module's output as one `F.rms_norm` (float32 inside, as the module)."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [..., Dh] by cos/sin broadcast to it (Llama's half-split pairs,
    as `apply_rotary_pos_emb`) -> x's shape."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # [..., Dh]
    return torch.addcmul(x * cos, turned, sin)


def lean_support(model: torch.nn.Module) -> str | None:
    """None when `LeanDecode` can run this model, else why not."""
    cfg = model.config
    if cfg.model_type not in LEAN_MODEL_TYPES:
        return f"model type {cfg.model_type!r} is not one of {LEAN_MODEL_TYPES}"
    if getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no model.layers / model.rotary_emb"
    return None


def should_pack(model: torch.nn.Module, weight_bytes: int) -> bool:
    """oneDNN-packed decode weights: CPU, fp32/bf16, oneDNN present, not too big to copy."""
    return (
        model.device.type == "cpu"
        and model.dtype in PACK_DTYPES
        and torch.backends.mkldnn.is_available()
        and weight_bytes <= PACK_MAX_BYTES
    )


def fuse_linears(
    linears: list[torch.nn.Linear], transposed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store several Linears' weights in one tensor and point each Linear at its slice.

    Returns the fused weight [sum(out), in] (`transposed`: a transposed view whose storage is
    [in, sum(out)], the layout MKL's GEMV streams fastest) and the fused bias (None when none
    has one)."""
    parts = [lin.weight.detach() for lin in linears]  # [out_i, in]
    with torch.no_grad():
        if transposed:
            fused = torch.cat([w.t() for w in parts], dim=1).contiguous().t()  # [sum(out), in]
        else:
            fused = torch.cat(parts).contiguous()  # [sum(out), in]
        row = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight.data = fused[row : row + n]  # [out_i, in] view, same values
            row += n
    return fused, concat_biases(linears)


def concat_biases(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    """The Linears' biases end to end [sum(out)] (zeros for one without); None if none has."""
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([
        lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
        for lin in linears
    ])  # fmt: skip


def decode_linear(linears: list[torch.nn.Linear], pack: bool, transposed: bool) -> DecodeLinear:
    """One `DecodeLinear` computing the given Linears side by side (outputs concatenated)."""
    if len(linears) == 1:  # the Parameter itself: a later re-layout (lay_out_for_decode) shows
        return DecodeLinear(linears[0].weight, linears[0].bias, pack)
    return DecodeLinear(*fuse_linears(linears, transposed), pack)


class LeanDecode:
    """The engine's forward passes for a Llama: a decode step for arena rows [lo, hi) (a token
    per row in, its logits out) and a packed prefill of several requests' chunks."""

    def __init__(
        self, model: torch.nn.Module, pack: bool | None = None, compiled: bool = False
    ) -> None:
        """`pack`: keep oneDNN-packed weight copies (default: `should_pack`); `compiled`: on CPU,
        one-row steps through `CompiledRowStep` (compiled here, falling back to the eager step
        where compiling fails); on CUDA, every step replayed from CUDA graphs (`GraphedDecode`)
        of the static step with its pointwise work fused (`FusedPieces`, compiled here; without
        them where compiling fails)."""
        reason = lean_support(model)
        if reason is not None:
            raise ValueError(f"lean decode does not support this model: {reason}")
        self.heads, self.kv_heads, self.head_dim = attention_shape(model.config)
        self.embed = model.get_input_embeddings()
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.packed = should_pack(model, weight_bytes) if pack is None else pack
        device = model.device.type
        # CUDA: RMSNorm as one kernel and q/k rotated together (eager steps and prefills are
        # bound by kernel launches there); CPU keeps the modules' ops, as measured there
        self.fused_ops = device == "cuda"
        if compiled and device not in ("cpu", "cuda"):
            log.info("no compiled decode step for %s; it decodes with the lean step", device)
            compiled = False
        compile_row = compiled and device == "cpu"
        if compile_row:  # the compiled step streams [out, in] rows: undo an earlier re-layout
            lay_out_for_decode(model, transposed=False)
        transposed = device == "cpu" and not compile_row  # [in, out]: MKL's GEMV
        self.lm_head = decode_linear([model.get_output_embeddings()], self.packed, transposed)
        self.layers = [self._layer(layer, self.packed, transposed) for layer in model.model.layers]
        copy = f", oneDNN-packed weight copy (+{weight_bytes / 1e6:.0f} MB)"
        log.info(
            "lean decode step: %d layers, q/k/v and gate/up fused in place%s", len(self.layers),
            copy if self.packed else "",
        )  # fmt: skip
        self.row_step = self._compiled_row_step(model) if compile_row else None
        # decode attention, one row or several, through the C++ kernel (server/cpu_attention.py)
        self.attention_kernel = self._attention_kernel(model) if compile_row else None
        self.graphs = GraphedDecode(self) if compiled and device == "cuda" else None
        self.fused = self._fused_pieces(model) if self.graphs is not None else None

    def _fused_pieces(
        self, model: torch.nn.Module, splits: dict | None = None
    ) -> FusedPieces | None:
        """Compiled `FusedPieces` (split-K where timed faster; without it where that fails to
        compile), or None where compiling fails."""
        fused = None
        try:
            fused = FusedPieces(self, model.config, splits)
            fused.warm_up()
        except Exception as exc:  # an op inductor cannot lower, no Triton, ...
            if fused is not None and fused.splits != NO_SPLIT:  # the split may be what failed
                log.warning("fused decode pieces failed to compile, again without split-K: %r", exc)
                return self._fused_pieces(model, NO_SPLIT)
            log.warning(
                "compiling the fused decode pieces failed, graphing the plain step: %r", exc
            )
            return None
        return fused

    def _compiled_row_step(self, model: torch.nn.Module) -> CompiledRowStep | None:
        try:
            row_step = CompiledRowStep(self, model.config)
            row_step.warm_up()
        except Exception as exc:  # no C++ compiler, an op inductor cannot lower, ...
            log.warning("compiling the one-row decode step failed, using the eager one: %r", exc)
            return None
        return row_step

    def _attention_kernel(self, model: torch.nn.Module) -> object | None:
        """The built C++ attention kernel's module for this model, or None."""
        if not cpu_attention.kernel_supports(model.dtype, self.heads, self.kv_heads, self.head_dim):
            return None
        return cpu_attention.load_kernel()

    @staticmethod
    def _layer(layer: torch.nn.Module, pack: bool, transposed: bool) -> LeanLayer:
        attn, mlp = layer.self_attn, layer.mlp
        return LeanLayer(
            norm_in=layer.input_layernorm,
            norm_post=layer.post_attention_layernorm,
            qkv=decode_linear([attn.q_proj, attn.k_proj, attn.v_proj], pack, transposed),
            o_proj=decode_linear([attn.o_proj], pack, transposed),
            gate_up=decode_linear([mlp.gate_proj, mlp.up_proj], pack, transposed),
            down_proj=decode_linear([mlp.down_proj], pack, transposed),
            act=mlp.act_fn,
            scaling=attn.scaling,
        )

    @torch.inference_mode()
    def step(
        self, arena: Arena, lo: int, hi: int, positions: list[int], tokens: list[int]
    ) -> torch.Tensor:
        """Rows [lo, hi) feed `tokens` at `positions` (their K/V land there) -> logits [B, V]."""
        if self.graphs is not None:
            return self.graphs.step(arena, lo, hi, positions, tokens)
        device, rows = arena.device, hi - lo
        if rows == 1 and self.row_step is not None:
            return self.row_step.step(arena, lo, positions[0], tokens[0])
        ids = torch.tensor(tokens, device=device)  # [B]
        pos = torch.tensor(positions, device=device)  # [B]
        x = self.embed(ids)  # [B, D]
        cos, sin = self.rotary(x, pos[:, None])  # [B, 1, Dh] each
        if (kernel := self.attention_kernel) is not None:
            return self._kernel_step(kernel, arena, lo, hi, x, pos, cos, sin)
        bias = make_decode_bias(positions, x.dtype, device)  # [B, 1, 1, K] or None
        row, col = (lo, positions[0]) if rows == 1 else (torch.arange(lo, hi, device=device), pos)
        k_len = max(positions) + 1

        def attend(layer: LeanLayer, h: torch.Tensor, index: int) -> torch.Tensor:
            q, k, v = self._qkv(layer, h[:, None], cos, sin)  # [B, H, 1, Dh], [B, Hkv, 1, Dh] x2
            kv = arena.data[index]  # [2, R, Hkv, C, Dh]
            kv[0, row, :, col] = k[:, :, 0] if rows > 1 else k[0, :, 0]  # [B, Hkv, Dh] / [Hkv, Dh]
            kv[1, row, :, col] = v[:, :, 0] if rows > 1 else v[0, :, 0]
            keys, values = kv[0, lo:hi, :, :k_len], kv[1, lo:hi, :, :k_len]  # [B, Hkv, K, Dh]
            if rows == 1:
                out = F.scaled_dot_product_attention(
                    q, keys, values, scale=layer.scaling, enable_gqa=self.kv_heads != self.heads
                )  # [1, H, 1, Dh]
            else:
                out = grouped_attention(q, keys, values, bias, layer.scaling)  # [B, H, 1, Dh]
            return layer.o_proj(out.reshape(rows, -1))  # [B, D]

        return self.lm_head(self._norm(self.norm, self._layers(x, attend)))  # [B, V]

    def _kernel_step(
        self,
        kernel: object,
        arena: Arena,
        lo: int,
        hi: int,
        x: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """`step` for rows [lo, hi) on CPU with attention and K/V writes in `kernel`
        (server/cpu_attention.py)."""
        rows = torch.arange(lo, hi)  # [B]

        def attend(layer: LeanLayer, h: torch.Tensor, index: int) -> torch.Tensor:
            q, k, v = self._qkv(layer, h[:, None], cos, sin)  # [B, H, 1, Dh], [B, Hkv, 1, Dh] x2
            out = cpu_attention.decode_attention(
                kernel, arena.data[index], q[:, :, 0], k[:, :, 0], v[:, :, 0], rows, pos,
                layer.scaling,
            )  # [B, H, Dh]  # fmt: skip
            return layer.o_proj(out.view(hi - lo, -1))  # [B, D]

        return self.lm_head(self._norm(self.norm, self._layers(x, attend)))  # [B, V]

    @torch.inference_mode()
    def static_step(
        self, arena: Arena, lo: int, hi: int, ids: torch.Tensor, pos: torch.Tensor, k_len: int
    ) -> torch.Tensor:
        """As `step` with token ids [B] and positions pos [B] as tensors and a fixed key range
        of `k_len` columns (each row masks those past its position): the same kernels on the
        same buffers for every position below `k_len`, which a CUDA graph can replay. With
        `fused_ops` (CUDA) it runs ~18 kernels a layer against `step`'s ~40 on the module ops
        (in a graph each costs a few microseconds whatever its size), attention being one SDPA
        call with each K/V head's query heads as its queries; with `fused` (compiled pieces),
        ~10."""
        if self.fused is not None:
            return self.fused.static_step(arena, lo, hi, ids, pos, k_len)
        rows = hi - lo
        x = self.embed(ids)  # [B, D]
        cos, sin = self.rotary(x, pos[:, None])  # [B, 1, Dh] each
        bias = position_bias(pos, k_len, x.dtype)  # [B, 1, 1, K]
        row = torch.arange(lo, hi, device=arena.device)  # [B]

        def attend(layer: LeanLayer, h: torch.Tensor, index: int) -> torch.Tensor:
            q, k, v = self._qkv(layer, h[:, None], cos, sin)  # [B, H, 1, Dh], [B, Hkv, 1, Dh] x2
            kv = arena.data[index]  # [2, R, Hkv, C, Dh]
            kv[0, row, :, pos] = k[:, :, 0]  # [B, Hkv, Dh]
            kv[1, row, :, pos] = v[:, :, 0]
            keys, values = kv[0, lo:hi, :, :k_len], kv[1, lo:hi, :, :k_len]  # [B, Hkv, K, Dh]
            grouped = q.reshape(rows, self.kv_heads, -1, self.head_dim)  # [B, Hkv, G, Dh]
            out = F.scaled_dot_product_attention(
                grouped, keys, values, attn_mask=bias, scale=layer.scaling
            )  # [B, Hkv, G, Dh]
            return layer.o_proj(out.reshape(rows, -1))  # [B, D]

        with self._attention_backends():
            x = self._layers(x, attend)  # [B, D]
        return self.lm_head(self._norm(self.norm, x))  # [B, V]

    @torch.inference_mode()
    def prefill(
        self,
        arena: Arena,
        packed: PackedPrefill,
        embeds: list[torch.Tensor],
        logits_of: list[int],
    ) -> torch.Tensor:
        """Chunks [Q_i, D] of `packed`'s segments as one sequence; each segment's K/V land in its
        row -> logits [n, V] at the last position of the segments listed in `logits_of`."""
        x = torch.cat(embeds)  # [N, D]
        cos, sin = self.rotary(x, packed.positions()[None])  # [1, N, Dh] each

        def attend(layer: LeanLayer, h: torch.Tensor, index: int) -> torch.Tensor:
            q, k, v = self._qkv(layer, h[None], cos, sin)  # [1, H, N, Dh], [1, Hkv, N, Dh] x2
            packed.write(index, k, v)
            out = packed.attend(index, q, layer.scaling)[0].transpose(0, 1)  # [N, H, Dh]
            return layer.o_proj(out.reshape(x.shape[0], -1))  # [N, D]

        with self._attention_backends():
            hidden = self._layers(x, attend)  # [N, D]
        return self.lm_head(self._norm(self.norm, hidden[packed.last_positions(logits_of)]))

    def _attention_backends(self) -> contextlib.AbstractContextManager:
        """On CUDA, attention without cuDNN's SDPA backend (prefills and the graphed step).
        Every turn's prefill has a new (queries, keys) shape, for which cuDNN builds a plan: on
        an H100 (7B, bf16) with it a session turn's 70-90-position prefill took 50-60 ms against
        13 ms for one position, and a 5 s audio turn's first text came 70-105 ms after the
        request; without it 21-41 ms at turn 1 and 16-25 ms at turn 10 (the memory-efficient
        kernel needs no plan)."""
        if not self.fused_ops:  # CPU
            return contextlib.nullcontext()
        return sdpa_kernel(CUDA_SDPA_BACKENDS)

    def _layers(self, x: torch.Tensor, attend) -> torch.Tensor:
        """x [N, D] through every decoder layer; `attend(layer, normed, layer_index)` -> [N, D]."""
        for i, layer in enumerate(self.layers):
            x = x + attend(layer, self._norm(layer.norm_in, x), i)
            gate, up = layer.gate_up(self._norm(layer.norm_post, x)).chunk(2, -1)  # [N, I] each
            x = x + layer.down_proj(layer.act(gate) * up)  # [N, D]
        return x

    def _qkv(
        self, layer: LeanLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [B, T, D] -> rotated q [B, H, T, Dh], rotated k and v [B, Hkv, T, Dh]."""
        b, t, _ = h.shape
        qkv = layer.qkv(h.reshape(b * t, -1))  # [B T, (H + 2 Hkv) Dh]
        if self.fused_ops:  # q and k heads rotated together: 4 kernels, not ~10
            split = self.heads + self.kv_heads
            heads = qkv.view(b, t, -1, self.head_dim)  # [B, T, H + 2 Hkv, Dh]
            qk = rotate(heads[:, :, :split], cos[:, :, None], sin[:, :, None])  # [B, T, H+Hkv, Dh]
            q, k = qk.transpose(1, 2).split([self.heads, self.kv_heads], dim=1)
            return q, k, heads[:, :, split:].transpose(1, 2)
        q, k, v = (
            qkv.view(b, t, -1, self.head_dim)
            .transpose(1, 2)
            .split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        )  # [B, H, T, Dh], [B, Hkv, T, Dh] x2
        q, k = apply_rotary_pos_emb(q, k, cos, sin)  # same shapes
        return q, k, v

    def _norm(self, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(norm, x) if self.fused_ops else norm(x)
