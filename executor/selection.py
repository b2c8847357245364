"""The math of InfiniGen's speculation as pure tensor functions: skewing, column choice,
counting tokens within alpha of the max, and choosing tokens per KV head.

Shapes: B batch, H query heads, G KV heads (H = G x group), L keys, d head dim, r partial columns.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infinisim.core.policies import budget_cap

ALPHAS = tuple(range(1, 10))  # the trace records uncapped counts for each of these


def skew_matrix(q: Tensor, k: Tensor) -> Tensor:
    """Orthogonal d x d rotation that concentrates Q's (and K's) magnitude in the first columns.

    q: [N_q, d], k: [N_k, d] rows of one KV head's group. The columns are Q's right singular
    vectors, ordered by (singular value of Q) x (norm of K along that vector). Since A A^T = I,
    (Q A)(K A)^T = Q K^T: skewing never changes attention, only which columns carry it.
    """
    d = q.shape[-1]
    short = q.shape[0] < d  # fewer query rows than dimensions (a short prompt): complete the basis
    _, s_q, vh = torch.linalg.svd(q.double(), full_matrices=short)
    a = vh.transpose(0, 1)  # [d, d], columns are right singular vectors
    if short:  # directions Q never uses have singular value 0: they go last
        s_q = torch.cat([s_q, s_q.new_zeros(d - len(s_q))])
    k_strength = (k.double() @ a).norm(dim=0)
    order = torch.argsort(s_q * k_strength, descending=True)
    return a[:, order].to(q.dtype)


def turned(skew: Tensor) -> Tensor:
    """The rows of a skew [.., d, r] as RoPE's rotate_half moves them: [A[d/2:], -A[:d/2]]."""
    half = skew.shape[-2] // 2
    return torch.cat([skew[..., half:, :], -skew[..., :half, :]], dim=-2)


