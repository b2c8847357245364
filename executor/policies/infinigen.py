"""InfiniGen: speculate, from layer i-1's input, which KV rows layer i will need; fetch only those.

Per layer (all but the first `dense_layers`, which fetch fully):
- prefill: build the skew rotation per KV head from the prompt's Q and K (post-RoPE), choose
  the partial columns, keep the partial key cache (K A)[:, cols] on the device;
- decode, at the start of layer i-1: layer i's norm and partial query on layer i-1's input, the
  approximate scores against the partial key cache, the count of tokens within alpha of each
  head's max (averaged over heads, capped by the budget), the top tokens per KV head; gather
  those rows on the host and start their copy to the device;
- decode, at layer i: wait for the prefetch, append the newest row, attend.

Skewing only shapes the speculation: attention itself runs over the unrotated rows, so the
model's output is untouched by construction (A is orthogonal, so (QA)(KA)^T = QK^T anyway).
For OPT the rotation and the column choice are folded into a partial query weight (W_q A)[:, cols];
for the Llama family RoPE sits between projection and rotation, so the speculated query is
projected, rotated by RoPE, then by A[:, cols].
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import InfiniGenKnobs, partial_width
from infinisim.executor.kvcache import PolicyContext
from infinisim.executor.model import Step
from infinisim.executor.policies.base import Policy
from infinisim.executor.policies.fetching import SelectedRows, WholeCache
from infinisim.executor.pool import HostPool
from infinisim.executor.selection import (
    alpha_counts_per_kv_head,
    budget_tokens,
    choose_rows,
    decode_logits,
    kept,
    partial_columns,
    rope_skew,
    select_top,
    skew_matrix,
    turned,
)
from infinisim.executor.weight_stream import linear_weights

NO_STREAM = nullcontext()  # reusable: a CPU's speculation runs on the caller's thread


@dataclass(frozen=True)
class CachedRows:
    """A decode step's cached rows as every layer sees them."""

    valid: Tensor  # bool [B, start]: not padding, not evicted
    budgets: list[int]  # the most rows a layer fetches, per sequence
    all_valid: bool  # no row masked: the masks need not be applied

    @classmethod
    def of(cls, valid: Tensor, budget: float) -> CachedRows:
        return cls(valid, budget_tokens(budget, valid.sum(-1)), bool(valid.all()))


