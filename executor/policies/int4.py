"""INT4 KV (FlexGen's compressed cache): K and V live in host memory as group-wise 4-bit codes
with a scale and a minimum per group; every step fetches a layer's whole quantized cache and
dequantizes it on the device. The newest row is attended at full precision."""

from __future__ import annotations

import torch
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import Int4Knobs
from infinisim.executor.kvcache import KVStore, PolicyContext
from infinisim.executor.model import Step
from infinisim.executor.policies.base import Policy, record_layer

LEVELS = 15  # 4 bits


def quantize(x: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """x: [..., d] -> (codes uint8 [..., d/2], two 4-bit values per byte; scale [..., d/group];
    minimum [..., d/group]), asymmetric min/max per group of `group` values along d."""
    shape = x.shape
    grouped = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / LEVELS
    codes = ((grouped - low) / scale).round().clamp(0, LEVELS).to(torch.uint8).reshape(shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale.squeeze(-1).to(x.dtype), low.squeeze(-1).to(x.dtype)


def dequantize(packed: Tensor, scale: Tensor, low: Tensor, group: int) -> Tensor:
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    grouped = codes.reshape(*codes.shape[:-1], -1, group).to(scale.dtype)
    return (grouped * scale[..., None] + low[..., None]).reshape(codes.shape)


class Int4(Policy):
    name = "int4"
    knobs: Int4Knobs

    def setup(self, ctx: PolicyContext) -> None:
        self.group = self.knobs.group(ctx.head_dim)
        if ctx.head_dim % self.group:
            raise InfinisimError(f"head dim {ctx.head_dim} is not a multiple of the group size {self.group}",
                                 field="group_size")
        d, groups = ctx.head_dim, ctx.head_dim // self.group
        # Three stores share one layout: codes (d/2 bytes per row), scales and minimums (d/group values).
        shape = dict(batch=ctx.batch, n_kv_heads=ctx.n_kv_heads, capacity=ctx.capacity)
        self.codes = KVStore(ctx.n_layers, head_dim=d // 2, dtype=torch.uint8, device=ctx.host_device,
                             pin_memory=ctx.host_pinned, **shape)
        self.scales = KVStore(ctx.n_layers, head_dim=groups, dtype=ctx.dtype, device=ctx.host_device,
                              pin_memory=ctx.host_pinned, **shape)
        self.lows = KVStore(ctx.n_layers, head_dim=groups, dtype=ctx.dtype, device=ctx.host_device,
                            pin_memory=ctx.host_pinned, **shape)
        self.staging = [KVStore(1, head_dim=width, dtype=dt, device=ctx.device, **shape)
                        for width, dt in ((d // 2, torch.uint8), (groups, ctx.dtype), (groups, ctx.dtype))]
        self.copies = ctx.copy_engine()
        self.row_bytes = sum(s.token_bytes for s in (self.codes, self.scales, self.lows))

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        start, rec = step.start, step.recorder
        stores = (self.codes, self.scales, self.lows)
        fetched = None
        if start:
            dst = [t[:, :, :start] for s in self.staging for t in (s.k[0], s.v[0])]
            src = [t[layer][:, :, :start] for s in stores for t in (s.k, s.v)]
            fetched = self.copies.to_device(dst, src, layer, rec)
        with rec.span(layer, "attn"):
            k_parts, v_parts = quantize(k_new, self.group), quantize(v_new, self.group)
        for store, k_part, v_part in zip(stores, k_parts, v_parts, strict=True):
            self.copies.to_host(store, layer, start, k_part, v_part, rec)
        self.copies.wait(fetched, layer, rec)
        with rec.span(layer, "attn"):
            if start:
                codes, scales, lows = self.staging
                k_old = dequantize(codes.k[0][:, :, :start], scales.k[0][:, :, :start], lows.k[0][:, :, :start],
                                   self.group)
                v_old = dequantize(codes.v[0][:, :, :start], scales.v[0][:, :, :start], lows.v[0][:, :, :start],
                                   self.group)
                k, v = torch.cat([k_old, k_new], dim=2), torch.cat([v_old, v_new], dim=2)
            else:
                k, v = k_new, v_new
        record_layer(step, layer, kv_len=start + step.n_new, fetched=start, attended=start + step.n_new,
                     bytes_h2d=start * self.row_bytes, bytes_d2h=step.n_new * self.row_bytes)
        return k, v, step.valid[:, None, :]
