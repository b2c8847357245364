"""InfiniGen: the selection math on hand-made cases, skewing, and dense equivalence at 100% budget."""

from __future__ import annotations

import math

import pytest
import torch

from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.kvcache import Measurement
from infinisim.executor.loaders import load_model
from infinisim.executor.model import apply_rope
from infinisim.executor.policies import InfiniGen, Oracle, Resident, make_policy
from infinisim.executor.policies.fetching import SelectedRows
from infinisim.executor.selection import (
    alpha_counts_per_kv_head,
    budget_tokens,
    counts_within_alpha,
    fetch_counts,
    gap_histogram,
    group_scores,
    kept,
    partial_columns,
    rope_skew,
    score_gaps,
    select_top,
    skew_matrix,
    turned,
)

NEG = float("-inf")


def test_counts_within_alpha_hand_made():
    scores = torch.tensor([[[10.0, 9.5, 7.0, 2.0, NEG], [1.0, 1.0, 1.0, 1.0, 1.0]]])  # [B=1, H=2, L=5]
    per_head = counts_within_alpha(gap_histogram(score_gaps(scores), 2), (1, 4, 9))  # a KV head per query head
    assert per_head.tolist() == [[[2, 3, 4], [5, 5, 5]]]  # -inf (padding) is never counted
    grouped = counts_within_alpha(gap_histogram(score_gaps(scores), 1), (1, 4, 9))  # one KV head: summed
    assert grouped.tolist() == [[[7, 8, 9]]]


def test_fetch_counts_average_heads_and_cap():
    scores = torch.tensor([[[10.0, 9.5, 7.0, 2.0], [5.0, 5.0, 5.0, 5.0]],
                           [[3.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]])
    # sequence 0: heads count 2 and 4 within alpha=1 -> mean 3; sequence 1: 1 and 1 -> 1
    assert fetch_counts(scores, 1.0, [10, 10]) == [3, 1]
    assert fetch_counts(scores, 1.0, [2, 10]) == [2, 1]
    assert fetch_counts(scores, 2.5, [10, 10]) == [3, 1]  # 7.0 is 3 below: 2 and 4
    assert budget_tokens(0.2, torch.tensor([100, 7])) == [20, 2]
    assert budget_tokens(50, torch.tensor([100, 7])) == [50, 7]


def test_select_top_says_every_row_kept_when_counts_agree():
    kv_scores = torch.tensor([[[0.1, 0.9, 0.5, 0.7]], [[0.3, 0.0, 0.8, 0.6]]])  # [B=2, G=1, L=4]
    valid = torch.ones(2, 4, dtype=torch.bool)
    indices, keep = select_top(kv_scores, [2, 2], valid, all_valid=True)
    assert keep is None and kept(keep, indices).shape == (2, 1, 2) and bool(kept(keep, indices).all())
    assert [set(row[0].tolist()) for row in indices] == [{1, 3}, {2, 3}]
    indices, keep = select_top(kv_scores, [2, 1], valid, all_valid=True)  # counts differ: a mask
    assert keep[1, 0].tolist() == [True, False] and indices[1, 0, 0] == 2


def test_select_top_per_sequence_counts_and_padding():
    kv_scores = torch.tensor([[[0.1, 0.9, 0.5, 0.7]], [[0.0, 0.0, 0.8, 0.6]]])  # [B=2, G=1, L=4]
    valid = torch.tensor([[True, True, True, True], [False, False, True, True]])
    indices, keep = select_top(kv_scores, [2, 3], valid)
    assert indices.shape == (2, 1, 3)
    assert indices[0, 0, :2].tolist() == [1, 3] and keep[0, 0].tolist() == [True, True, False]
    assert set(indices[1, 0, :2].tolist()) == {2, 3}
    assert keep[1, 0].tolist() == [True, True, False]  # the third pick is padding


def test_gqa_scores_are_per_kv_head():
    # 4 query heads, 2 KV heads: heads 0,1 like key 0; heads 2,3 like key 3
    scores = torch.full((1, 4, 4), 0.0)
    scores[0, 0:2, 0] = 8.0
    scores[0, 2:4, 3] = 8.0
    for combine in ("softmax_sum", "max"):
        grouped = group_scores(scores, 2, combine)
        assert grouped.shape == (1, 2, 4)
        assert grouped[0, 0].argmax() == 0 and grouped[0, 1].argmax() == 3
    soft = group_scores(scores, 2, "softmax_sum")
    assert torch.allclose(soft.sum(-1), torch.full((1, 2), 2.0))  # two distributions per group


def test_skew_is_orthogonal_keeps_qk_and_concentrates():
    gen = torch.Generator().manual_seed(0)
    d = 32
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    scales = torch.logspace(1, -2, d)
    q = (torch.randn(500, d, generator=gen) * scales) @ basis.T  # energy in a few hidden directions
    k = (torch.randn(400, d, generator=gen) * scales) @ basis.T
    a = skew_matrix(q, k)
    assert torch.allclose(a @ a.T, torch.eye(d), atol=1e-5)
    assert torch.allclose((q @ a) @ (k @ a).T, q @ k.T, atol=1e-3)
    r = 6
    mass = lambda m, cols: m.abs()[:, cols].sum() / m.abs().sum()  # noqa: E731
    assert mass(q @ a, partial_columns(q @ a, r)) > mass(q, partial_columns(q, r)) + 0.2


def _forced_logits(model, prompts, conts, policy):
    gen = generate(model, prompts, policy, SamplingConfig(len(conts[0])),
                   measure=Measurement(forced=conts, keep_logits=True))
    return torch.stack(gen.logits)


@pytest.mark.parametrize("name", ["infinigen", "oracle"])
def test_full_budget_equals_dense_smollm2(smollm2, pg19_text, name):
    ids = smollm2.tokenizer.encode(pg19_text[:8000]).ids
    prompts, conts = [ids[:300], ids[400:520]], [ids[300:310], ids[520:530]]  # padded batch
    dense = _forced_logits(smollm2.model, prompts, conts, Resident())
    policy = make_policy(name, budget=1.0, alpha=1000.0)
    ours = _forced_logits(smollm2.model, prompts, conts, policy)
    assert ((ours - dense).norm() / dense.norm()).item() <= 1e-4


def test_full_budget_equals_dense_random_opt():
    loaded = load_model("opt-125m", "float32", "cpu", random_weights=True)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50000, (90,), generator=gen).tolist()]
    conts = [torch.randint(0, 50000, (8,), generator=gen).tolist()]
    dense = _forced_logits(loaded.model, prompts, conts, Resident())
    policy = InfiniGen(budget=1.0, alpha=1000.0)
    ours = _forced_logits(loaded.model, prompts, conts, policy)
    assert policy.partial_wq  # OPT: the rotation is folded into a partial query weight
    assert ((ours - dense).norm() / dense.norm()).item() <= 1e-4


