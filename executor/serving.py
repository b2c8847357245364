"""Continuous batching for real: sequences join and leave the running batch between iterations.

Each sequence has its own KV policy instance (its cache, sized for its own prompt and output, at
its own positions), set up when its prefill runs and dropped when it finishes or is preempted. An
iteration is either one sequence's prefill (batch 1, as `generate` prefills) or one decode step of
every running sequence: embeddings, projections, FFN and head run batched over the sequences
(one weight read for all of them, which is what batching buys), and attention runs sequence by
sequence through each one's policy (`SequencePolicies`), each over its own rows, speculating and
fetching as it would alone. Greedy, every request forced to its own length (no EOS).

What to run when (admission, preemption) is decided by the caller (analysis/live_serving.py drives
the simulator's scheduler on the wall clock).

Shapes: B running sequences, H query heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from infinisim.executor.generate import prefill
from infinisim.executor.kvcache import Measurement, PolicyContext
from infinisim.executor.link import EmulatedLink
from infinisim.executor.model import Mix, Step, Transformer
from infinisim.executor.policies import Policy, make_policy
from infinisim.executor.timing import Recorder, Timings

# a live server measures timing only: per-head lists (alpha counts, quality) are a static run's
SERVING = Measurement(alpha_counts_every=0)


@dataclass
class Running:
    policy: Policy
    length: int  # rows in its cache
    last: int  # the token it generated last (the next decode step's input)
    steps: int  # forward passes so far (its prefill is 0: a decode step's index, as in `generate`)


class SequencePolicies:
    """The KV policy of a batched decode step: each sequence's own policy, on its own rows."""

    def __init__(self, seqs: list[Running], recorder: Recorder):
        self.seqs, self.recorder = seqs, recorder
        self.steps: list[Step] = []

    def on_attention_start(self, layer: int, residual: Tensor, step: Step) -> None:
        if layer == 0:  # the model has set this step's RoPE by now: each sequence's row of it
            self.steps = [Step(s.steps, s.length, 1, torch.ones(1, s.length + 1, dtype=torch.bool,
                                                                 device=residual.device),
                               s.policy, self.recorder, None if step.rope is None else
                               tuple(t[b:b + 1] for t in step.rope), prefill=False)  # type: ignore[arg-type]
                          for b, s in enumerate(self.seqs)]
        for b, (s, own) in enumerate(zip(self.seqs, self.steps, strict=True)):
            s.policy.on_attention_start(layer, residual[b:b + 1], own)

    def attend(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step, mix: Mix) -> Tensor:
        """q: [B, H, 1, d]; each sequence attends through its policy -> [B, 1, H * d]."""
        outs = [s.policy.attend(layer, q[b:b + 1], k_new[b:b + 1], v_new[b:b + 1], own, mix)
                for b, (s, own) in enumerate(zip(self.seqs, self.steps, strict=True))]
        with self.recorder.span(layer, "attn"):
            return torch.cat(outs, dim=0)


class LiveBatch:
    """The running sequences of a live server, by key, and the two things an iteration does."""

    def __init__(self, model: Transformer, policy: str, knobs: dict[str, object] | None = None,
                 link: EmulatedLink | None = None):
        self.model, self.policy, self.knobs, self.link = model, policy, knobs or {}, link
        self.device = model.tok_embeddings.weight.device
        self.running: dict[int, Running] = {}
        self.recorder = Recorder(cuda=self.device.type == "cuda", drain=link.drain if link is not None else None)
        self.settings = make_policy(policy, **self.knobs).settings()  # an unknown knob: refused before any request

    def prefill(self, key: int, tokens: list[int], capacity: int) -> tuple[int, Timings]:
        """Start sequence `key`: its own policy with room for `capacity` positions, its prompt (or,
        after a preemption, prompt and generated tokens) in one forward. Returns its next token."""
        spec = self.model.spec
        policy = make_policy(self.policy, **self.knobs)
        policy.setup(PolicyContext(spec.n_layers, 1, spec.n_kv_heads, spec.head_dim, capacity,
                                   self.model.tok_embeddings.weight.dtype, self.device, self.model, SERVING,
                                   self.link))
        n = len(tokens)
        self.recorder.begin()
        with torch.inference_mode():
            logits = prefill(self.model, torch.tensor([tokens], device=self.device),
                             torch.arange(n, device=self.device)[None],
                             torch.ones(1, capacity, dtype=torch.bool, device=self.device), policy, self.recorder)
            with self.recorder.span(None, "head"):
                token = int(logits[0, -1].argmax())
        self.running[key] = Running(policy, n, token, 1)
        return token, self.recorder.finish()

    def decode(self, keys: list[int]) -> tuple[list[int], Timings]:
        """One decode step of these running sequences, batched. Returns each one's next token."""
        seqs = [self.running[k] for k in keys]
        tokens = torch.tensor([[s.last] for s in seqs], device=self.device)
        positions = torch.tensor([[s.length] for s in seqs], device=self.device)
        policies = SequencePolicies(seqs, self.recorder)
        self.recorder.begin()
        with torch.inference_mode():
            step = Step(0, 0, 1, torch.ones(len(seqs), 1, dtype=torch.bool, device=self.device), policies,
                        self.recorder)
            logits = self.model(tokens, positions, step)
            with self.recorder.span(None, "head"):
                chosen = logits[:, -1].argmax(-1).tolist()
        for s, token in zip(seqs, chosen, strict=True):
            s.length, s.last, s.steps = s.length + 1, token, s.steps + 1
        return chosen, self.recorder.finish()

    def release(self, key: int) -> None:
        """Drop a sequence (finished, or preempted: its cache is recomputed if it comes back)."""
        self.running.pop(key, None)
