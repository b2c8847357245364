"""A bounded host KV pool: at most `capacity` tokens per sequence stay in host memory.

When a new token needs room, one already stored leaves for good (for every later step and
layer), chosen by the paper's counter policy (the least-fetched among the older half of the
stored tokens), or LRU (the least recently fetched), or FIFO (the oldest). Bookkeeping is per
sequence, summed over layers and KV heads, on the host: the decisions are tiny.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infinisim.core.errors import InfinisimError

EVICTIONS = ("counter", "lru", "fifo")


class HostPool:
    def __init__(self, capacity: int, eviction: str, batch: int, positions: int):
        if capacity < 2:
            raise InfinisimError(f"pool capacity must be at least 2 tokens, got {capacity}", field="pool_capacity")
        if eviction not in EVICTIONS:
            raise InfinisimError(f"unknown eviction {eviction!r} ({', '.join(EVICTIONS)})", field="eviction")
        self.capacity, self.eviction = capacity, eviction
        self.stored = torch.zeros(batch, positions, dtype=torch.bool)
        self.fetches = torch.zeros(batch, positions, dtype=torch.long)
        self.last_fetch = torch.full((batch, positions), -1, dtype=torch.long)
        self.admitted = 0  # positions [0, admitted) have been taken in (and some evicted since)

    def admit(self, valid: Tensor, end: int) -> None:
        """Rows up to `end` were written: take in the new ones (padding is never stored)."""
        self.stored[:, self.admitted:end] = valid[:, self.admitted:end].cpu()
        self.admitted = end

    def record_fetch(self, indices: Tensor, keep: Tensor, step: int) -> None:
        """indices, keep: [B, G, n] positions fetched by one layer."""
        indices, keep = indices.cpu(), keep.cpu()
        b = indices.shape[0]
        flat = indices.reshape(b, -1)
        self.fetches.scatter_add_(1, flat, keep.reshape(b, -1).long())
        self.last_fetch.scatter_reduce_(1, flat, torch.where(keep.reshape(b, -1), step, -1), reduce="amax")

    def make_room(self, incoming: int = 1) -> int:
        """Evict so that `incoming` more tokens per sequence fit; returns how many left (whole batch)."""
        evicted = 0
        for b in range(self.stored.shape[0]):
            stored = self.stored[b].nonzero().squeeze(-1)  # ascending positions: oldest first
            excess = len(stored) + incoming - self.capacity
            if excess <= 0:
                continue
            self.stored[b, evict_order(stored, self.fetches[b], self.last_fetch[b], self.eviction)[:excess]] = False
            evicted += excess
        return evicted


def evict_order(stored: Tensor, fetches: Tensor, last_fetch: Tensor, eviction: str) -> Tensor:
    """Stored positions (ascending) in the order they should leave."""
    if eviction == "fifo":
        return stored
    if eviction == "lru":
        order = torch.sort(last_fetch[stored], stable=True).indices  # ties: the older first
        return stored[order]
    older = stored[: max(1, len(stored) // 2)]  # counter: only the older half may leave, the recent stay
    order = torch.sort(fetches[older], stable=True).indices
    return torch.cat([older[order], stored[len(older):]])
