"""A one-row decode step for CPUs whose weight-streaming parts inductor compiles.

Own step because a single row's projections are GEMVs bound by how fast the weights stream, and
on this project's CPUs MKL's and oneDNN's fp32 GEMV stream them at 15-22 GB/s while inductor's
vectorised multiply-and-sum over [out, in] weights reaches ~33 GB/s (SmolLM2, 2 cores, the
engine thread the only OpenMP pool: 16-18 ms a step against 35-45 ms). All shapes are static
(one row; weights are inputs, not constants), so three graphs serve every layer and compile once
per model (~20 s on 2 cores; ~10 s at later starts, from inductor's on-disk cache); attention
over the growing key range runs between the compiled pieces: the C++ kernel of
server/cpu_attention.py, which also writes the layer's K/V into the arena, or where it did not
build SDPA (in bf16 batched matmuls) after the step's own K/V writes.

Dims: H query heads, Hkv key/value heads, Dh head width, D LLM width, I MLP width, V vocabulary.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server import cpu_attention
from server.engine_batch import Arena
from server.engine_decode import grouped_attention

if TYPE_CHECKING:
    from server.engine_lean import LeanDecode
    from server.engine_linear import DecodeLinear

log = logging.getLogger(__name__)


def prime_dynamo() -> None:
    """Trace one trivial function under inference mode on the main thread (eager backend, no
    code generated). Works around a crash in torch 2.11: when the process's first compile under
    inference mode runs on a thread that then ends (an engine thread), the next new trace on any
    other thread segfaults in FakeTensorMode; a first trace on the main thread, which outlives
    them all, avoids it (tests/unit/server/test_engine_compiled.py reproduces both)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with torch.inference_mode():
        torch.compile(lambda x: x + 1, backend="eager", fullgraph=True)(torch.zeros(1))


prime_dynamo()  # at import, which happens on the main thread in the server, tests and benches

BF16_MATMUL_KEYS = 256  # keys from which one bf16 row attends through batched matmuls

Weights = tuple[torch.Tensor, torch.Tensor | None]  # [out, in] contiguous, bias [out] or None


def weights_of(linear: DecodeLinear) -> Weights:
    if not linear.weight.is_contiguous():
        raise ValueError("the compiled step needs [out, in] contiguous weights")
    return linear.weight, linear.bias


def layer_weights(lean: LeanDecode, weights) -> tuple[list[tuple], tuple]:
    """Each layer's (input norm, q/k/v, o, post-attention norm, gate/up, down) and the final
    (norm, LM head), a projection given as `weights(DecodeLinear)`: what compiled pieces that
    take the weights as inputs are called with."""
    layers = [
        (layer.norm_in.weight, weights(layer.qkv), weights(layer.o_proj),
         layer.norm_post.weight, weights(layer.gate_up), weights(layer.down_proj))
        for layer in lean.layers
    ]  # fmt: skip
    return layers, (lean.norm.weight, weights(lean.lm_head))


