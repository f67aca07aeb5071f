"""The graphed decode step's work between attentions, compiled by inductor into a few fused
kernels (CUDA; any device in tests).

Own pieces rather than `torch.compile` of the whole step: in a CUDA graph each of the static
step's ~18 kernels a layer costs a few microseconds whatever its size, and the pointwise ones
(residual adds, RMSNorm, rotary, SiLU x up, the K/V stack) fuse into four. Weights are inputs,
not constants, so the same three graphs (first layer, between layers, last layer) serve every
layer; the row count is dynamic after the first two sizes (compiled at `warm_up`, before any
capture: compiling inside a capture would fail it); attention over the arena runs between them:
a split-keys Triton kernel that also writes the step's K/V (server/engine_flashdecode.py) where
timing on the device says it beats SDPA, else SDPA after one indexed copy of the K/V.
Projections stay cuBLAS's, the MLP's two as split-K partial products where timing on the device
says so (server/engine_splitk.py).

Measured on an H100 (Llama-2-7B shape, bf16, one row, 256 keys; `bench/bench_step.py --profile`;
the weights stream in 4.45-4.48 ms): graphed plain step 6.86-6.89 ms (626 kernels, 6.73 ms of
kernel time), graphed fused 6.18-6.19 ms (496 kernels, 6.00 ms), of which the projections are
4.99 ms (2.68 TB/s against a 2.98 TB/s copy) and attention 0.42 ms. With inductor generating
one row's projections itself (multiply and sum, fused with the norm before) 6.61 ms (its GEMVs
slower than cuBLAS's); with torch's cuBLASLt path instead of cuBLAS 6.18 ms. Attending with
the split-keys kernel: 5.92 ms against 6.34 with SDPA in the same run (523 kernels, 5.66 ms).

Dims: B rows, H query heads, Hkv key/value heads, G query heads per K/V head, Dh head width,
D LLM width, I MLP width, K key positions, V vocabulary.
"""

from __future__ import annotations

import logging
import time
import types
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from server.engine_batch import Arena
from server.engine_compiled import layer_weights, llama_rms
from server.engine_decode import position_bias
from server.engine_flashdecode import BLOCK, flash_decode, pick_attention, sdpa_decode
from server.engine_splitk import pick_split, project

if TYPE_CHECKING:
    from server.engine_lean import LeanDecode
    from server.engine_linear import DecodeLinear

log = logging.getLogger(__name__)

WARM_ROWS = (1, 2, 3)  # row counts compiled at warm-up: 1 specialised, then dynamic
SPLIT_PROJECTIONS = ("gate_up", "down_proj")  # LeanLayer projections that may be split-K
NO_SPLIT = dict.fromkeys(SPLIT_PROJECTIONS, 1)

Linear = tuple[torch.Tensor, torch.Tensor | None]  # weight [out, in], bias [out] or None


def linear_of(linear: DecodeLinear) -> Linear:
    if linear.packed is not None:
        raise ValueError("the fused step reads the weights themselves, not oneDNN's packed copy")
    return linear.weight, linear.bias


