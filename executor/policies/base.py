"""The policy interface: what each layer fetches from host memory and attends over.

A policy sees every layer twice: `on_attention_start` (before the layer's attention, with the
layer's input; where a policy runs work ahead for later layers: speculation and prefetch) and
`attend_kv` (stores the layer's new K/V rows, returns what the queries attend over), which
hands the prefill to `prefill_kv` and a decode step to `decode_kv`; `attend`, what the model
calls, mixes the values over what `attend_kv` returned (a live server's batch of sequences,
each with its own policy, attends sequence by sequence: executor/serving.py). Per layer a policy records
bytes moved and tokens fetched/attended on the step's recorder, and times its own phases.

Names, knobs (defaults, ranges) and traits come from the registry, `infinisim.core.policies`.
"""

from __future__ import annotations

from torch import Tensor

from infinisim.core.policies import Knobs, policy
from infinisim.executor.kvcache import PolicyContext
from infinisim.executor.model import Mix, Step


def record_layer(step: Step, layer: int, *, kv_len: int, fetched: int, attended: int, bytes_h2d: int = 0,
                 bytes_d2h: int = 0) -> None:
    """What one layer moved and attended this step (the trace's per-layer counts)."""
    step.recorder.count(layer, kv_len=kv_len, tokens_fetched=fetched, tokens_attended=attended,
                        bytes_h2d=bytes_h2d, bytes_d2h=bytes_d2h)


class Policy:
    name = ""  # a key of infinisim.core.policies.POLICIES

    def __init__(self, **knobs: object):
        spec = policy(self.name)
        foreign = sorted(set(knobs) - set(spec.knob_names))
        if foreign:
            raise TypeError(f"{self.name} has no knob {foreign[0]!r} (its knobs: {', '.join(spec.knob_names)})")
        self.knobs: Knobs = spec.make_knobs(knobs)

    def setup(self, ctx: PolicyContext) -> None:
        raise NotImplementedError

    def on_attention_start(self, layer: int, residual: Tensor, step: Step) -> None:
        """Default: no work ahead of the layer."""

    def attend(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step, mix: Mix) -> Tensor:
        k, v, key_valid = self.attend_kv(layer, q, k_new, v_new, step)
        with step.recorder.span(layer, "attn"):
            return mix(q, k, v, key_valid)

    def attend_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        if step.prefill:
            return self.prefill_kv(layer, q, k_new, v_new, step)
        return self.decode_kv(layer, q, k_new, v_new, step)

    def prefill_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """The prompt's rows. Default: what a decode step does, into an empty cache."""
        return self.decode_kv(layer, q, k_new, v_new, step)

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def settings(self) -> dict[str, object]:
        """The knobs in force, for the trace header."""
        return self.knobs.to_dict()
