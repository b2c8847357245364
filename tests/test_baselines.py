"""H2O and INT4 against hand-computed small cases, and their behaviour in a real decode."""

from __future__ import annotations

import math

import pytest
import torch

from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.kvcache import Measurement
from infinisim.executor.policies import H2O, Int4
from infinisim.executor.policies.fetching import SelectedRows, WholeCache
from infinisim.executor.policies.h2o import accumulated_attention, keep_set
from infinisim.executor.policies.int4 import dequantize, quantize


def test_int4_packs_two_codes_per_byte_and_round_trips_a_ramp():
    x = torch.arange(16, dtype=torch.float32).view(1, 16)  # one group: min 0, scale 1
    packed, scale, low = quantize(x, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 8)
    assert packed[0, 0].item() == 0x10 and packed[0, 1].item() == 0x32  # codes (0,1) and (2,3)
    assert scale.item() == pytest.approx(1.0) and low.item() == 0.0
    assert torch.equal(dequantize(packed, scale, low, 16), x)


def test_int4_error_is_within_half_a_step():
    x = torch.randn(4, 3, 10, 64, generator=torch.Generator().manual_seed(0))
    packed, scale, low = quantize(x, 64)
    back = dequantize(packed, scale, low, 64)
    assert ((back - x).abs() <= scale / 2 + 1e-6).all()  # one group per row: scale [..., 1]
    assert scale.shape == (4, 3, 10, 1)


def test_keep_set_hand_made():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 0.0, 2.0, 3.0]]])
    positions = torch.arange(6).view(1, 1, 6)
    usable = torch.ones(1, 1, 6, dtype=torch.bool)
    kept, keep = keep_set(scores, positions, usable, torch.tensor([3]), torch.tensor([1]), newest=5)
    assert set(kept[keep].tolist()) == {5, 0, 2}  # the newest, then the two heaviest
    usable[0, 0, 0] = False  # e.g. padding: never kept however heavy
    kept, keep = keep_set(scores, positions, usable, torch.tensor([3]), torch.tensor([2]), newest=5)
    assert set(kept[keep].tolist()) == {4, 5, 2}


def test_accumulated_attention_matches_a_loop():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 5, 4, generator=gen), torch.randn(1, 1, 5, 4, generator=gen)  # 2 query heads, 1 KV
    valid = torch.tensor([[False, True, True, True, True]])  # one left pad
    expected = torch.zeros(5)
    for head in range(2):
        for t in range(1, 5):
            logits = torch.tensor([q[0, head, t] @ k[0, 0, s] / 2.0 if 1 <= s <= t else -math.inf
                                   for s in range(5)])
            expected += torch.softmax(logits, 0)
    got = accumulated_attention(q, k, valid)[0, 0]
    assert torch.allclose(got, expected, atol=1e-5)


def test_h2o_keeps_a_fixed_set_and_never_brings_evicted_tokens_back(smollm2, pg19_text, monkeypatch):
    ids = smollm2.tokenizer.encode(pg19_text[:6000]).ids[:200]
    history = []
    original = H2O.fetch

    def spy(self, layer, indices, keep, step):
        if layer == 3:
            history.append((step.start, set(indices[0, 0][keep[0, 0]].tolist())))
        return original(self, layer, indices, keep, step)

    monkeypatch.setattr(H2O, "fetch", spy)
    gen = generate(smollm2.model, [ids], H2O(budget=0.25), SamplingConfig(8, stop_at_eos=False))
    assert all(len(kept) == 50 for _, kept in history)  # 25% of the 200-token prompt, every step
    evicted: set[int] = set()
    previous: set[int] = set()
    for start, kept in history:
        assert not kept & evicted
        evicted |= previous - kept
        assert start - 1 in kept or start == history[0][0]  # last step's newest token was taken in
        previous = kept
    assert gen.steps[2].times.layer_counts[3]["bytes_h2d"] == 50 * 2 * 3 * 64 * 4


