"""The engine's forward passes over arena rows: one prefill chunk, a packed prefill of several
requests' chunks, and a batched decode step: transformers' forward, or the lean Llama step
(server/engine_lean.py) when the engine has one. Pure model calls; which rows run and what their
results mean stay with the scheduler (server/engine.py).

Dims: B decoding rows, Q chunk positions, D LLM width, V vocabulary.
"""

from __future__ import annotations

import logging

import torch

from server.engine_batch import PackedPrefill, SlotCache, make_prefill_mask
from server.engine_decode import lay_out_for_decode, make_decode_bias, use_gqa_attention
from server.engine_lean import LeanDecode, lean_support

log = logging.getLogger(__name__)

PACKED_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # placeholder; packed attention ignores it
# "compiled": "lean" plus a compiled one-row step and the C++ decode kernels on CPU; "lean":
# server/engine_lean.py (Llama models; others fall back to "hf"); "hf": transformers' forward
DECODE_STEPS = ("compiled", "lean", "hf")


def build_decoder(model: torch.nn.Module, decode_step: str) -> LeanDecode | None:
    """Prepare `model` for the engine: the lean step where `decode_step` and the model allow
    (None: transformers' forward), CPU weights laid out for what reads them, GQA attention."""
    refused = lean_support(model) if decode_step != "hf" else "decode_step='hf'"
    lean = LeanDecode(model, compiled=decode_step == "compiled") if refused is None else None
    if refused:
        log.info("decode step: transformers' forward (%s)", refused)
    if lean is None or lean.row_step is None:
        lay_out_for_decode(model)  # after fusing: lays out what LeanDecode left alone
    use_gqa_attention(model)
    return lean


def prefill_chunk(
    model: torch.nn.Module, cache: SlotCache, row: int, start: int, embeds: torch.Tensor
) -> torch.Tensor:
    """One row's chunk embeds [Q, D] written from column `start` -> logits [V] of its last one."""
    q_len, device = embeds.shape[0], embeds.device
    cache.set_prefill(row, start, q_len)
    out = model(
        inputs_embeds=embeds[None],  # [1, Q, D]
        position_ids=torch.arange(start, start + q_len, device=device)[None],  # [1, Q]
        attention_mask=make_prefill_mask(start, q_len, device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[0, -1]  # [V]


def prefill_packed(
    model: torch.nn.Module,
    cache: SlotCache,
    packed: PackedPrefill,
    embeds: list[torch.Tensor],
    logits_of: list[int],
    lean: LeanDecode | None = None,
) -> torch.Tensor:
    """Chunks [Q_i, D] of `packed`'s segments as one sequence -> logits [n, V] at the last
    position of the segments listed in `logits_of` (those whose prompt ends here); through
    `lean`'s own layers when given."""
    if lean is not None:
        return lean.prefill(cache.arena, packed, embeds, logits_of)
    cache.set_packed(packed)
    hidden = model.model(
        inputs_embeds=torch.cat(embeds)[None],  # [1, Q_total, D]
        position_ids=packed.positions()[None],  # [1, Q_total]
        attention_mask=PACKED_MASK,  # unused: each segment brings its own
        cache=cache,
        use_cache=True,
        packed_prefill=packed,
    ).last_hidden_state[0]  # [Q_total, D]
    return model.get_output_embeddings()(hidden[packed.last_positions(logits_of)])  # [n, V]


def decode_step(
    model: torch.nn.Module,
    cache: SlotCache,
    lo: int,
    hi: int,
    positions: list[int],
    tokens: list[int],
    dtype: torch.dtype,
    lean: LeanDecode | None = None,
) -> torch.Tensor:
    """Rows [lo, hi) feed `tokens` at `positions` -> logits [B, V] (through `lean` if given)."""
    if lean is not None:
        return lean.step(cache.arena, lo, hi, positions, tokens)
    device = cache.arena.device
    ids = torch.tensor(tokens, device=device)[:, None]  # [B, 1]
    cache.set_decode(lo, hi, positions)
    out = model(
        input_ids=ids,
        position_ids=cache.positions[:, None],
        attention_mask=make_decode_bias(positions, dtype, device),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]  # [B, V]
