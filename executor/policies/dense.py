"""The two dense policies: everything on the device (resident), or everything fetched (full)."""

from __future__ import annotations

from infinisim.executor.kvcache import CopyEngine, PolicyContext
from infinisim.executor.model import StepState
from infinisim.executor.policies.base import Policy
from torch import Tensor


class Resident(Policy):
    """The whole KV cache stays in device memory: nothing moves; the ideal."""

    name = "resident"

    def setup(self, ctx: PolicyContext) -> None:
        self.kv = ctx.store(ctx.device)

    def attend_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: StepState
                  ) -> tuple[Tensor, Tensor, Tensor]:
        end = step.start + step.n_new
        with step.recorder.span(layer, "attn"):
            self.kv.write(layer, step.start, k_new, v_new)
        self.count(step, layer, kv_len=end, fetched=0, attended=end)
        return self.kv.k[layer][:, :, :end], self.kv.v[layer][:, :, :end], step.valid[:, None, :]


class Full(Policy):
    """FlexGen: the KV cache lives in host memory; before each layer's attention its whole cache is
    copied to the device, and the new rows are written back. Bytes count the padded batch."""

    name = "full"

    def setup(self, ctx: PolicyContext) -> None:
        self.host = ctx.store(ctx.host_device, pin_memory=ctx.host_pinned)
        self.staging = ctx.store(ctx.device, n_layers=1)  # one layer's cache on the device at a time
        self.copies = CopyEngine(ctx.device)

    def attend_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: StepState
                  ) -> tuple[Tensor, Tensor, Tensor]:
        start, end = step.start, step.start + step.n_new
        k, v = self.staging.k[0], self.staging.v[0]
        fetched = self.copies.to_device([k[:, :, :start], v[:, :, :start]],
                                        [self.host.k[layer][:, :, :start], self.host.v[layer][:, :, :start]],
                                        layer, step.recorder) if start else None
        self.copies.to_host(self.host, layer, start, k_new, v_new, step.recorder)
        with step.recorder.span(layer, "attn"):
            self.staging.write(0, start, k_new, v_new)
        self.copies.wait(fetched, layer, step.recorder)
        row = self.host.token_bytes
        self.count(step, layer, kv_len=end, fetched=start, attended=end,
                   bytes_h2d=start * row, bytes_d2h=step.n_new * row)
        return k[:, :, :end], v[:, :, :end], step.valid[:, None, :]