class InfiniGen(Policy):
    name = "infinigen"
    knobs: InfiniGenKnobs

    def setup(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        self.knobs = replace(self.knobs, alpha=self.knobs.alpha_for(ctx.model.spec.family))  # as the trace records it
        self.whole = WholeCache(ctx, in_place=True)
        self.rows = SelectedRows(ctx, self.whole, self.knobs.max_fetch(ctx.capacity))
        self.r = partial_width(self.knobs.partial_ratio, ctx.head_dim)
        self.skew: dict[int, Tensor] = {}  # layer -> [G, d, r]: A restricted to the partial columns
        self.key_skew: dict[int, Tensor] = {}  # layer -> the same / sqrt(d): partial keys carry the score scale
        self.skew_turned: dict[int, Tensor] = {}  # layer -> turned(skew): RoPE and the skew as one matrix a step
        self.rotated: dict[int, Tensor] = {}  # this decode step's rope_skew of every Llama speculating layer
        self.stacked: tuple[list[int], Tensor | None, Tensor | None] | None = None  # their skews, stacked
        # layer -> [B, G, r, capacity] on the device: keys along the last axis, so the speculated
        # scores are one matmul streaming the cache row by row (6x faster on a CPU than [.., capacity, r])
        self.partial_keys: dict[int, Tensor] = {}
        self.partial_wq: dict[int, tuple[Tensor, Tensor | None]] = {}  # OPT: folded (W_q A)[:, cols], bias
        # Llama: W_q, bias, taken at the prefill (a streamed block's rows are on the device only while it runs)
        self.query_weights: dict[int, tuple[Tensor, Tensor | None]] = {}
        self.norms = [block.attention_norm for block in ctx.model.layers]  # looked up once, not per decode layer
        first = ctx.model.layers[0].attention
        self.heads = (first.n_heads, first.n_kv_heads, first.head_dim)  # this rank's
        pool = self.knobs.pool_capacity
        self.pool = HostPool(pool, self.knobs.eviction, ctx.batch, ctx.capacity) if pool is not None else None
        self.stored: Tensor | None = None  # this step's pool membership on the device
        self.cached: CachedRows | None = None  # this decode step's, the same for every layer
        self.spec_stream = torch.cuda.Stream(ctx.device) if ctx.device.type == "cuda" else None

    def cached_valid(self, step: Step) -> Tensor:
        """Which cached positions [0, start) can be attended: not padding, not evicted from the pool."""
        valid = step.valid[:, :step.start]
        return valid if self.stored is None else valid & self.stored[:, :step.start]

    def speculates(self, layer: int) -> bool:
        return layer >= self.knobs.dense_layers

    # ------------------------------------------------------------------ prefill

    def build_skew(self, layer: int, q: Tensor, k: Tensor, valid: Tensor) -> None:
        """Rotation, partial columns and partial key cache of one layer from the prompt."""
        b, h, t, d = q.shape
        g = k.shape[1]
        group = h // g
        q_rows = q.view(b, g, group, t, d).permute(0, 3, 1, 2, 4)[valid]  # [N, G, group, d]
        k_rows = k.permute(0, 2, 1, 3)[valid]  # [N, G, d]
        partial = []
        for head in range(g):
            qh = q_rows[:, head].reshape(-1, d).float()
            a = skew_matrix(qh, k_rows[:, head].float())
            cols = partial_columns(qh @ a, self.r)
            partial.append(a[:, cols])
        skew = torch.stack(partial).to(q.dtype)  # [G, d, r]
        self.skew[layer], self.key_skew[layer], self.skew_turned[layer] = skew, skew / math.sqrt(d), turned(skew)
        keys = torch.empty(b, g, self.r, self.ctx.capacity, dtype=q.dtype, device=q.device)
        keys[..., :t] = torch.einsum("bgtd,gdr->bgrt", k, self.key_skew[layer])
        self.partial_keys[layer] = keys
        wq, wq_bias = linear_weights(self.ctx.model.layers[layer].attention.wq)
        if self.ctx.model.spec.family != "opt":
            self.query_weights[layer] = (wq, wq_bias)
            return
        per_head = skew.repeat_interleave(group, dim=0)  # [H, d, r]
        weight = torch.einsum("hdr,hdx->hrx", per_head, wq.view(h, d, -1)).reshape(h * self.r, -1)
        bias = None if wq_bias is None else torch.einsum("hd,hdr->hr", wq_bias.view(h, d), per_head).reshape(-1)
        self.partial_wq[layer] = (weight, bias)

    def prefill_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                   ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.whole.attend(layer, k_new, v_new, step)
        if self.speculates(layer):
            with step.recorder.span(layer, "spec"):
                self.build_skew(layer, q, k_new, step.valid[:, -step.n_new:])
        return out

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        if step.n_new != 1:
            raise InfinisimError("infinigen decodes one token per step after the prefill")
        if not self.speculates(layer):
            if self.pool is None:
                return self.whole.attend(layer, k_new, v_new, step)
            stored = self.cached_valid(step)  # fetch every stored row, nothing evicted
            indices, keep = select_top(stored[:, None, :].expand(-1, self.ctx.n_kv_heads, -1).float(),
                                       stored.sum(-1).clamp(min=1).tolist(), stored)
            self.fetch(layer, indices, keep, step)
        return self.attend_prefetched(layer, q, k_new, v_new, step)

    # ------------------------------------------------------------------ decode

    def speculate(self, layer: int, residual: Tensor, step: Step) -> Tensor:
        """Approximate attention logits of `layer` for this step's query (scaled by 1/sqrt(d) through
        the partial keys; -inf where a key is not valid): [B, H, start]."""
        (h, g, d), b = self.heads, residual.shape[0]
        x = self.norms[layer](residual)  # layer i's norm on layer i-1's input
        if layer in self.partial_wq:
            weight, bias = self.partial_wq[layer]
            q_partial = F.linear(x, weight, bias).view(b, h, self.r)
        else:
            q = F.linear(x, *self.query_weights[layer]).view(b, g, h // g, d)
            q_partial = q @ self.rotated[layer]  # [B, G, H/G, r]
        keys = self.partial_keys[layer][..., :step.start]  # [B, G, r, L]
        scores = (q_partial.view(b, g, h // g, self.r) @ keys).view(b, h, step.start)  # [B, H, L]
        if scores.dtype != torch.float32:
            scores = scores.float()
        return scores if self.cached.all_valid else scores.masked_fill_(~self.cached.valid[:, None, :], float("-inf"))

    def choose(self, scores: Tensor, rank_scores: Tensor) -> tuple[Tensor, Tensor | None]:
        """How many (from the speculated `scores`) and which (by `rank_scores`) rows to fetch."""
        c = self.cached
        return choose_rows(scores, rank_scores, c.valid, self.knobs.alpha, c.budgets, self.ctx.n_kv_heads,
                           self.knobs.gqa_combine, c.all_valid)

    def record_alpha_counts(self, layer: int, scores: Tensor, step: Step) -> None:
        """Measurement for the trace, outside the timed phases: the uncapped counts at alpha 1..9 the
        simulator re-derives other alphas' shares from."""
        every = self.ctx.measure.alpha_counts_every
        if every and (step.index - 1) % every == 0:
            counts = alpha_counts_per_kv_head(scores, self.ctx.n_kv_heads)
            step.recorder.count(layer, alpha_counts=counts.flatten().tolist())

    def start_step(self, layer: int, step: Step) -> None:
        """Before the first layer of a decode step: the pool takes in last step's rows and makes
        room; which cached rows are valid, how many, and each sequence's budget, for every layer."""
        if layer != 0:
            return
        if self.pool is not None:
            self.pool.admit(step.valid, step.start)
            step.recorder.count(None, evicted=self.pool.make_room(1))
            self.stored = self.pool.stored.to(step.valid.device)
        self.cached = CachedRows.of(self.cached_valid(step), self.knobs.budget)
        if self.stacked is None:  # the Llama family's speculating layers: their skews, once, side by side
            llama = [i for i in self.skew if i not in self.partial_wq]
            self.stacked = (llama, *(torch.stack([t[i] for i in llama]) if llama else None
                                     for t in (self.skew, self.skew_turned)))
        layers, skews, turned_skews = self.stacked
        if layers:  # the new token's RoPE and every layer's skew, as one matrix per layer: one op for all layers
            cos, sin = (t[:, 0] for t in step.rope)  # [B, d]
            stacked = rope_skew(skews, turned_skews, cos, sin)  # [B, layers, G, d, r]
            self.rotated = dict(zip(layers, stacked.unbind(1), strict=True))

    def fetch(self, layer: int, indices: Tensor, keep: Tensor | None, step: Step) -> None:
        if self.pool is not None:
            self.pool.record_fetch(indices, kept(keep, indices), step.index)
        self.rows.fetch(layer, indices, keep, step)

    def on_attention_start(self, layer: int, residual: Tensor, step: Step) -> None:
        if step.prefill:
            return
        self.start_step(layer, step)
        if layer + 1 < self.ctx.n_layers and self.speculates(layer + 1):
            self.speculate_ahead(layer + 1, residual, step)

    def speculate_ahead(self, target: int, residual: Tensor, step: Step) -> None:
        """At the start of layer target-1: speculate layer `target`'s rows, start their prefetch."""
        with self.on_spec_stream(), step.recorder.span(target, "spec", self.spec_stream):
            scores = self.speculate(target, residual, step)
            indices, keep = self.choose(scores, scores)
            if indices.is_cuda:  # the host gather needs them; this waits for the spec stream only
                indices = indices.cpu()
        if self.spec_stream is not None and keep is not None:
            keep.record_stream(torch.cuda.current_stream())  # made on the spec stream, read by the compute stream
        self.record_alpha_counts(target, scores, step)
        self.fetch(target, indices, keep, step)

    def on_spec_stream(self) -> AbstractContextManager[None]:
        """CUDA: run the block on the speculation stream, after the work already issued on the
        compute stream (the residual and the partial key cache it reads). CPU: the same thread."""
        return NO_STREAM if self.spec_stream is None else self.spec_stream_block()

    @contextmanager
    def spec_stream_block(self) -> Iterator[None]:
        compute = torch.cuda.current_stream()
        self.spec_stream.wait_stream(compute)
        with torch.cuda.stream(self.spec_stream):
            yield
        compute.wait_stream(self.spec_stream)  # the choice is read by later compute kernels

    def attend_prefetched(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                          ) -> tuple[Tensor, Tensor, Tensor]:
        k, v, keep = self.rows.attend(layer, q, k_new, v_new, step)
        if self.speculates(layer):
            with step.recorder.span(layer, "attn"):
                self.partial_keys[layer][..., step.start] = (k_new @ self.key_skew[layer])[:, :, 0]  # [B, G, r]
        return k, v, keep


class Oracle(InfiniGen):
    """Measurement only: fetch as many rows as InfiniGen would, but the true top ones by exact
    attention of the layer's real query (the upper bound of any selection at that count)."""

    name = "oracle"

    def speculate_ahead(self, target: int, residual: Tensor, step: Step) -> None:
        """Only the count is speculated ahead; the rows are chosen at the layer, by exact scores."""
        with step.recorder.span(target, "spec"):
            self.speculated = self.speculate(target, residual, step)
        self.record_alpha_counts(target, self.speculated, step)

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        if step.n_new == 1 and self.speculates(layer):
            exact = exact_scores(q, self.whole.host.k[layer][:, :, :step.start], self.cached.valid)
            indices, keep = self.choose(self.speculated, exact)
            self.fetch(layer, indices, keep, step)
        return super().decode_kv(layer, q, k_new, v_new, step)


def exact_scores(q: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
    """Exact attention logits of one decode query over all cached keys: [B, H, L] (on q's device)."""
    scores = decode_logits(q, keys.to(q.device)).flatten(1, 2)
    return scores.masked_fill(~valid[:, None, :].to(q.device), float("-inf"))
