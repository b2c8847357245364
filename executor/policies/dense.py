"""The two dense policies: everything on the device (resident), or everything fetched (full)."""

from __future__ import annotations

from torch import Tensor

from infinisim.executor.kvcache import PolicyContext
from infinisim.executor.model import Step
from infinisim.executor.policies.base import Policy, record_layer
from infinisim.executor.policies.fetching import WholeCache


class Resident(Policy):
    """The whole KV cache stays in device memory: nothing moves; the ideal."""

    name = "resident"

    def setup(self, ctx: PolicyContext) -> None:
        self.kv = ctx.store(ctx.device)

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        end = step.start + step.n_new
        with step.recorder.span(layer, "attn"):
            self.kv.write(layer, step.start, k_new, v_new)
        record_layer(step, layer, kv_len=end, fetched=0, attended=end)
        return self.kv.k[layer][:, :, :end], self.kv.v[layer][:, :, :end], step.valid[:, None, :]


class Full(Policy):
    """FlexGen: the KV cache lives in host memory; before each layer's attention its whole cache is
    copied to the device, and the new rows are written back."""

    name = "full"

    def setup(self, ctx: PolicyContext) -> None:
        self.whole = WholeCache(ctx)

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        return self.whole.attend(layer, k_new, v_new, step)
