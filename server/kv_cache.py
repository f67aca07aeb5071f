"""Idle KV caches of sessions and of stateless prefixes, in an LRU store bounded by a byte budget.

Own store rather than transformers' caches: those know nothing of sessions, budgets or eviction.
Shaped after vLLM's KV manager: `allocate` answers False when even evicting every unpinned
entry cannot make room, `free` drops an entry, `used_bytes` / `usage` feed the metrics. The
decode arena (server/engine_batch.py) draws on the same budget through `reserve` / `release`, so
the figure `used_bytes` covers every KV byte the worker holds and never exceeds `budget_bytes`.

Dims: L layers, H key/value heads, T positions, Dh head width.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

SESSION_PREFIX = "s:"  # store keys of session caches
STATELESS_PREFIX = "p:"  # store keys of cached stateless conversations (prefix reuse)
MAX_STATELESS_ENTRIES = 64  # cached stateless prefixes scanned per lookup, oldest dropped first

# A prompt position's identity: a token id, or (audio digest, index within the audio span)
PositionKey = int | tuple[str, int]


@dataclass
class KVEntry:
    """One cached sequence: its K/V for every layer and the identity of every position."""

    data: torch.Tensor  # [L, 2, H, T, Dh]
    keys: list[PositionKey]

    def __post_init__(self) -> None:
        if self.data.shape[3] != len(self.keys):
            raise ValueError(f"KV holds {self.data.shape[3]} positions but {len(self.keys)} keys")

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def length(self) -> int:
        return len(self.keys)


def count_common_prefix(a: Sequence[PositionKey], b: Sequence[PositionKey]) -> int:
    """How many leading positions two key sequences share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class KVStore:
    """LRU entries plus the arena's reservation, all under one byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"kv budget must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, KVEntry] = OrderedDict()  # oldest first
        self._entry_bytes = 0
        self._reserved = 0  # bytes held by the decode arena
        self.evictions = 0
        self.peak_bytes = 0
        self._names = itertools.count()  # stateless entries

    # -- accounting ------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._entry_bytes + self._reserved

    @property
    def usage(self) -> float:
        """Fraction of the budget in use, 0..1."""
        return self.used_bytes / self.budget_bytes

    def _note_usage(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        assert self.used_bytes <= self.budget_bytes, "KV budget exceeded"

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries until `nbytes` more would fit; False if never."""
        if nbytes > self.budget_bytes - self._reserved:
            return False
        while self.used_bytes + nbytes > self.budget_bytes:
            victim = next(iter(self._entries))
            self.free(victim)
            self.evictions += 1
            log.debug("evicted KV of %s to make room for %d bytes", victim, nbytes)
        return True

    # -- entries ---------------------------------------------------------------------------

    def allocate(self, key: str, entry: KVEntry) -> bool:
        """Store `entry` under `key` (replacing any old one), evicting LRU entries as needed.

        Returns False, storing nothing, when the entry cannot fit even in an empty store."""
        self.free(key)
        if not self._make_room(entry.nbytes):
            return False
        self._entries[key] = entry
        self._entry_bytes += entry.nbytes
        self._note_usage()
        if key.startswith(STATELESS_PREFIX):
            self._trim_stateless()
        return True

    def keep(self, entry: KVEntry, session_key: str | None, supersedes: str | None) -> bool:
        """Store a finished row's KV under its session, or as a new stateless prefix (dropping
        the stateless entry it contains whole); False when it does not fit."""
        if supersedes is not None:
            self.free(supersedes)
        key = session_key or f"{STATELESS_PREFIX}{next(self._names)}"
        if self.allocate(key, entry):
            return True
        log.info("KV of %s (%d bytes) exceeds the budget; not kept", key, entry.nbytes)
        return False

    def get(self, key: str) -> KVEntry | None:
        """The entry under `key`, marked as most recently used."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def free(self, key: str) -> KVEntry | None:
        """Drop the entry under `key` (no-op when absent); returns it."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._entry_bytes -= entry.nbytes
        return entry

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def find_prefix(self, keys: Sequence[PositionKey]) -> tuple[str | None, int]:
        """The stateless entry sharing the longest prefix with `keys`, and that length."""
        best, best_len = None, 0
        for name, entry in self._entries.items():
            if name.startswith(STATELESS_PREFIX) and entry.keys and entry.keys[0] == keys[0]:
                n = count_common_prefix(entry.keys, keys)
                if n > best_len:
                    best, best_len = name, n
        if best is not None:
            self._entries.move_to_end(best)
        return best, best_len

    def reusable(
        self, keys: Sequence[PositionKey], session_key: str | None
    ) -> tuple[KVEntry | None, int, str | None]:
        """The cached KV to start a prompt from: (entry, positions to reuse, the stateless entry
        the reply's cache will supersede). A session's own cache if it has one; otherwise (a
        stateless request or a new session) the stateless conversation sharing most of it. At
        least the last position is left to compute, for its logits."""
        entry = self.get(session_key) if session_key is not None else None
        if entry is not None:
            return entry, min(count_common_prefix(entry.keys, keys), len(keys) - 1), None
        name, reuse = self.find_prefix(keys)
        entry = self.get(name) if name is not None else None
        whole = entry is not None and reuse == entry.length and session_key is None
        return entry, min(reuse, len(keys) - 1), name if whole else None

    def _trim_stateless(self) -> None:
        names = [k for k in self._entries if k.startswith(STATELESS_PREFIX)]
        for name in names[: max(0, len(names) - MAX_STATELESS_ENTRIES)]:
            self.free(name)

    # -- the arena's share -----------------------------------------------------------------

    def reserve(self, nbytes: int) -> bool:
        """Hold `nbytes` more for the decode arena, evicting LRU entries; False when impossible."""
        if not self._make_room(nbytes):
            return False
        self._reserved += nbytes
        self._note_usage()
        return True

    def release(self, nbytes: int) -> None:
        """Give back `nbytes` of the arena's reservation."""
        if nbytes > self._reserved:
            raise ValueError(f"releasing {nbytes} bytes but only {self._reserved} are reserved")
        self._reserved -= nbytes

    @property
    def reserved_bytes(self) -> int:
        return self._reserved