def own_code(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own: dynamo keeps compiled entries per code object and
    stops at `recompile_limit` of them, and each instance (a model, a dtype) needs two."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


class FusedPieces:
    """`static_step(arena, lo, hi, ids, pos, k_len)` -> logits [B, V], as
    `LeanDecode.static_step` with the layers' pointwise work fused."""

    def __init__(
        self,
        lean: LeanDecode,
        config,
        splits: dict[str, int] | None = None,
        attention: str | None = None,
    ) -> None:
        """`splits`: the split-K of the gate/up and down projections (server/engine_splitk.py;
        default: timed on a CUDA device, 1 elsewhere). `attention`: "flash" (the Triton kernel)
        or "sdpa" (default: timed on a CUDA device, "sdpa" elsewhere)."""
        self.lean = lean
        eps, act = config.rms_norm_eps, lean.layers[0].act
        heads, kv_heads, head_dim = lean.heads, lean.kv_heads, lean.head_dim
        self.layers, self.final = layer_weights(lean, linear_of)
        linear = F.linear  # cuBLAS: inductor's own multiply-and-sum GEMV was slower (above)
        layer = lean.layers[0]
        self.splits = splits or {
            name: pick_split(*linear_of(getattr(layer, name)), name) for name in SPLIT_PROJECTIONS
        }
        gate_up_split, down_split = self.splits["gate_up"], self.splits["down_proj"]
        weight = layer.qkv.weight
        if attention is None:
            attention = "sdpa"
            if weight.device.type == "cuda":
                groups, backends = heads // kv_heads, lean._attention_backends
                attention = pick_attention(kv_heads, groups, head_dim, weight.dtype, backends)
        if attention not in ("flash", "sdpa"):
            raise ValueError(f"attention is 'flash' or 'sdpa', not {attention!r}")
        self.attention = attention

        def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return llama_rms(x, weight, eps)

        def first(x, norm_in, qkv, cos, sin):
            """x [B, D] -> grouped rotated q [B, Hkv, G, Dh], new K/V [B, 2, Hkv, Dh]."""
            rows = x.shape[0]
            out = linear(rms(x, norm_in), *qkv).view(rows, -1, head_dim)  # [B, H+2Hkv, Dh]
            qk, v = out[:, : heads + kv_heads], out[:, heads + kv_heads :]
            half = head_dim // 2
            turned = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + turned * sin  # cos/sin [B, 1, Dh]
            q, k = qk[:, :heads], qk[:, heads:]
            return q.reshape(rows, kv_heads, -1, head_dim), torch.stack((k, v), dim=1)

        def rest(x, att, o_proj, norm_post, gate_up, down):
            """The layer after attention: x [B, D], att [B, H Dh] -> x [B, D]."""
            x = x + linear(att, *o_proj)
            gate, up = project(rms(x, norm_post), *gate_up, gate_up_split).chunk(2, -1)
            return x + project(act(gate) * up, *down, down_split)  # gate, up: [B, I] each

        def middle(x, att, o_proj, norm_post, gate_up, down, norm_in, qkv, cos, sin):
            """This layer's rest, then the next layer's q and K/V."""
            x = rest(x, att, o_proj, norm_post, gate_up, down)
            return (x, *first(x, norm_in, qkv, cos, sin))

        def last(x, att, o_proj, norm_post, gate_up, down, norm, head):
            """The last layer's rest, the final norm and the LM head -> logits [B, V]."""
            return linear(rms(rest(x, att, o_proj, norm_post, gate_up, down), norm), *head)

        def compiled(fn):
            return torch.compile(own_code(fn), fullgraph=True)  # no cudagraphs: ours capture it

        self._first, self._middle, self._last = compiled(first), compiled(middle), compiled(last)

    def static_step(
        self, arena: Arena, lo: int, hi: int, ids: torch.Tensor, pos: torch.Tensor, k_len: int
    ) -> torch.Tensor:
        lean = self.lean
        rows = hi - lo
        x = lean.embed(ids)  # [B, D]
        cos, sin = lean.rotary(x, pos[:, None])  # [B, 1, Dh] each
        flash = self.attention == "flash"
        bias = None if flash else position_bias(pos, k_len, x.dtype)  # [B, 1, 1, K]
        norm_in, qkv, *_ = self.layers[0]
        q, kv_new = self._first(x, norm_in, qkv, cos, sin)
        last = len(self.layers) - 1
        with lean._attention_backends():
            for i, (_, _, o_proj, norm_post, gate_up, down) in enumerate(self.layers):
                kv = arena.data[i, :, lo:hi, :, :k_len]  # [2, B, Hkv, K, Dh]
                scale = lean.layers[i].scaling  # q [B, Hkv, G, Dh], kv_new [B, 2, Hkv, Dh]
                if flash:
                    att = flash_decode(q, kv[0], kv[1], kv_new, pos, scale)
                else:
                    att = sdpa_decode(q, kv, kv_new, pos, bias, scale)
                att = att.reshape(rows, -1)  # [B, H Dh]
                if i == last:
                    return self._last(x, att, o_proj, norm_post, gate_up, down, *self.final)
                norm_in, qkv, *_ = self.layers[i + 1]
                x, q, kv_new = self._middle(
                    x, att, o_proj, norm_post, gate_up, down, norm_in, qkv, cos, sin
                )
        raise AssertionError("unreachable: a model has at least one layer")

    def warm_up(self) -> float:
        """Compile every piece for `WARM_ROWS` rows on zeros of the real shapes (no arena
        touched); returns the seconds it took."""
        start = time.perf_counter()
        lean, layer = self.lean, self.layers[0]
        with torch.inference_mode():  # as the engine steps: inference tensors, or guards differ
            for rows in WARM_ROWS:
                x = lean.embed.weight.new_zeros(rows, lean.embed.weight.shape[1])  # [B, D]
                pos = torch.zeros(rows, 1, dtype=torch.long, device=x.device)
                cos, sin = lean.rotary(x, pos)  # [B, 1, Dh] each
                q, _ = self._first(x, layer[0], layer[1], cos, sin)
                att = q.reshape(rows, -1).contiguous()  # [B, H Dh], as attention's output
                self._middle(x, att, *layer[2:], layer[0], layer[1], cos, sin)
                self._last(x, att, *layer[2:], *self.final)
            if self.attention == "flash":  # both kernel variants, one split and several
                kv = x.new_zeros(2, 1, lean.kv_heads, 2 * BLOCK, lean.head_dim)
                q = kv.new_zeros(1, lean.kv_heads, lean.heads // lean.kv_heads, lean.head_dim)
                new, pos = kv.new_zeros(1, 2, lean.kv_heads, lean.head_dim), pos[:1, 0]
                for splits in (1, 2):
                    flash_decode(q, kv[0], kv[1], new, pos, 1.0, splits)
        seconds = time.perf_counter() - start
        log.info("fused decode pieces compiled in %.1f s", seconds)
        return seconds