def llama_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As LlamaRMSNorm, in ops inductor fuses: normalise in float32, scale in the model's
    dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class CompiledRowStep:
    """`step(arena, row, position, token)` -> logits [1, V], as `LeanDecode.step` for one row."""

    def __init__(self, lean: LeanDecode, config) -> None:
        self.lean = lean
        eps, act = config.rms_norm_eps, lean.layers[0].act
        heads, kv_heads, head_dim = lean.heads, lean.kv_heads, lean.head_dim
        self.gqa = heads != kv_heads
        self.layers, self.final = layer_weights(lean, weights_of)

        def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return llama_rms(x, weight, eps)

        def gemv(x: torch.Tensor, w: Weights) -> torch.Tensor:
            """x [1, in] -> x W^T + b [1, out], summed in float32."""
            y = (w[0].float() * x.float()).sum(-1)[None].to(x.dtype)
            return y if w[1] is None else y + w[1]

        def first(x, norm_in, qkv, cos, sin):
            """x [1, D] -> rotated q [1, H, 1, Dh], rotated k and v [1, Hkv, 1, Dh]."""
            q, k, v = (
                gemv(rms(x, norm_in), qkv)
                .view(1, -1, 1, head_dim)
                .split([heads, kv_heads, kv_heads], dim=1)
            )
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            return q, k, v

        def rest(x, att, o_proj, norm_post, gate_up, down):
            """The layer after attention: x [1, D], att [1, H Dh] -> x [1, D]."""
            x = x + gemv(att, o_proj)
            gate, up = gemv(rms(x, norm_post), gate_up).chunk(2, -1)  # [1, I] each
            return x + gemv(act(gate) * up, down)

        def middle(x, att, o_proj, norm_post, gate_up, down, norm_in, qkv, cos, sin):
            """This layer's rest, then the next layer's q/k/v."""
            x = rest(x, att, o_proj, norm_post, gate_up, down)
            return (x, *first(x, norm_in, qkv, cos, sin))

        def last(x, att, o_proj, norm_post, gate_up, down, norm, head):
            """The last layer's rest, the final norm and the LM head -> logits [1, V]."""
            return gemv(rms(rest(x, att, o_proj, norm_post, gate_up, down), norm), head)

        def compiled(fn):
            return torch.compile(fn, dynamic=False, fullgraph=True)

        self._first, self._middle, self._last = compiled(first), compiled(middle), compiled(last)

    def _attend(self, q, keys, values, scale: float) -> torch.Tensor:
        """q [1, H, 1, Dh] over all of keys/values [1, Hkv, K, Dh] -> [1, H, 1, Dh]: SDPA, but
        in bf16 from `BF16_MATMUL_KEYS` keys the batched matmuls of `grouped_attention`
        (SmolLM2, the whole bf16 step on 2 cores, SDPA vs matmuls: 22.7 vs 24.5 ms at 60 keys,
        19.6-22.2 vs 19.9-21.2 at 200, 30.8 vs 23.6 at 800; fp32 SDPA is the faster throughout,
        30 vs 43 us a layer at 200 keys, 101 vs 114 at 800)."""
        if q.dtype == torch.bfloat16 and keys.shape[2] >= BF16_MATMUL_KEYS:
            return grouped_attention(q, keys, values, None, scale)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=self.gqa)

    def step(self, arena: Arena, row: int, position: int, token: int) -> torch.Tensor:
        """Row `row` feeds `token` at `position` (its K/V land there) -> logits [1, V]."""
        lean, device = self.lean, arena.device
        x = lean.embed(torch.tensor([token], device=device))  # [1, D]
        cos, sin = lean.rotary(x, torch.tensor([[position]], device=device))  # [1, 1, Dh] each
        norm_in, qkv, *_ = self.layers[0]
        q, k, v = self._first(x, norm_in, qkv, cos, sin)
        last = len(self.layers) - 1
        kernel = lean.attention_kernel
        where = (torch.tensor([row]), torch.tensor([position])) if kernel is not None else None
        for i, (_, _, o_proj, norm_post, gate_up, down) in enumerate(self.layers):
            scale = lean.layers[i].scaling
            if kernel is not None:  # K/V write and attention in one call (server/cpu_attention.py)
                att = cpu_attention.decode_attention(
                    kernel, arena.data[i], q[:, :, 0], k[:, :, 0], v[:, :, 0], *where, scale
                ).view(1, -1)  # [1, H Dh]
            else:
                kv = arena.data[i]  # [2, R, Hkv, C, Dh]
                kv[0, row, :, position] = k[0, :, 0]  # [Hkv, Dh]
                kv[1, row, :, position] = v[0, :, 0]
                keys, values = kv[:, row : row + 1, :, : position + 1]  # [1, Hkv, K, Dh] each
                att = self._attend(q, keys, values, scale).reshape(1, -1)  # [1, H Dh]
            if i == last:
                return self._last(x, att, o_proj, norm_post, gate_up, down, *self.final)
            norm_in, qkv, *_ = self.layers[i + 1]
            x, q, k, v = self._middle(
                x, att, o_proj, norm_post, gate_up, down, norm_in, qkv, cos, sin
            )
        raise AssertionError("unreachable: a model has at least one layer")

    def warm_up(self) -> float:
        """Compile the three pieces on zeros of the real shapes; returns the seconds it took."""
        start = time.perf_counter()
        lean, layer = self.lean, self.layers[0]
        with torch.inference_mode():  # as the engine steps: inference tensors, or guards differ
            x = lean.embed.weight.new_zeros(1, lean.embed.weight.shape[1])  # [1, D]
            cos, sin = lean.rotary(x, torch.zeros(1, 1, dtype=torch.long, device=x.device))
            q, _, _ = self._first(x, layer[0], layer[1], cos, sin)
            att = q.reshape(1, -1)  # [1, H Dh]
            self._middle(x, att, *layer[2:], layer[0], layer[1], cos, sin)
            self._last(x, att, *layer[2:], *self.final)
        seconds = time.perf_counter() - start
        log.info("compiled one-row decode step ready in %.1f s", seconds)
        return seconds