def rope_skew(skew: Tensor, skew_turned: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE at one position per sequence, then the skew, as one matrix: rope(q) @ A = q @ M with
    M = A cos + turned(A) sin (RoPE's angles repeat over the two halves of the head dimension).

    skew, skew_turned: [..., d, r] (e.g. [G, d, r], or [layers, G, d, r]); cos, sin: [B, d] ->
    M [B, ..., d, r], in the skew's dtype."""
    shape = (cos.shape[0], *([1] * (skew.dim() - 2)), cos.shape[1], 1)
    return (skew * cos.view(shape) + skew_turned * sin.view(shape)).to(skew.dtype)


def decode_logits(q: Tensor, keys: Tensor) -> Tensor:
    """Exact attention logits of one decode query per head over a KV head's keys, in float32.

    q: [B, H, 1, d]; keys: [B, G, L, d] -> [B, G, H/G, L] (query heads grouped by their KV head).
    """
    b, h, _, d = q.shape
    g = keys.shape[1]
    grouped = q[:, :, 0].reshape(b, g, h // g, d).float()
    return torch.einsum("bgqd,bgld->bgql", grouped, keys.float()) / math.sqrt(d)


def partial_columns(q_skewed: Tensor, r: int) -> Tensor:
    """Indices of the r columns with the largest sum of |Q'| over the rows. q_skewed: [N, d]."""
    return torch.topk(q_skewed.abs().sum(0), r).indices.sort().values


def score_gaps(scores: Tensor) -> Tensor:
    """How far each key scores below its head's best: [B, H, L] logits (scaled, -inf where a key
    is not valid) -> [B, H, L] gaps (inf where not valid)."""
    return scores.amax(dim=-1, keepdim=True) - scores


def gap_histogram(gaps: Tensor, n_kv_heads: int, top: int = max(ALPHAS)) -> Tensor:
    """Per sequence and KV head, how many (query head of its group, key) pairs lie floor(gap) = j
    below their head's best, for j = 0..top (the last bin: top or more, padding included).

    gaps: [B, H, L] from score_gaps -> [B, G, top + 1]. One pass over the gaps (a bincount) gives
    the counts at every whole alpha 1..9 (gap < a <=> floor(gap) <= a - 1), where a comparison per
    alpha would read the scores nine times.
    """
    b, h, _ = gaps.shape
    bins = gaps.clamp(max=top).to(torch.int32)  # gaps >= 0: truncation is floor; inf -> top
    cell = torch.arange(b * h, device=gaps.device, dtype=torch.int32).view(b, h) // (h // n_kv_heads)
    bins += (cell * (top + 1))[..., None]  # one range of bins per (sequence, KV head)
    return torch.bincount(bins.flatten(), minlength=b * n_kv_heads * (top + 1)).view(b, n_kv_heads, top + 1)


def counts_within_alpha(histogram: Tensor, alphas: tuple[int, ...] = ALPHAS) -> Tensor:
    """From gap_histogram: per sequence and KV head, how many (query head, key) pairs score within
    alpha of their head's max (uncapped), for whole alphas: [B, G, top + 1] -> [B, G, len(alphas)]."""
    below = histogram.cumsum(-1)  # below[..., j] = #(floor(gap) <= j)
    return below[..., [a - 1 for a in alphas]]


def alpha_counts_per_kv_head(scores: Tensor, n_kv_heads: int) -> Tensor:
    """The trace's uncapped counts: per KV head, the mean over the batch and the group's query heads
    of the keys within alpha = 1..9 of the head's best. scores: [B, H, L] -> [G, 9]."""
    b, h, _ = scores.shape
    return counts_within_alpha(gap_histogram(score_gaps(scores), n_kv_heads)).sum(0).float() / (b * (h // n_kv_heads))


def fetch_counts(scores: Tensor, alpha: float, budgets: list[int]) -> list[int]:
    """Tokens to fetch per sequence for one layer: the count of keys scoring within alpha of their
    head's best (score > best - alpha), averaged over heads, capped by the sequence's budget, at
    least 1. scores: [B, H, L] (-inf where not valid); budgets: per sequence -> per sequence.

    The count is the sum of (score - (best - alpha) > 0) as 0/1 floats, which is exact (float32
    below 2^24 per sequence) and is the comparison itself (x - y > 0 <=> x > y for floats, -inf
    and NaN giving 0): on a CPU it costs half as much as a bool comparison and an integer sum,
    and the rounding and cap in Python after the one `.tolist()` cost no more ops."""
    b, h, length = scores.shape
    above = scores - (scores.amax(dim=-1, keepdim=True) - alpha)
    exact = torch.float32 if h * length < 1 << 24 else torch.float64
    within = above.gt_(0).view(b, -1).sum(-1, dtype=exact).tolist()
    return [max(1, min(-(-int(w) // h), cap)) for w, cap in zip(within, budgets, strict=True)]  # mean, rounded up


def budget_tokens(budget: float, valid_lens: Tensor) -> list[int]:
    """The cap per sequence (`infinisim.core.policies.budget_cap` of its cached tokens): [B] -> B ints."""
    return [budget_cap(budget, n) for n in valid_lens.tolist()]


def group_scores(scores: Tensor, n_kv_heads: int, combine: str = "softmax_sum", all_rows_valid: bool = False
                 ) -> Tensor:
    """Combine the query heads that share a KV head into one score per key: [B, H, L] -> [B, G, L].

    softmax_sum: sum of each head's attention distribution (a key matters if any head of the
    group attends to it; heads with flat distributions count less). max: the largest raw score.
    all_rows_valid: every sequence has a valid key (no row is all -inf, so no softmax is NaN).
    """
    b, h, length = scores.shape
    grouped = scores.view(b, n_kv_heads, h // n_kv_heads, length)
    if combine == "softmax_sum":
        weights = torch.softmax(grouped, dim=-1)
        return (weights if all_rows_valid else weights.nan_to_num_(0.0)).sum(2)
    if combine == "max":
        return grouped.max(dim=2).values
    raise ValueError(f"unknown GQA combine {combine!r} (softmax_sum, max)")


def select_top(kv_scores: Tensor, counts: list[int], valid: Tensor, all_valid: bool = False
               ) -> tuple[Tensor, Tensor | None]:
    """Per sequence b and KV head, the counts[b] best keys.

    kv_scores: [B, G, L]; counts: B ints; valid: bool [B, L] (all_valid: every key is, so it need
    not be read). The batch fetches max(counts) rows per sequence (one shape for one copy); rows
    beyond a sequence's own count, or on padding, come back marked False in `keep`. Returns
    (indices [B, G, n], keep [B, G, n]), keep None when every row is kept (see `kept`).
    """
    n, fewest = max(counts), min(counts)
    if fewest == n and all_valid:  # every sequence keeps all n (the budget's cap binds alike): order is no matter
        return torch.topk(kv_scores, n, dim=-1, sorted=False).indices, None
    indices = torch.topk(kv_scores, n, dim=-1).indices  # best first
    keep = torch.arange(n, device=kv_scores.device) < torch.tensor(counts, device=kv_scores.device)[:, None, None]
    if all_valid:
        return indices, keep.expand_as(indices)
    return indices, keep & valid[:, None, :].expand_as(kv_scores).gather(-1, indices)


def kept(keep: Tensor | None, indices: Tensor) -> Tensor:
    """select_top's keep mask as a tensor [B, G, n], also where it says every row is kept (None)."""
    return torch.ones_like(indices, dtype=torch.bool) if keep is None else keep


def choose_rows(scores: Tensor, rank_scores: Tensor, valid: Tensor, alpha: float, budgets: list[int], n_kv_heads: int,
                combine: str = "softmax_sum", all_valid: bool = False) -> tuple[Tensor, Tensor | None]:
    """InfiniGen's count-and-choose for one layer: how many rows (tokens within alpha of the max in
    the speculated `scores` [B, H, L], averaged over heads, capped by each sequence's budget) and
    which (the top `rank_scores` per KV head). all_valid: no key is masked (padding or evicted).
    Returns select_top's (indices [B, G, n], keep [B, G, n] or None)."""
    counts = fetch_counts(scores, alpha, budgets)
    ranked = group_scores(rank_scores, n_kv_heads, combine, all_valid or bool(valid.any(-1).all()))
    return select_top(ranked, counts, valid, all_valid)
