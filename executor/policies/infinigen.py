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
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from infinisim.core.errors import InfinisimError
from infinisim.executor.kvcache import PolicyContext
from infinisim.executor.model import StepState, apply_rope
from infinisim.executor.policies.selective import Selective
from infinisim.executor.pool import HostPool
from infinisim.executor.selection import (
    budget_tokens,
    choose_rows,
    decode_logits,
    partial_columns,
    partial_count,
    select_top,
    skew_matrix,
)
from torch import Tensor


class InfiniGen(Selective):
    name = "infinigen"

    def __init__(self, alpha: float | None = None, partial_ratio: float = 0.3, budget: float = 0.2,
                 dense_layers: int = 1, gqa_combine: str = "softmax_sum", pool_capacity: int | None = None,
                 eviction: str = "counter"):
        if not 0 < partial_ratio <= 1:
            raise InfinisimError(f"partial ratio must be in (0, 1], got {partial_ratio}", field="partial_ratio")
        if budget <= 0 or (budget > 1 and budget != int(budget)):
            raise InfinisimError(f"budget must be a fraction in (0, 1] or a whole token count, got {budget}",
                                 field="budget")
        if alpha is not None and alpha <= 0:
            raise InfinisimError(f"alpha must be positive, got {alpha}", field="alpha")
        if dense_layers < 1:
            raise InfinisimError("the first layer has no previous layer to speculate from: dense_layers >= 1",
                                 field="dense_layers")
        if gqa_combine not in ("softmax_sum", "max"):
            raise InfinisimError(f"unknown GQA combine {gqa_combine!r} (softmax_sum, max)", field="gqa_combine")
        if pool_capacity is not None:
            HostPool(pool_capacity, eviction, 1, 1)  # validates the pool knobs now, before any run
        self.alpha, self.partial_ratio, self.budget = alpha, partial_ratio, budget
        self.dense_layers, self.gqa_combine = dense_layers, gqa_combine
        self.pool_capacity, self.eviction = pool_capacity, eviction

    def knobs(self) -> dict[str, object]:
        return {"alpha": self.alpha, "partial_ratio": self.partial_ratio, "budget": self.budget,
                "dense_layers": self.dense_layers, "gqa_combine": self.gqa_combine,
                "pool_capacity": self.pool_capacity, "eviction": self.eviction}

    def setup(self, ctx: PolicyContext) -> None:
        super().setup(ctx)
        spec = ctx.model.spec
        if self.alpha is None:
            self.alpha = 4.0 if spec.family == "opt" else 5.0  # the paper's defaults
        self.r = partial_count(self.partial_ratio, ctx.head_dim)
        self.skew: dict[int, Tensor] = {}  # layer -> [G, d, r]: A restricted to the partial columns
        self.partial_keys: dict[int, Tensor] = {}  # layer -> [B, G, capacity, r] on the device
        self.partial_wq: dict[int, tuple[Tensor, Tensor | None]] = {}  # OPT: folded (W_q A)[:, cols], bias
        self.pool = HostPool(self.pool_capacity, self.eviction, ctx.batch, ctx.capacity) \
            if self.pool_capacity is not None else None
        self.stored: Tensor | None = None  # this step's pool membership on the device
        self.spec_stream = torch.cuda.Stream(ctx.device) if ctx.device.type == "cuda" else None

    def max_fetch(self, ctx: PolicyContext) -> int:
        if self.pool_capacity is not None:  # layers that do not speculate fetch every stored row
            return min(ctx.capacity, self.pool_capacity)
        return int(budget_tokens(self.budget, torch.tensor([ctx.capacity]))[0])

    def cached_valid(self, step: StepState) -> Tensor:
        """Which cached positions [0, start) can be attended: not padding, not evicted from the pool."""
        valid = step.valid[:, :step.start]
        return valid if self.stored is None else valid & self.stored[:, :step.start]

    def speculates(self, layer: int) -> bool:
        return layer >= self.dense_layers

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
        self.skew[layer] = skew
        keys = torch.empty(b, g, self.ctx.capacity, self.r, dtype=q.dtype, device=q.device)
        keys[:, :, :t] = torch.einsum("bgtd,gdr->bgtr", k, skew)
        self.partial_keys[layer] = keys
        attention = self.ctx.model.layers[layer].attention
        if self.ctx.model.spec.family == "opt":
            per_head = skew.repeat_interleave(group, dim=0)  # [H, d, r]
            wq = attention.wq.weight.view(h, d, -1)  # [H, d, hidden]
            weight = torch.einsum("hdr,hdx->hrx", per_head, wq).reshape(h * self.r, -1)
            bias = None if attention.wq.bias is None else \
                torch.einsum("hd,hdr->hr", attention.wq.bias.view(h, d), per_head).reshape(-1)
            self.partial_wq[layer] = (weight, bias)

    def attend_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: StepState
                  ) -> tuple[Tensor, Tensor, Tensor]:
        if step.start == 0:
            out = super().attend_kv(layer, q, k_new, v_new, step)
            if self.speculates(layer):
                with step.recorder.span(layer, "spec"):
                    self.build_skew(layer, q, k_new, step.valid[:, -step.n_new:])
            return out
        if step.n_new != 1:
            raise InfinisimError("infinigen decodes one token per step after the prefill")
        if not self.speculates(layer):
            if self.pool is None:
                return super().attend_kv(layer, q, k_new, v_new, step)
            stored = self.cached_valid(step)  # fetch every stored row, nothing evicted
            indices, keep = select_top(stored[:, None, :].expand(-1, self.ctx.n_kv_heads, -1).float(),
                                       stored.sum(-1).clamp(min=1), stored)
            self.fetch(layer, indices, keep, step)
        return self.attend_prefetched(layer, q, k_new, v_new, step)

    # ------------------------------------------------------------------ decode

    def speculate(self, layer: int, residual: Tensor, step: StepState) -> Tensor:
        """Approximate attention logits of `layer` for this step's query: [B, H, start]."""
        block = self.ctx.model.layers[layer]
        attention = block.attention
        b, h, g, d = residual.shape[0], attention.n_heads, attention.n_kv_heads, attention.head_dim
        x = block.attention_norm(residual)  # layer i's norm on layer i-1's input
        if layer in self.partial_wq:
            weight, bias = self.partial_wq[layer]
            q_partial = F.linear(x, weight, bias).view(b, h, self.r)
        else:
            q = attention.wq(x).view(b, 1, h, d).transpose(1, 2)
            q = apply_rope(q, *step.rope)[:, :, 0]  # [B, H, d]
            q_partial = torch.einsum("bghd,gdr->bghr", q.view(b, g, h // g, d), self.skew[layer]).reshape(b, h, -1)
        keys = self.partial_keys[layer][:, :, :step.start]  # [B, G, L, r]
        scores = torch.einsum("bghr,bglr->bghl", q_partial.view(b, g, h // g, self.r), keys)
        scores = scores.reshape(b, h, step.start).float() / math.sqrt(d)
        return scores.masked_fill(~self.cached_valid(step)[:, None, :], float("-inf"))

    def choose(self, layer: int, scores: Tensor, rank_scores: Tensor, step: StepState) -> tuple[Tensor, Tensor]:
        """How many (from the speculated `scores`) and which (by `rank_scores`) rows to fetch."""
        indices, keep, alpha_counts = choose_rows(scores, rank_scores, self.cached_valid(step), self.alpha,
                                                  self.budget, self.ctx.n_kv_heads, self.gqa_combine)
        step.recorder.count(layer, alpha_counts=alpha_counts.flatten().tolist())
        return indices, keep

    def start_step(self, layer: int, step: StepState) -> None:
        """Before the first layer of a decode step: the pool takes in last step's rows and makes room."""
        if layer != 0 or step.start == 0 or self.pool is None:
            return
        self.pool.admit(step.valid, step.start)
        step.recorder.count(None, evicted=self.pool.make_room(1))
        self.stored = self.pool.stored.to(step.valid.device)

    def fetch(self, layer: int, indices: Tensor, keep: Tensor, step: StepState) -> None:
        if self.pool is not None:
            self.pool.record_fetch(indices, keep, step.index)
        super().fetch(layer, indices, keep, step)

    def on_attention_start(self, layer: int, residual: Tensor, step: StepState) -> None:
        self.start_step(layer, step)
        target = layer + 1
        if step.start == 0 or target >= self.ctx.n_layers or not self.speculates(target):
            return
        with self.on_spec_stream(), step.recorder.span(target, "spec", self.spec_stream):
            scores = self.speculate(target, residual, step)
            indices, keep = self.choose(target, scores, scores, step)
            indices = indices.cpu()  # the host gather needs them; on CUDA this waits for the spec stream only
        if self.spec_stream is not None:
            keep.record_stream(torch.cuda.current_stream())  # made on the spec stream, read by the compute stream
        self.fetch(target, indices, keep, step)

    @contextmanager
    def on_spec_stream(self) -> Iterator[None]:
        """CUDA: run the block on the speculation stream, after the work already issued on the
        compute stream (the residual and the partial key cache it reads). CPU: the same thread."""
        if self.spec_stream is None:
            yield
            return
        compute = torch.cuda.current_stream()
        self.spec_stream.wait_stream(compute)
        with torch.cuda.stream(self.spec_stream):
            yield
        compute.wait_stream(self.spec_stream)  # the choice is read by later compute kernels

    def attend_prefetched(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: StepState
                          ) -> tuple[Tensor, Tensor, Tensor]:
        k, v, keep = self.attend_fetched(layer, q, k_new, v_new, step)
        if self.speculates(layer):
            with step.recorder.span(layer, "attn"):
                self.partial_keys[layer][:, :, step.start] = torch.einsum("bgd,gdr->bgr", k_new[:, :, 0],
                                                                          self.skew[layer])
        return k, v, keep


class Oracle(InfiniGen):
    """Measurement only: fetch as many rows as InfiniGen would, but the true top ones by exact
    attention of the layer's real query (the upper bound of any selection at that count)."""

    name = "oracle"

    def on_attention_start(self, layer: int, residual: Tensor, step: StepState) -> None:
        self.start_step(layer, step)
        target = layer + 1
        if step.start == 0 or target >= self.ctx.n_layers or not self.speculates(target):
            return
        with step.recorder.span(target, "spec"):
            self.speculated = self.speculate(target, residual, step)

    def attend_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: StepState
                  ) -> tuple[Tensor, Tensor, Tensor]:
        if step.start > 0 and step.n_new == 1 and self.speculates(layer):
            exact = exact_scores(q, self.host.k[layer][:, :, :step.start], self.cached_valid(step))
            indices, keep = self.choose(layer, self.speculated, exact, step)
            self.fetch(layer, indices, keep, step)
        return super().attend_kv(layer, q, k_new, v_new, step)


def exact_scores(q: Tensor, keys: Tensor, valid: Tensor) -> Tensor:
    """Exact attention logits of one decode query over all cached keys: [B, H, L] (on q's device)."""
    scores = decode_logits(q, keys.to(q.device)).flatten(1, 2)
    return scores.masked_fill(~valid[:, None, :].to(q.device), float("-inf"))