def test_selects_per_kv_head_with_budget(smollm2, pg19_text, monkeypatch):
    spec = smollm2.model.spec
    ids = smollm2.tokenizer.encode(pg19_text[:8000]).ids
    seen = []
    original = InfiniGen.fetch

    def spy(self, layer, indices, keep, step):
        seen.append((layer, step.start, indices.clone(), kept(keep, indices).clone()))
        return original(self, layer, indices, keep, step)

    monkeypatch.setattr(InfiniGen, "fetch", spy)
    gen = generate(smollm2.model, [ids[:500]], InfiniGen(budget=0.1, dense_layers=1),
                   SamplingConfig(4, stop_at_eos=False), measure=Measurement(alpha_counts_every=1))
    assert {layer for layer, *_ in seen} == set(range(1, spec.n_layers))
    differ = 0
    for _, start, indices, keep in seen:
        assert indices.shape[1] == spec.n_kv_heads
        assert int(keep.sum(-1).max()) <= math.ceil(0.1 * start)
        heads = [set(indices[0, g][keep[0, g]].tolist()) for g in range(spec.n_kv_heads)]
        differ += heads[0] != heads[1] or heads[1] != heads[2]
    assert differ > len(seen) // 2  # KV heads choose their own tokens
    counts = gen.steps[2].times.layer_counts
    assert counts[0]["tokens_fetched"] == 501 and counts[5]["tokens_fetched"] <= 51
    alpha_counts = torch.tensor(counts[5]["alpha_counts"]).view(spec.n_kv_heads, 9)
    assert (alpha_counts.diff(dim=1) >= 0).all() and alpha_counts[:, -1].max() <= 501