def test_int4_moves_quantized_bytes(smollm2, pg19_text):
    ids = smollm2.tokenizer.encode(pg19_text[:3000]).ids[:100]
    gen = generate(smollm2.model, [ids], Int4(), SamplingConfig(3, stop_at_eos=False))
    row = 2 * 3 * (64 // 2 + 2 * 1 * 4)  # K and V, 3 KV heads: 32 code bytes + float32 scale and minimum
    step = gen.steps[2]
    assert step.times.layer_counts[7]["bytes_h2d"] == (step.kv_len - 1) * row
    assert step.times.layer_counts[7]["bytes_d2h"] == row


class GatherH2O(H2O):
    """H2O as this project first ran it, the reference the compact block must reproduce: the whole
    cache in host memory, the kept set (in score order) gathered row by row each step."""

    def setup(self, ctx):
        super().setup(ctx)
        self.whole = WholeCache(ctx)
        self.rows = SelectedRows(ctx, self.whole, self.knobs.max_fetch(ctx.capacity))

    def prefill_kv(self, layer, q, k_new, v_new, step):
        out = self.whole.attend(layer, k_new, v_new, step)
        self.start_kept_set(layer, q, k_new, step.valid)
        return out

    def fetch(self, layer, positions, keep, step):
        self.rows.fetch(layer, positions, keep, step)

    def decode_kv(self, layer, q, k_new, v_new, step):
        positions, keep = self.kept[layer]
        self.fetch(layer, positions, keep, step)
        k, v, attended = self.rows.attend(layer, q, k_new, v_new, step)
        self.kept[layer] = self.choose_kept(layer, q, k, attended, step)[1:]
        return k, v, attended


def test_compact_h2o_matches_the_gather_version_and_moves_one_block(smollm2, pg19_text, monkeypatch):
    ids = smollm2.tokenizer.encode(pg19_text[:8000]).ids
    prompts, forced = [ids[:240], ids[300:500]], [ids[240:252], ids[500:512]]  # a padded batch of two
    seen: dict[str, dict[tuple[int, int], list[set[int]]]] = {"compact": {}, "gather": {}}
    copies = []

    def spy(kind, original):
        def fetch(self, layer, positions, keep, step):
            sets = [set(positions[b, g][keep[b, g]].tolist()) for b in range(positions.shape[0])
                    for g in range(positions.shape[1])]
            seen[kind][(step.index, layer)] = sets
            return original(self, layer, positions, keep, step)
        return fetch

    monkeypatch.setattr(H2O, "fetch", spy("compact", H2O.fetch))
    monkeypatch.setattr(GatherH2O, "fetch", spy("gather", GatherH2O.fetch))
    from infinisim.executor.kvcache import CopyEngine

    original_to_device = CopyEngine.to_device

    def count(self, dst, src, layer, rec):
        copies.append([(s.is_contiguous() or s.flatten(2).is_contiguous(), s.shape) for s in src])
        return original_to_device(self, dst, src, layer, rec)

    measure = Measurement(forced=forced, keep_logits=True)
    compact = generate(smollm2.model, prompts, H2O(budget=0.25), SamplingConfig(12), measure=measure)
    monkeypatch.setattr(CopyEngine, "to_device", count)
    blocks = generate(smollm2.model, prompts, H2O(budget=0.25), SamplingConfig(3), measure=measure)
    monkeypatch.setattr(CopyEngine, "to_device", original_to_device)
    gather = generate(smollm2.model, prompts, GatherH2O(budget=0.25), SamplingConfig(12), measure=measure)
    for ours, theirs in zip(compact.logits, gather.logits, strict=True):
        assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
    assert seen["compact"].keys() == seen["gather"].keys() and len(seen["compact"]) == 11 * 30
    assert seen["compact"] == seen["gather"]  # the same kept set at every step and layer
    n_layers = smollm2.model.spec.n_layers
    assert len(copies) == 2 * n_layers and all(len(c) == 2 for c in copies)  # per layer and step: K and V, once
    assert all(contiguous for c in copies for contiguous, _ in c)  # each one block of kept rows
    assert blocks.steps[1].times.layer_counts[0]["bytes_h2d"] == 60 * 2 * 2 * 3 * 64 * 4  # 25% of 240 kept rows
