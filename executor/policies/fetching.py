"""How offloaded policies move KV rows to the device: a layer's whole cache (FlexGen), or rows
chosen per KV head (InfiniGen, H2O, the oracle). Parts that policies are composed of.

Chosen rows are gathered on the host into a (pinned) staging buffer and copied into one of two
device slots, so layer i's rows can arrive while layer i-1 still reads its own. On a CPU without
a link the slots are in the same memory as the host cache: the rows are gathered straight into
the slot, and nothing is copied.

Shapes: B batch, H query heads, G KV heads, n rows fetched per KV head, d head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from infinisim.executor.kvcache import KVStore, PolicyContext
from infinisim.executor.model import Step
from infinisim.executor.policies.base import record_layer
from infinisim.executor.selection import decode_logits, kept
from infinisim.traces.trace import encode_selection


class WholeCache:
    """The cache in host memory; before a layer attends, its whole cache is copied into a
    one-layer device store and the new rows are written back. Bytes count the padded batch.

    in_place: on a CPU without a link (one memory), attend the host rows where they lie instead
    (InfiniGen's dense layers: like its chosen rows, nothing is copied; `full` keeps its memcpy,
    FlexGen's transfer being what it shows). Bytes still count what a link would carry."""

    def __init__(self, ctx: PolicyContext, in_place: bool = False):
        self.host: KVStore = ctx.store(ctx.host_device, pin_memory=ctx.host_pinned)
        self.copies = ctx.copy_engine()
        # one layer's cache on the device at a time; None: attended in place
        self.staging = None if in_place and self.copies.one_memory else ctx.store(ctx.device, n_layers=1)

    def attend(self, layer: int, k_new: Tensor, v_new: Tensor, step: Step) -> tuple[Tensor, Tensor, Tensor]:
        start, end = step.start, step.start + step.n_new
        row = self.host.token_bytes
        record_layer(step, layer, kv_len=end, fetched=start, attended=end, bytes_h2d=start * row,
                     bytes_d2h=step.n_new * row)
        if self.staging is None:
            self.copies.to_host(self.host, layer, start, k_new, v_new, step.recorder)
            return self.host.k[layer][:, :, :end], self.host.v[layer][:, :, :end], step.valid[:, None, :]
        k, v = self.staging.k[0], self.staging.v[0]
        fetched = self.copies.to_device([k[:, :, :start], v[:, :, :start]],
                                        [self.host.k[layer][:, :, :start], self.host.v[layer][:, :, :start]],
                                        layer, step.recorder) if start else None
        self.copies.to_host(self.host, layer, start, k_new, v_new, step.recorder)
        with step.recorder.span(layer, "attn"):
            self.staging.write(0, start, k_new, v_new)
        self.copies.wait(fetched, layer, step.recorder)
        return k[:, :, :end], v[:, :, :end], step.valid[:, None, :]


@dataclass
class Prefetch:
    """Rows of one layer on their way to the device."""

    slot: int
    indices: Tensor  # [B, G, n] positions
    keep: Tensor | None  # bool [B, G, n]; None: every row is kept
    handle: object


class SelectedRows:
    """Chosen rows of the host cache (`whole.host`): gathered, copied into a device slot, attended
    with the newest row. Slots are sized for `max_rows` per sequence and KV head."""

    def __init__(self, ctx: PolicyContext, whole: WholeCache, max_rows: int):
        self.ctx, self.host, self.copies = ctx, whole.host, whole.copies
        b, g, d = ctx.batch, ctx.n_kv_heads, ctx.head_dim
        # a device slot holds each (sequence, KV head)'s fetched rows and, after them, the newest row
        self.slots = [tuple(torch.empty(b * g * (max_rows + 1) * d, dtype=ctx.dtype, device=ctx.device)
                            for _ in "kv") for _ in range(2)]
        self.gathered = [] if self.copies.one_memory else \
            [tuple(torch.empty(b * g * max_rows * d, dtype=ctx.dtype, pin_memory=ctx.host_pinned) for _ in "kv")
             for _ in range(2)]
        self.gathered_free: list[torch.cuda.Event | None] = [None, None]
        self.pending: dict[int, Prefetch] = {}
        self.row_base = torch.arange(b * g).view(b, g, 1) * ctx.capacity  # (b, g)'s first row in the host cache
        # one memory: each layer's host K and V as rows [B*G*capacity, d], and this step's newest row per
        # (b, g) there (start, rows [B, G, 1]); the same for every layer of a step, so made once a step
        self.flat = [(k.view(-1, d), v.view(-1, d)) for k, v in zip(self.host.k, self.host.v, strict=True)] \
            if self.copies.one_memory else []
        self.newest: tuple[int, Tensor] = (-1, self.row_base)  # (-1: no step yet, placeholder rows)
        self.all_kept = torch.ones(b, 1, max_rows + 1, dtype=torch.bool, device=ctx.device)  # keep, when every row is

    def fetch(self, layer: int, indices: Tensor, keep: Tensor | None, step: Step) -> None:
        """Start moving the chosen rows into the slot layer `layer` reads."""
        slot = layer % 2  # layer i-1 may still read the other slot
        move = self.gather_into_slot if self.copies.one_memory else self.gather_and_copy
        self.pending[layer] = Prefetch(slot, indices, keep, move(layer, slot, indices, step))
        if self.ctx.measure.record_selection:
            chosen = kept(keep, indices)
            step.recorder.count(layer, selected=encode_selection(indices.cpu().numpy(), chosen.cpu().numpy()))

    def gather_and_copy(self, layer: int, slot: int, indices: Tensor, step: Step) -> object:
        """Gather the rows on the host into the slot's staging buffer, start their copy; its handle."""
        b, g, n = indices.shape
        d = self.ctx.head_dim
        size = b * g * n * d
        host_k, host_v = (buf[:size].view(b, g, n, d) for buf in self.gathered[slot])
        if self.gathered_free[slot] is not None:
            self.gathered_free[slot].synchronize()  # its previous copy has left the staging buffer
        # whole rows by flat index: [B, G, capacity, d] viewed as [B*G*capacity, d]
        rows = (indices.cpu() + self.row_base).view(-1)
        with step.recorder.span(layer, "gather", host=True):
            torch.index_select(self.host.k[layer].view(-1, d), 0, rows, out=host_k.view(-1, d))
            torch.index_select(self.host.v[layer].view(-1, d), 0, rows, out=host_v.view(-1, d))
        dev_k, dev_v = (slot_rows[:, :, :n] for slot_rows in self.slot_view(slot, b, g, n))
        handle = self.copies.to_device([dev_k, dev_v], [host_k, host_v], layer, step.recorder)
        self.gathered_free[slot] = handle
        return handle

    def gather_into_slot(self, layer: int, slot: int, indices: Tensor, step: Step) -> None:
        """One memory: each (sequence, KV head)'s chosen rows and one more, which `attend` overwrites
        with the newest row, straight into the slot (which is then one contiguous gather); no copy."""
        b, g, n = indices.shape
        d = self.ctx.head_dim
        if self.newest[0] != step.start:  # its position is in capacity; the row gathered there is replaced
            self.newest = (step.start, self.row_base + step.start)
        rows = torch.cat([indices + self.row_base, self.newest[1]], dim=-1).view(-1)
        with step.recorder.span(layer, "gather", host=True):
            for cache, dest in zip(self.flat[layer], self.slot_as(slot, b * g * (n + 1), d), strict=True):
                torch.index_select(cache, 0, rows, out=dest)

    def attend(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Wait for the layer's fetched rows; attend over them plus the newest row (always kept),
        which is also written back to the host."""
        fetched = self.pending.pop(layer)
        b, g, n = k_new.shape[0], self.ctx.n_kv_heads, fetched.indices.shape[-1]
        if self.ctx.measure.quality:
            self.measure_quality(layer, q, k_new, fetched, step)
        self.copies.to_host(self.host, layer, step.start, k_new, v_new, step.recorder)
        self.copies.wait(fetched.handle, layer, step.recorder)
        with step.recorder.span(layer, "attn"):
            k, v = self.slot_view(fetched.slot, b, g, n)
            k[:, :, n:], v[:, :, n:] = k_new, v_new  # after the fetched rows: no copy of them to join
            keep = self.all_kept[..., :n + 1] if fetched.keep is None else \
                torch.cat([fetched.keep, torch.ones(b, g, 1, dtype=torch.bool, device=k.device)], dim=2)
        row = self.host.token_bytes
        record_layer(step, layer, kv_len=step.start + 1, fetched=n, attended=n + 1, bytes_h2d=n * row,
                     bytes_d2h=row)
        return k, v, keep

    def slot_view(self, slot: int, b: int, g: int, n: int) -> tuple[Tensor, Tensor]:
        """A device slot as K and V [B, G, n + 1, d]: n fetched rows, then the newest."""
        return self.slot_as(slot, b, g, n + 1, self.ctx.head_dim)

    def slot_as(self, slot: int, *shape: int) -> tuple[Tensor, Tensor]:
        """A device slot's K and V buffers, their leading elements viewed as `shape`."""
        size = math.prod(shape)
        return tuple(buf[:size].view(shape) for buf in self.slots[slot])  # type: ignore[return-value]

    def measure_quality(self, layer: int, q: Tensor, k_new: Tensor, fetched: Prefetch, step: Step) -> None:
        """Against exact attention over every cached row (measurement only, not timed as policy work):
        per query head, the attention mass the fetched rows capture, and their overlap with the
        exact top rows of the same count. The newest row is always attended and counts as captured."""
        cached = self.host.k[layer][:, :, :step.start].to(q.device)
        probs, top_overlap = attention_quality(q, torch.cat([cached, k_new], dim=2), step.valid[:, :step.start + 1],
                                               fetched.indices, kept(fetched.keep, fetched.indices))
        step.recorder.count(layer, recall=probs.tolist(), topk_overlap=top_overlap.tolist())


def attention_quality(q: Tensor, keys: Tensor, valid: Tensor, indices: Tensor, keep: Tensor
                      ) -> tuple[Tensor, Tensor]:
    """q: [B, H, 1, d]; keys: [B, G, L+1, d] (the last is the newest); valid: [B, L+1];
    indices, keep: [B, G, n] rows fetched among the first L. Returns per-head means over the
    batch of (captured attention mass, top-n overlap), each [H]."""
    b, h = q.shape[:2]
    g, length = keys.shape[1], keys.shape[2] - 1
    logits = decode_logits(q, keys)
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), -1)  # [B, G, group, L+1]
    chosen = torch.zeros(b, g, length + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, indices, keep)
    chosen[..., length] = True
    recall = (probs * chosen[:, :, None, :]).sum(-1)  # [B, G, group]
    n_kept = keep.sum(-1, keepdim=True)  # [B, G, 1]
    exact_rank = probs[..., :length].argsort(dim=-1, descending=True).argsort(dim=-1)  # rank of each row
    in_top = exact_rank < n_kept[:, :, None, :]
    overlap = (in_top & chosen[:, :, None, :length]).sum(-1) / n_kept.clamp(min=1)
    return recall.reshape(b, h).mean(0), overlap.reshape(b, h).float().mean(0)
