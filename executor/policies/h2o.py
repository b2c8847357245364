"""H2O (heavy-hitter oracle) as the InfiniGen paper runs it: the KV cache stays in host memory
and each step fetches a fixed-size kept set per KV head: the tokens with the largest accumulated
attention plus a window of the most recent ones. A token that leaves the set is gone for good.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infinisim.core.policies import H2OKnobs
from infinisim.executor.kvcache import PolicyContext
from infinisim.executor.model import Step
from infinisim.executor.policies.base import Policy
from infinisim.executor.policies.fetching import SelectedRows, WholeCache
from infinisim.executor.selection import budget_tokens, decode_logits

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
        self.whole = WholeCache(ctx)
        self.rows = SelectedRows(ctx, self.whole, self.knobs.max_fetch(ctx.capacity))
        self.scores = torch.zeros(ctx.n_layers, ctx.batch, ctx.n_kv_heads, ctx.capacity, dtype=torch.float32,
                                  device=ctx.device)
        self.kept: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (positions [B, G, m], keep [B, G, m])

    def prefill_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                   ) -> tuple[Tensor, Tensor, Tensor]:
        out = self.whole.attend(layer, k_new, v_new, step)
        with step.recorder.span(layer, "attn"):
            self.start_kept_set(layer, q, k_new, step.valid)
        return out

    def decode_kv(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, step: Step
                  ) -> tuple[Tensor, Tensor, Tensor]:
        positions, keep = self.kept[layer]
        self.fetch(layer, positions, keep, step)
        k, v, attended = self.rows.attend(layer, q, k_new, v_new, step)
        with step.recorder.span(layer, "attn"):
            self.update_kept_set(layer, q, k, attended, step)
        return k, v, attended

    def fetch(self, layer: int, positions: Tensor, keep: Tensor, step: Step) -> None:
        """The layer's kept set, gathered and copied to the device."""
        self.rows.fetch(layer, positions, keep, step)

    def start_kept_set(self, layer: int, q: Tensor, k: Tensor, valid: Tensor) -> None:
        t = k.shape[2]
        self.scores[layer, :, :, :t] = accumulated_attention(q, k, valid)
        lengths = valid.sum(-1)
        sizes = budget_tokens(self.knobs.budget, lengths)
        recent = (sizes.float() * self.knobs.recent_ratio).floor().long()
        positions = torch.arange(t, device=k.device).expand(*self.scores.shape[1:3], t)
        usable = valid[:, None, :].expand_as(positions)
        self.kept[layer] = keep_set(self.scores[layer, :, :, :t], positions, usable, sizes, recent, t - 1)

    def update_kept_set(self, layer: int, q: Tensor, k: Tensor, attended: Tensor, step: Step) -> None:
        """Add this step's attention to the scores, take in the newest token, evict down to the budget."""
        logits = decode_logits(q, k)
        probs = torch.softmax(logits.masked_fill(~attended[:, :, None, :], float("-inf")), -1).sum(2)  # [B, G, m+1]
        positions, keep = self.kept[layer]
        candidates = torch.cat([positions, torch.full_like(positions[..., :1], step.start)], dim=-1)
        scores = self.scores[layer]
        scores.scatter_add_(-1, candidates, probs * attended)
        sizes = keep.sum(-1).amax(-1)  # the set stays at its prefill size per sequence
        recent = (sizes.float() * self.knobs.recent_ratio).floor().long()
        self.kept[layer] = keep_set(scores.gather(-1, candidates), candidates, attended, sizes, recent, step.start)
