"""The policy interface: what each layer fetches from host memory and attends over.

A policy sees every layer twice: `on_attention_start` (before the layer's attention, with the
layer's input; where a policy runs work ahead for later layers: speculation and prefetch) and
`attend_kv` (stores the layer's new K/V rows, returns what the queries attend over). Per layer
it records bytes moved and tokens fetched/attended on the step recorder, and times its own phases.
"""

from __future__ import annotations

from infinisim.executor.kvcache import PolicyContext
from infinisim.executor.model import StepState
from torch import Tensor


class Policy:
    name = ""

    def setup(self, ctx: PolicyContext) -> None:
        raise NotImplementedError

    def on_attention_start(self, layer: int, residual: Tensor, step: StepState) -> None:
        """Default: no work ahead of the layer."""

    def attend_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: StepState
                  ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def knobs(self) -> dict[str, object]:
        """The policy's settings, for the trace header."""
        return {}

    @staticmethod
    def count(step: StepState, layer: int, *, kv_len: int, fetched: int, attended: int,
              bytes_h2d: int = 0, bytes_d2h: int = 0) -> None:
        step.recorder.count(layer, kv_len=kv_len, tokens_fetched=fetched, tokens_attended=attended,
                            bytes_h2d=bytes_h2d, bytes_d2h=bytes_d2h)