def test_cpu_without_a_link_gathers_the_chosen_rows_into_the_slot(smollm2, pg19_text, monkeypatch):
    """One memory: the slot a speculating layer attends holds the host cache's chosen rows, gathered
    there directly (no staging, no copy); the dense layer attends the host cache in place."""
    ids = smollm2.tokenizer.encode(pg19_text[:8000]).ids
    checked = []
    original = SelectedRows.attend

    def spy(self, layer, q, k_new, v_new, step):
        fetched = self.pending[layer]
        k, v, keep = original(self, layer, q, k_new, v_new, step)
        n = fetched.indices.shape[-1]
        for cache, got in ((self.host.k[layer], k), (self.host.v[layer], v)):
            rows = cache.gather(2, fetched.indices[..., None].expand(-1, -1, -1, cache.shape[-1]))
            assert torch.equal(got[:, :, :n], rows)
        assert torch.equal(k[:, :, n:], k_new) and torch.equal(v[:, :, n:], v_new)
        checked.append(layer)
        return k, v, keep

    monkeypatch.setattr(SelectedRows, "attend", spy)
    policy = InfiniGen(budget=0.1, dense_layers=1)
    gen = generate(smollm2.model, [ids[:300], ids[400:520]], policy, SamplingConfig(3, stop_at_eos=False))
    assert policy.rows.copies.one_memory and not policy.rows.gathered and policy.whole.staging is None
    assert set(checked) == set(range(1, smollm2.model.spec.n_layers))
    phases, counts = gen.steps[2].times.layer_phases, gen.steps[2].times.layer_counts
    assert "h2d" not in phases[0] and phases[0]["d2h"] > 0 and counts[0]["bytes_h2d"] > 0
    assert "h2d" not in phases[5] and phases[5]["gather"] > 0


def test_oracle_captures_at_least_as_much_exact_attention(smollm2, pg19_text):
    ids = smollm2.tokenizer.encode(pg19_text[:8000]).ids
    prompts, conts = [ids[:600]], [ids[600:612]]
    dense = _forced_logits(smollm2.model, prompts, conts, Resident())
    infinigen = _forced_logits(smollm2.model, prompts, conts, InfiniGen(budget=0.1))
    oracle = _forced_logits(smollm2.model, prompts, conts, Oracle(budget=0.1))
    err = lambda x: ((x - dense).norm() / dense.norm()).item()  # noqa: E731
    assert err(oracle) < err(infinigen)


def test_knob_errors():
    for knobs, field in [({"budget": 0}, "budget"), ({"budget": 2.5}, "budget"), ({"partial_ratio": 1.5},
                         "partial_ratio"), ({"alpha": -1}, "alpha"), ({"dense_layers": 0}, "dense_layers"),
                         ({"gqa_combine": "mean"}, "gqa_combine")]:
        with pytest.raises(InfinisimError, match=field):
            make_policy("infinigen", **knobs)


def test_counts_within_alpha_equals_direct_count():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 4, 50, generator=gen) * 4
    scores[0, :, :7] = NEG
    scores[1, 2, 10] = scores[1, 2].max() - 3.0  # a gap of exactly 3 is not within alpha 3
    direct = torch.stack([((scores.max(-1, keepdim=True).values - scores) < a).sum(-1) for a in range(1, 10)], -1)
    assert torch.equal(counts_within_alpha(gap_histogram(score_gaps(scores), 4)), direct)  # [B, H, 9]
    assert torch.equal(counts_within_alpha(gap_histogram(score_gaps(scores), 2)),
                       direct.view(3, 2, 2, 9).sum(2))  # two query heads per KV head
    for alpha in range(1, 10):  # the fetch count (a comparison) is the histogram's mean over heads, rounded up
        from_histogram = (direct[..., alpha - 1].float().mean(-1)).ceil().long().clamp(min=1)
        assert fetch_counts(scores, alpha, [1000] * 3) == from_histogram.tolist()
    per_kv_head = alpha_counts_per_kv_head(scores, 2)  # the trace's counts: mean over the batch and the group
    assert torch.allclose(per_kv_head, direct.view(3, 2, 2, 9).float().mean(dim=(0, 2)))


def test_rope_then_skew_is_one_matrix():
    """Speculation for the Llama family rotates the query by RoPE, then by the skew's columns: one
    matrix per sequence and step (model.apply_rope's angles repeat over the two halves)."""
    gen = torch.Generator().manual_seed(3)
    b, g, group, d, r = 2, 3, 2, 16, 5
    q = torch.randn(b, g * group, 1, d, generator=gen)
    skew = torch.randn(g, d, r, generator=gen)
    angles = torch.tensor([[7.0], [1234.0]])[..., None] * torch.rand(d // 2, generator=gen)  # [B, 1, d/2]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    expected = apply_rope(q, cos, sin)[:, :, 0].view(b, g, group, d) @ skew[None]
    fused = q[:, :, 0].view(b, g, group, d) @ rope_skew(skew, turned(skew), cos[:, 0], sin[:, 0])
    assert torch.allclose(fused, expected, atol=1e-5)
