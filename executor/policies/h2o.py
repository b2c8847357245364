"""H2O (heavy-hitter oracle) as its reference implementations run it (the H2O authors' code; the
InfiniGen artifact's FlexGen+H2O): a fixed-size kept set per KV head, the tokens with the largest
accumulated attention plus a window of the most recent ones, held in host memory as one compact
block. Each step copies the block to the device in one contiguous copy, attends over it and the
newest token, adds the step's attention to the scores, evicts the lightest hitter outside the
recent window, and writes the newest token's K/V into the slot it frees. A token that leaves the
set is gone for good.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infinisim.core.policies import H2OKnobs
from infinisim.executor.kvcache import KVStore, PolicyContext, check_fits
from infinisim.executor.model import Step
from infinisim.executor.policies.base import Policy, record_layer
from infinisim.executor.policies.fetching import attention_quality
from infinisim.executor.selection import budget_tokens, decode_logits
from infinisim.traces.trace import encode_selection

QUERY_CHUNK = 256  # prompt rows per chunk when accumulating the prefill's attention


def accumulated_attention(q: Tensor, k: Tensor, valid: Tensor) -> Tensor:
    """Column sums of the causal attention matrix, summed over each KV head's query heads.

    q: [B, H, T, d], k: [B, G, T, d], valid: bool [B, T] -> float32 [B, G, T].
    """
    b, h, t, d = q.shape
    g = k.shape[1]
    total = torch.zeros(b, g, t, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(t, device=q.device)
    for lo in range(0, t, QUERY_CHUNK):
        hi = min(t, lo + QUERY_CHUNK)
        logits = torch.einsum("bgqtd,bgsd->bgqts", q[:, :, lo:hi].reshape(b, g, h // g, hi - lo, d).float(),
                              k.float()) / math.sqrt(d)
        allowed = valid[:, None, None, None, :] & (key_pos <= torch.arange(lo, hi, device=q.device)[:, None])
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        probs = probs * valid[:, None, None, lo:hi, None]  # padding queries do not vote
        total += probs.sum(dim=(2, 3))
    return total


def keep_set(scores: Tensor, positions: Tensor, usable: Tensor, sizes: Tensor, recent: Tensor, newest: int
             ) -> tuple[Tensor, Tensor]:
    """Choose per (sequence, KV head) `sizes[b]` of the candidate `positions`: the `recent[b]`
    newest always, then the largest accumulated `scores`. Candidates not `usable` are never kept.

    scores, positions, usable: [B, G, C]; sizes, recent: [B]. Returns (positions [B, G, m], keep [B, G, m]).
    """
    is_recent = positions > newest - recent[:, None, None]
    rank_key = torch.where(is_recent, torch.inf, scores).masked_fill(~usable, -torch.inf)
    m = int(sizes.max())
    order = torch.topk(rank_key, m, dim=-1).indices
    keep = (torch.arange(m, device=scores.device) < sizes[:, None, None]) & usable.gather(-1, order)
    return positions.gather(-1, order), keep


class H2O(Policy):
    name = "h2o"
    knobs: H2OKnobs

    def setup(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.host: KVStore | None = None  # kept sets, [B, G, m, d] per layer: allocated once m is known
        self.block: KVStore | None = None  # one layer's kept set on the device
        self.newest = self.stores(ctx.n_layers, 1, ctx.host_device)  # each layer's newest rows, on their way
        self.shadow = ctx.store(ctx.host_device) if ctx.measure.quality else None  # every row: measurement only
        self.copies = ctx.copy_engine()
        self.scores = torch.zeros(ctx.n_layers, ctx.batch, ctx.n_kv_heads, ctx.capacity, dtype=torch.float32,
                                  device=ctx.device)
        self.kept: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> slot positions [B, G, m], slot in use [B, G, m]
        self.pending: dict[int, tuple[object, Tensor]] = {}  # layer -> (the newest rows' copy, their slots [B, G])

    def stores(self, n_layers: int, rows: int, device: torch.device) -> KVStore:
        ctx = self.ctx
        return KVStore(n_layers, ctx.batch, ctx.n_kv_heads, rows, ctx.head_dim, ctx.dtype, device,
                       pin_memory=ctx.host_pinned and device.type == "cpu")

    def prefill_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """The prompt attends over itself on the device; only its kept set goes to host memory."""
        with step.recorder.span(layer, "attn"):
            self.start_kept_set(layer, q, k_new, step.valid)
            positions = self.kept[layer][0]
            index = positions[..., None].expand(*positions.shape, k_new.shape[-1])
            rows_k, rows_v = k_new.gather(2, index), v_new.gather(2, index)
        if self.host is None:  # the set's size, m, is the budget of the longest prompt
            m = positions.shape[-1]
            check_fits(f"H2O's kept sets of {self.ctx.batch} x {m} positions x {self.ctx.n_layers} layers",
                       self.ctx.n_layers * m * self.newest.token_bytes, self.ctx.host_device)
            self.host, self.block = self.stores(self.ctx.n_layers, m, self.ctx.host_device), \
                self.stores(1, m, self.ctx.device)
        self.copies.to_host(self.host, layer, 0, rows_k, rows_v, step.recorder)
        if self.shadow is not None:
            self.shadow.write(layer, 0, k_new.to(self.shadow.k[0].device), v_new.to(self.shadow.v[0].device))
        record_layer(step, layer, kv_len=step.n_new, fetched=0, attended=step.n_new,
                     bytes_d2h=positions.shape[-1] * self.host.token_bytes)
        return k_new, v_new, step.valid[:, None, :]

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        positions, keep = self.kept[layer]
        b, g, m = positions.shape
        assert self.host is not None and self.block is not None  # the prefill made them
        fetched = self.fetch(layer, positions, keep, step)
        if self.ctx.measure.quality:
            self.measure_quality(layer, q, k_new, v_new, positions, keep, step)
        self.copies.wait(fetched, layer, step.recorder)
        with step.recorder.span(layer, "attn"):
            k = torch.cat([self.block.k[0][:, :, :m], k_new], dim=2)
            v = torch.cat([self.block.v[0][:, :, :m], v_new], dim=2)
            attended = torch.cat([keep, torch.ones(b, g, 1, dtype=torch.bool, device=keep.device)], dim=2)
            slots = self.update_kept_set(layer, q, k, attended, step)
        self.pending[layer] = (self.copies.to_host(self.newest, layer, 0, k_new, v_new, step.recorder), slots)
        record_layer(step, layer, kv_len=step.start + 1, fetched=m, attended=m + 1,
                     bytes_h2d=m * self.host.token_bytes, bytes_d2h=self.host.token_bytes)
        return k, v, attended

    def fetch(self, layer: int, positions: Tensor, keep: Tensor, step: Step) -> object:
        """Start copying the layer's kept set (`positions` by slot) to the device: one contiguous block."""
        assert self.host is not None and self.block is not None
        self.settle(layer, step)
        m = positions.shape[-1]
        if self.ctx.measure.record_selection:
            step.recorder.count(layer, selected=encode_selection(positions.cpu().numpy(), keep.cpu().numpy()))
        return self.copies.to_device([self.block.k[0][:, :, :m], self.block.v[0][:, :, :m]],
                                     [self.host.k[layer][:, :, :m], self.host.v[layer][:, :, :m]], layer,
                                     step.recorder)

    def settle(self, layer: int, step: Step) -> None:
        """Last step's newest rows, landed in host memory, into the slots their evictions freed."""
        if layer not in self.pending:
            return
        handle, slots = self.pending.pop(layer)
        assert self.host is not None
        if handle is not None:
            handle.synchronize()
        with step.recorder.span(layer, "gather", host=True):
            bi, gi = torch.where(slots >= 0)
            for store in ("k", "v"):
                getattr(self.host, store)[layer][bi, gi, slots[bi, gi]] = getattr(self.newest, store)[layer][bi, gi, 0]

    def start_kept_set(self, layer: int, q: Tensor, k: Tensor, valid: Tensor) -> None:
        t = k.shape[2]
        self.scores[layer, :, :, :t] = accumulated_attention(q, k, valid)
        lengths = valid.sum(-1)
        sizes = torch.tensor(budget_tokens(self.knobs.budget, lengths), device=k.device)
        recent = (sizes.float() * self.knobs.recent_ratio).floor().long()
        positions = torch.arange(t, device=k.device).expand(*self.scores.shape[1:3], t)
        usable = valid[:, None, :].expand_as(positions)
        self.kept[layer] = keep_set(self.scores[layer, :, :, :t], positions, usable, sizes, recent, t - 1)

    def choose_kept(self, layer: int, q: Tensor, k: Tensor, attended: Tensor, step: Step
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Add this step's attention to the scores, take in the newest token, evict down to the budget:
        returns the candidates [B, G, m+1] (the kept set, then the newest) and the new kept set
        (positions, keep) [B, G, m]."""
        logits = decode_logits(q, k)
        probs = torch.softmax(logits.masked_fill(~attended[:, :, None, :], float("-inf")), -1).sum(2)  # [B, G, m+1]
        positions, keep = self.kept[layer]
        candidates = torch.cat([positions, torch.full_like(positions[..., :1], step.start)], dim=-1)
        scores = self.scores[layer]
        scores.scatter_add_(-1, candidates, probs * attended)
        sizes = keep.sum(-1).amax(-1)  # the set stays at its prefill size per sequence
        recent = (sizes.float() * self.knobs.recent_ratio).floor().long()
        return candidates, *keep_set(scores.gather(-1, candidates), candidates, attended, sizes, recent, step.start)

    def update_kept_set(self, layer: int, q: Tensor, k: Tensor, attended: Tensor, step: Step) -> Tensor:
        """`choose_kept`, with the newest token taking the slot of the one evicted; returns that slot
        per (sequence, KV head), on the host, -1 where the newest itself was not kept."""
        positions, keep = self.kept[layer]
        m = positions.shape[-1]
        candidates, chosen, chosen_keep = self.choose_kept(layer, q, k, attended, step)
        marked = torch.zeros_like(self.scores[layer], dtype=torch.long).scatter_add_(-1, chosen, chosen_keep.long())
        left = attended & (marked.gather(-1, candidates) == 0)  # [B, G, m+1]: the one candidate evicted
        freed = left.long().argmax(-1)  # [B, G]
        takes = left.any(-1) & (freed < m)  # the newest was kept: it moves into the freed slot
        slot = freed.clamp(max=m - 1)[..., None]
        self.kept[layer] = (positions.scatter(-1, slot, torch.where(takes[..., None], step.start,
                                                                       positions.gather(-1, slot))), keep)
        return torch.where(takes, freed, -1).cpu()

    def measure_quality(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor, keep: Tensor,
                        step: Step) -> None:
        """Against exact attention over every row the policy ever saw (measurement only)."""
        assert self.shadow is not None
        self.shadow.write(layer, step.start, k_new.to(self.shadow.k[0].device), v_new.to(self.shadow.v[0].device))
        cached = self.shadow.k[layer][:, :, :step.start].to(q.device)
        recall, overlap = attention_quality(q, torch.cat([cached, k_new], dim=2), step.valid[:, :step.start + 1],
                                            positions, keep)
        step.recorder.count(layer, recall=recall.tolist(), topk_overlap=overlap.tolist())
