"""The engine's admission and prefill: waiting requests get a row with their cached prefix
loaded, their prompts advance by chunks (packed side by side, up to `prefill_chunk` tokens a
step), and a complete prompt takes its first token and joins the decoding rows.

A mixin of `server.engine.Engine`, split out because it is one idea; it runs on the engine
thread like the rest of the engine. Rows: decoding rows first (index == arena row), then the
prefilling ones, so a finished prefill swaps into the first prefill row.

Dims: Q prefill chunk positions, D LLM width, V vocabulary.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

import torch

from model.errors import MessageFormatError
from server import engine_forward as forward
from server.engine_batch import Arena, PackedPrefill, SlotCache
from server.engine_decode import GQA_SDPA
from server.engine_request import EngineRequest, embed_from, sample_rows
from server.kv_cache import KVStore
from server.protocol import FinishReason

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from model.llm import LoadedLLM
    from server.engine_lean import LeanDecode

log = logging.getLogger(__name__)

Done = tuple[EngineRequest, FinishReason, BaseException | None]


class Prefills:
    """`_admit` and `_prefill_step`, and what they call; the attributes and the leaving helpers
    it names are the Engine's."""

    llm: LoadedLLM
    model: PreTrainedModel
    store: KVStore
    arena: Arena
    cache: SlotCache
    lean: LeanDecode | None
    device: torch.device
    max_positions: int
    prefill_chunk: int
    prefill_rows: int
    peak_prefill_rows: int
    waiting: deque[EngineRequest]
    prefilling: list[EngineRequest]
    decoding: list[EngineRequest]

    def _forget(self, req: EngineRequest) -> None:
        raise NotImplementedError

    def _retire(self, done: list[Done]) -> None:
        raise NotImplementedError

    def _save_kv(self, req: EngineRequest) -> None:
        raise NotImplementedError

    def _admit(self) -> None:
        while (
            self.waiting
            and len(self.prefilling) < self.prefill_rows
            and self.rows_in_use < self.arena.max_rows
        ):
            req = self.waiting.popleft()
            try:
                started = self._start_prefill(req)
            except Exception as err:  # a bad request fails alone
                log.warning("request %s failed at admission: %s", req.request_id, err)
                self._forget(req)
                req.fail(err)
                continue
            if not started:
                self.waiting.appendleft(req)
                return

    def _start_prefill(self, req: EngineRequest) -> bool:
        """Give a request the prefill row with its cached prefix loaded; False: wait for room."""
        keys = req.plan.keys
        if len(keys) + 1 > self.max_positions:
            raise MessageFormatError(
                f"the prompt takes {len(keys)} positions; the LLM holds {self.max_positions}"
            )
        if req.session_key is not None:
            self.store.get(req.session_key)  # most recently used: evict others first
        row = self.rows_in_use
        if not self.arena.ensure(row + 1, len(keys) + 1, idle=row == 0):
            if row:
                return False
            raise MessageFormatError("the conversation does not fit in the worker's KV budget")
        source, reuse, req.supersedes = self.store.reusable(keys, req.session_key)
        if req.session_key is not None:
            self.store.free(req.session_key)  # the row holds it now
        self.arena.load(row, source.data[:, :, :, :reuse] if reuse else None)
        req.row, req.row_keys, req.cached_tokens = row, list(keys[:reuse]), reuse
        req.pending = embed_from(req.plan, reuse, self.llm.embed_tokens)  # [T_new, D]
        req.generator = req.params.make_generator(self.device)
        self.prefilling.append(req)
        return True

    @property
    def packed_ok(self) -> bool:
        """Several chunks in one forward: the lean step, or HF with our attention function."""
        return self.lean is not None or self.model.config._attn_implementation == GQA_SDPA

    @property
    def rows_in_use(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def _prefill_step(self) -> None:
        """Advance the prefilling requests by up to `prefill_chunk` tokens in all (oldest first);
        complete prompts get their first token and decode (prefill-only ones end there)."""
        if not self.prefilling:
            return
        plan, budget = [], self.prefill_chunk
        for req in self.prefilling:
            q_len = min(budget, req.prefill_left)
            if q_len > 0:
                plan.append((req, q_len))
                budget -= q_len
        logits, failed = self._prefill_rows(plan)
        for req, err in failed.items():
            log.warning("request %s failed in prefill: %s", req.request_id, err)
            self._drop_prefill(req)
            self._forget(req)
            req.fail(err)
        for req, row_logits in logits.items():
            if req.prefill_only:
                self._end_prefill(req, "stop")
            else:
                self._start_decoding(req, row_logits)

    def _prefill_rows(
        self, plan: list[tuple[EngineRequest, int]]
    ) -> tuple[dict[EngineRequest, torch.Tensor], dict[EngineRequest, BaseException]]:
        """Run the planned chunks; logits [V] of requests whose prompt is now complete. A batch
        that fails is retried request by request, so a bad prompt fails alone."""
        if self.packed_ok and (len(plan) > 1 or self.lean is not None):
            try:
                return self._prefill_packed(plan), {}
            except Exception as err:
                log.info("packed prefill failed (%s); retrying its requests one by one", err)
        logits, failed = {}, {}
        for req, q_len in plan:
            try:
                out = self._prefill_chunk(req, q_len)  # [V] after the last chunk
            except Exception as err:  # a tensor error in one prompt fails that request alone
                failed[req] = err
                continue
            if out is not None:
                logits[req] = out
        return logits, failed

    def _prefill_chunk(self, req: EngineRequest, q_len: int) -> torch.Tensor | None:
        """One request's next `q_len` prompt positions; its logits [V] if the prompt is done."""
        chunk = req.next_chunk(q_len)  # [Q, D]
        logits = forward.prefill_chunk(self.model, self.cache, req.row, len(req.row_keys), chunk)
        req.advance(q_len)
        return logits if req.prefill_left == 0 else None  # [V]

    def _prefill_packed(self, plan: list[tuple[EngineRequest, int]]) -> dict:
        """Several requests' chunks as one sequence (no padding)."""
        packed = PackedPrefill(self.arena)
        for req, q_len in plan:
            packed.add(req.row, len(req.row_keys), q_len)
        self.peak_prefill_rows = max(self.peak_prefill_rows, len(plan))
        done = [i for i, (req, q_len) in enumerate(plan) if q_len == req.prefill_left]
        embeds = [req.next_chunk(q_len) for req, q_len in plan]  # [Q_i, D] each
        logits = forward.prefill_packed(self.model, self.cache, packed, embeds, done, self.lean)
        for req, q_len in plan:
            req.advance(q_len)
        return {plan[i][0]: logits[j] for j, i in enumerate(done)}

    def _start_decoding(self, req: EngineRequest, logits: torch.Tensor) -> None:
        """A prompt is complete: its row joins the decoding rows and it takes its first token."""
        first = len(self.decoding)  # the first prefill row
        if req.row != first:
            other = next(r for r in self.prefilling if r.row == first)
            self.arena.swap(first, req.row, max(len(req.row_keys), len(other.row_keys)))
            other.row, req.row = req.row, first
        self.prefilling.remove(req)
        req.pending = None
        self.decoding.append(req)
        reason = req.accept_token(sample_rows([req], logits[None])[0])
        if reason is not None:
            self._retire([(req, reason, None)])

    def _end_prefill(self, req: EngineRequest, reason: FinishReason) -> None:
        """A request leaves prefill: the KV computed so far is kept, its row goes to others."""
        self._save_kv(req)
        self._drop_prefill(req)
        self._forget(req)
        req.finish(reason)

    def _drop_prefill(self, req: EngineRequest) -> None:
        """Take a request out of prefill; the last prefill row fills its row."""
        self.prefilling.remove(req)
        last = self.rows_in_use  # the row past the others, now that it is gone
        if req.row != last:
            moved = next(r for r in self.prefilling if r.row == last)
            self.arena.move(last, req.row, len(moved.row_keys))
            moved.row = req.row
