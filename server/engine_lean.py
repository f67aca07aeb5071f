"""Llama decode steps and packed prefills as plain tensor ops over the arena rows, with fused
q/k/v and gate/up weights.

Own forward rather than the HF one because a decode step of a small model is bound by streaming
its weights plus per-op overhead: the HF modules' plumbing (cache objects, mask builders, kwargs
through every layer) and MKL's fp32 GEMM, which on this project's CPUs falls to a third of the
memory bandwidth for 2 to 16 rows. The projections are server/engine_linear.py's (fused weights;
on CPU a oneDNN-packed copy). With `compiled`, CPU decode steps run everything between their
projections (attention with its rotary embedding and K/V writes, norms with their residual adds,
SiLU-and-multiply) through the C++ kernels (server/engine_kernels.py) where they build. Used
for Llama-architecture models only (`lean_support` says why another is refused); others keep
the HF forward.

Dims: B decoding rows, N prefill tokens (all segments), H query heads, Hkv key/value heads,
G query heads per K/V head, K key positions, Dh head width, D LLM width, I MLP width,
V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server import cpu_attention, engine_kernels
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
from server.engine_linear import DecodeLinear, decode_linear, should_pack

log = logging.getLogger(__name__)

Attend = Callable[["LeanLayer", torch.Tensor, int], torch.Tensor]  # (layer, normed x, index)

LEAN_MODEL_TYPES = ("llama",)  # configs whose decoder layer is exactly Llama's
# CUDA attention: masks rule out flash; no cuDNN (`LeanDecode._attention_backends`)
CUDA_SDPA_BACKENDS = [
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.MATH,
]


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
        # bound by kernel launches there); CPU keeps the modules' ops where the C++ kernels of
        # server/cpu_attention.py did not build (with them: server/engine_kernels.py)
        self.fused_ops = device == "cuda"
        self.silu = model.config.hidden_act == "silu"  # the kernels' SiLU-and-multiply applies
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
        # the C++ kernels' module (server/cpu_attention.py): attention of one-row steps, and
        # everything between the projections of several-row steps and prefills; None: torch ops
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
        """The built C++ kernels' module where they handle this model, or None."""
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
            return self.lm_head(
                engine_kernels.step_layers(self, kernel, arena, lo, hi, x, pos, cos, sin)
            )
        attend = self._eager_attend(arena, lo, hi, positions, x.dtype, pos, cos, sin)
        return self.lm_head(self._norm(self.norm, self._layers(x, attend)))  # [B, V]

    def _eager_attend(
        self,
        arena: Arena,
        lo: int,
        hi: int,
        positions: list[int],
        dtype: torch.dtype,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> Attend:
        """`step`'s attention for rows [lo, hi) as torch ops: K/V writes into the arena, then
        SDPA for one row, batched matmuls with a mask per row for several."""
        device, rows = arena.device, hi - lo
        bias = make_decode_bias(positions, dtype, device)  # [B, 1, 1, K] or None
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

        return attend

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

        last = packed.last_positions(logits_of)
        if (kernel := self.attention_kernel) is not None:  # CPU: the kernels' norms and SiLU
            return self.lm_head(engine_kernels.norm_layers(self, kernel, x, attend)[last])
        with self._attention_backends():
            hidden = self._layers(x, attend)  # [N, D]
        return self.lm_head(self._norm(self.norm, hidden[last]))

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

    def _layers(self, x: torch.Tensor, attend: Attend) -> torch.Tensor:
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
