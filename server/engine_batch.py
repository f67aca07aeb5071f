"""The decode arena: one preallocated K/V slot per running request, read by the HF model in place.

Own slot cache rather than transformers' continuous batching: its PagedAttentionCache manager
takes token ids only, and our prompts carry audio embeddings. A slot layout (rows of one
[L, 2, R, H, C, Dh] tensor, a length per row, a boolean 4D mask and per-row position_ids) keeps
every running request's cache where decode reads it, with no re-packing per step: a request that
joins is copied into the next row once, one that leaves is replaced by the last row once.
Decoding rows are 0..n_decode-1; the request being prefilled sits in row n_decode.

Dims: L layers, R rows, H key/value heads, C capacity (positions per row), Dh head width,
B rows in a step, Q query positions, K key positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from server.kv_cache import KVStore

ARENA_GROW = 256  # positions added to every row's capacity when one row runs out


class SlotLayer(CacheLayerMixin):
    """One layer's view of the arena; writes go where the owning `SlotCache` says."""

    is_sliding = False

    def __init__(self, owner: SlotCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.write(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv_len, 0

    def get_seq_length(self) -> int:
        return self.owner.kv_len

    def get_max_length(self) -> int:
        return self.owner.arena.capacity


@dataclass
class PrefillSegment:
    """One request's chunk inside a packed prefill: query positions [lo, hi) of the packed
    sequence, written to arena `row` from column `start`."""

    row: int
    start: int
    lo: int
    hi: int
    mask: torch.Tensor  # [1, 1, Q, K] bool, causal over the row's prefix plus the chunk
    grouped: torch.Tensor | None = None  # `mask` as a bias, repeated for grouped query heads

    @property
    def end(self) -> int:
        """The row's column after the chunk (its key length)."""
        return self.start + self.hi - self.lo

    def grouped_mask(self, group: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask for the chunk's queries repeated `group` times, as an additive bias in
        `dtype` (0 or -inf) -> [1, 1, G Q, K] (made once per prefill; every layer uses it). A
        bias, not the bool mask: CPU SDPA turns a bool mask into one on every call (SmolLM2, 74
        positions over 882 cached, 2 cores: 1.19 vs 1.38 ms a layer in fp32, 1.25 vs 1.37 in
        bf16)."""
        rows = group * (self.hi - self.lo)
        if self.grouped is None or self.grouped.shape[2] != rows or self.grouped.dtype != dtype:
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self.grouped = bias.masked_fill_(~self.mask, float("-inf")).repeat(1, 1, group, 1)
        return self.grouped


@dataclass
class PackedPrefill:
    """Several requests' prefill chunks run as one sequence: every projection and MLP sees only
    real tokens (no padding); attention runs per segment over its own arena row."""

    arena: Arena
    segments: list[PrefillSegment] = field(default_factory=list)

    def add(self, row: int, start: int, q_len: int) -> None:
        lo = self.segments[-1].hi if self.segments else 0
        mask = make_prefill_mask(start, q_len, self.arena.device)
        self.segments.append(PrefillSegment(row, start, lo, lo + q_len, mask))

    def positions(self) -> torch.Tensor:
        """Every packed token's position in its own row -> [N]."""
        return torch.cat([
            torch.arange(seg.start, seg.end, device=self.arena.device) for seg in self.segments
        ])  # fmt: skip

    def last_positions(self, which: list[int]) -> torch.Tensor:
        """Packed index of the last token of the segments numbered in `which` -> [n] long."""
        last = [self.segments[i].hi - 1 for i in which]
        return torch.tensor(last, dtype=torch.long, device=self.arena.device)  # [n]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [1, H, N, Dh] of the packed sequence -> each segment's row of `layer`."""
        buf = self.arena.data[layer]  # [2, R, H, C, Dh]
        for seg in self.segments:
            buf[0, seg.row, :, seg.start : seg.end] = keys[0, :, seg.lo : seg.hi]  # [H, Q, Dh]
            buf[1, seg.row, :, seg.start : seg.end] = values[0, :, seg.lo : seg.hi]

    def attend(self, layer: int, query: torch.Tensor, scale: float | None) -> torch.Tensor:
        """query [1, H, N, Dh] -> [1, H, N, Dh]: each segment over its row's cached prefix and
        itself (already written to `layer`). The G query heads sharing a K/V head go in as one
        query G times as long, so SDPA reads each K/V head once (same outputs; SmolLM2, 74
        positions over 882 cached, 2 cores, median of 6 prefills: 158 vs 168 ms in fp32, 124 vs
        132 ms in bf16 against `enable_gqa`)."""
        buf = self.arena.data[layer]  # [2, R, Hkv, C, Dh]
        heads, kv_heads, head_dim = query.shape[1], buf.shape[2], query.shape[3]
        group = heads // kv_heads
        outs = []
        for seg in self.segments:
            q_len = seg.hi - seg.lo
            q = query[0, :, seg.lo : seg.hi].reshape(1, kv_heads, group * q_len, head_dim)
            out = F.scaled_dot_product_attention(
                q,
                buf[0, seg.row, :, : seg.end][None],
                buf[1, seg.row, :, : seg.end][None],
                attn_mask=seg.grouped_mask(group, query.dtype),
                scale=scale,
            )  # [1, Hkv, G Q, Dh]
            outs.append(out.reshape(1, heads, q_len, head_dim))
        return torch.cat(outs, dim=2)  # [1, H, N, Dh]


class SlotCache(Cache):
    """A transformers `Cache` over arena rows: a decode step, one prefill chunk, or a packed
    prefill of several requests' chunks."""

    def __init__(self, arena: Arena, num_layers: int) -> None:
        super().__init__(layers=[SlotLayer(self, i) for i in range(num_layers)])
        self.arena = arena
        self.lo, self.hi = 0, 0  # rows [lo, hi) in this step
        self.positions: torch.Tensor | None = None  # [B] write column per row (decode)
        self.row_index: torch.Tensor | None = None  # [B] (decode)
        self.single: int | None = None  # the write column when one row decodes
        self.start = 0  # first written column (prefill)
        self.kv_len = 0  # key columns returned to attention
        self.packed: PackedPrefill | None = None  # set for a packed prefill

    def set_decode(self, lo: int, hi: int, positions: list[int]) -> None:
        device = self.arena.device
        self.packed = None
        self.lo, self.hi, self.start = lo, hi, -1
        self.positions = torch.tensor(positions, device=device)  # [B]
        self.row_index = torch.arange(lo, hi, device=device)  # [B]
        self.single = positions[0] if len(positions) == 1 else None
        self.kv_len = max(positions) + 1

    def set_prefill(self, row: int, start: int, q_len: int) -> None:
        self.packed = None
        self.lo, self.hi, self.start = row, row + 1, start
        self.kv_len = start + q_len

    def set_packed(self, packed: PackedPrefill) -> None:
        self.packed = packed
        self.kv_len = max(seg.end for seg in packed.segments)

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [B, H, Q, Dh] -> the rows' whole caches [B, H, K, Dh] (views); a packed
        prefill writes each segment to its row and returns its input (attention reads the rows)."""
        buf = self.arena.data[layer]  # [2, R, H, C, Dh]
        if self.packed is not None:
            self.packed.write(layer, keys, values)
            return keys, values
        if self.start < 0 and self.single is not None:  # one row: a plain copy, no index_put
            buf[0, self.lo, :, self.single] = keys[0, :, 0]  # [H, Dh]
            buf[1, self.lo, :, self.single] = values[0, :, 0]  # [H, Dh]
        elif self.start < 0:
            buf[0, self.row_index, :, self.positions] = keys[:, :, 0]  # [B, H, Dh]
            buf[1, self.row_index, :, self.positions] = values[:, :, 0]  # [B, H, Dh]
        else:
            end = self.start + keys.shape[2]
            buf[0, self.lo, :, self.start : end] = keys[0]  # [H, Q, Dh]
            buf[1, self.lo, :, self.start : end] = values[0]  # [H, Q, Dh]
        rows = slice(self.lo, self.hi)
        return buf[0, rows, :, : self.kv_len], buf[1, rows, :, : self.kv_len]  # [B, H, K, Dh]


def attention_shape(cfg) -> tuple[int, int, int]:
    """A transformers config's (query heads, key/value heads, head width)."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def make_prefill_mask(start: int, q_len: int, device: torch.device) -> torch.Tensor:
    """Causal over the cached prefix plus this chunk -> [1, 1, Q, K] bool."""
    cols = torch.arange(start + q_len, device=device)  # [K]
    rows = torch.arange(start, start + q_len, device=device)  # [Q]
    return (cols[None] <= rows[:, None])[None, None]  # [1, 1, Q, K]


class Arena:
    """The rows' K/V storage; its bytes are reserved from the KV store's budget."""

    def __init__(
        self,
        store: KVStore,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_rows: int,
    ) -> None:
        self.store = store
        self.shape_lhd = (num_layers, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.max_rows = max_rows
        self.data: torch.Tensor | None = None  # [L, 2, R, H, C, Dh]
        self.rows = 0
        self.capacity = 0

    @classmethod
    def for_model(cls, store: KVStore, model: torch.nn.Module, max_rows: int) -> Arena:
        """An empty arena shaped for `model`'s layers, K/V heads, dtype and device."""
        cfg = model.config
        _, heads, head_dim = attention_shape(cfg)
        return cls(
            store, num_layers=cfg.num_hidden_layers, num_kv_heads=heads, head_dim=head_dim,
            dtype=model.dtype, device=model.device, max_rows=max_rows,
        )  # fmt: skip

    @property
    def bytes_per_position(self) -> int:
        num_layers, heads, head_dim = self.shape_lhd
        return num_layers * 2 * heads * head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.rows * self.capacity * self.bytes_per_position

    def ensure(self, rows: int, length: int, idle: bool = False) -> bool:
        """Make room for `rows` rows of `length` positions each; False when the budget refuses.
        `idle` (no row in use): an arena longer than `length` needs is dropped first, so a
        long past conversation does not make every later row that long (and slow to grow), and
        one too small is dropped rather than copied into the new one (nothing in it is used)."""
        needed_cap = -(-length // ARENA_GROW) * ARENA_GROW
        too_small = rows > self.rows or length > self.capacity
        if idle and (self.capacity > needed_cap or too_small):
            self.drop()
        if rows <= self.rows and length <= self.capacity:
            return True
        new_rows = max(self.rows, min(self.max_rows, 1 << max(0, rows - 1).bit_length()))
        new_cap = max(self.capacity, needed_cap)
        extra = new_rows * new_cap * self.bytes_per_position
        if not self.store.reserve(extra):  # old and new both live while copying
            return False
        num_layers, heads, head_dim = self.shape_lhd
        shape = (num_layers, 2, new_rows, heads, new_cap, head_dim)
        data = torch.zeros(shape, dtype=self.dtype, device=self.device)  # [L, 2, R, H, C, Dh]
        if self.data is not None:
            data[:, :, : self.rows, :, : self.capacity] = self.data
        self.drop()
        self.data, self.rows, self.capacity = data, new_rows, new_cap
        return True

    def drop(self) -> None:
        """Free the storage and its reservation (only when no row is in use)."""
        self.store.release(self.nbytes)
        self.data, self.rows, self.capacity = None, 0, 0

    def load(self, row: int, prefix: torch.Tensor | None) -> None:
        """Fill a row with a cached prefix [L, 2, H, T, Dh] and zeros after it."""
        assert self.data is not None
        n = 0 if prefix is None else prefix.shape[3]
        if prefix is not None:
            self.data[:, :, row, :, :n] = prefix.to(self.device, self.dtype)
        # stale columns are masked, but a NaN there would still poison attention's sums
        self.data[:, :, row, :, n:] = 0

    def extract(self, row: int, length: int) -> torch.Tensor:
        """A copy of a row's first `length` positions -> [L, 2, H, T, Dh]."""
        assert self.data is not None
        return self.data[:, :, row, :, :length].clone()  # [L, 2, H, T, Dh]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` positions of two rows."""
        assert self.data is not None
        held = self.data[:, :, a, :, :length].clone()
        self.data[:, :, a, :, :length] = self.data[:, :, b, :, :length]
        self.data[:, :, b, :, :length] = held

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a row's first `length` positions into another row."""
        assert self.data is not None
        self.data[:, :, dst, :, :length] = self.data[:, :, src, :, :length]
