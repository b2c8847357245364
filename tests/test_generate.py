"""Decoding through the KV policies: batching with padding, sampling, EOS, bytes moved."""

from __future__ import annotations

import pytest

from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import SamplingConfig, generate
from infinisim.executor.loaders import load_model
from infinisim.executor.policies import Full, Resident, make_policy


@pytest.fixture(scope="module")
def four_prompts(smollm2, pg19_text):
    """Four prompts of different content and different lengths."""
    ids = smollm2.tokenizer.encode(pg19_text[:20000]).ids
    return [ids[0:40], ids[500:575], ids[1200:1223], ids[2000:2061]]


@pytest.mark.slow
def test_resident_and_full_agree_and_batch_equals_alone(smollm2, four_prompts):
    cfg = SamplingConfig(max_new_tokens=32, stop_at_eos=False)
    resident = generate(smollm2.model, four_prompts, Resident(), cfg)
    full = generate(smollm2.model, four_prompts, Full(), cfg)
    assert resident.new_tokens == full.new_tokens
    assert all(len(t) == 32 for t in resident.new_tokens)
    assert len({tuple(t) for t in resident.new_tokens}) == 4  # different prompts, different continuations
    for prompt, batched in zip(four_prompts, resident.new_tokens, strict=True):
        alone = generate(smollm2.model, [prompt], Resident(), cfg)
        assert alone.new_tokens[0] == batched


def test_full_moves_whole_cache_each_step(smollm2, four_prompts):
    spec = smollm2.model.spec
    gen = generate(smollm2.model, four_prompts, Full(), SamplingConfig(max_new_tokens=4, stop_at_eos=False))
    longest = max(map(len, four_prompts))
    per_token_layer = 2 * spec.n_kv_heads * spec.head_dim * 4 * len(four_prompts)  # float32, padded batch
    for record in gen.steps:
        counts = record.times.layer_counts
        assert set(counts) == set(range(spec.n_layers))
        fetched_tokens = record.kv_len - record.n_new
        assert record.kv_len == longest + record.index
        for layer in range(spec.n_layers):
            assert counts[layer]["bytes_h2d"] == fetched_tokens * per_token_layer
            assert counts[layer]["bytes_d2h"] == record.n_new * per_token_layer
            assert counts[layer]["tokens_fetched"] == fetched_tokens
        phases = record.times.layer_phases[0]
        assert phases["attn"] > 0 and phases["ffn"] > 0 and phases["d2h"] > 0
        assert (phases.get("h2d", 0) > 0) == (record.phase == "decode")


def test_resident_moves_nothing(smollm2, four_prompts):
    gen = generate(smollm2.model, four_prompts[:2], Resident(), SamplingConfig(max_new_tokens=3))
    for record in gen.steps:
        assert all(c["bytes_h2d"] == 0 and c["bytes_d2h"] == 0 for c in record.times.layer_counts.values())


def test_temperature_sampling_is_seeded(smollm2, four_prompts):
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    a = generate(smollm2.model, four_prompts[:2], Resident(), cfg)
    b = generate(smollm2.model, four_prompts[:2], Resident(), cfg)
    c = generate(smollm2.model, four_prompts[:2], Resident(),
                 SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=8, stop_at_eos=False))
    greedy = generate(smollm2.model, four_prompts[:2], Resident(), SamplingConfig(12, stop_at_eos=False))
    assert a.new_tokens == b.new_tokens
    assert a.new_tokens != c.new_tokens or a.new_tokens != greedy.new_tokens


def test_stops_at_eos(smollm2):
    tok = smollm2.tokenizer
    chat = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    gen = generate(smollm2.model, [tok.encode(chat).ids], Resident(), SamplingConfig(max_new_tokens=64))
    tokens = gen.new_tokens[0]
    assert tokens[-1] in smollm2.model.spec.eos_token_ids
    assert len(tokens) < 64 and len(gen.steps) == len(tokens)


def test_bad_requests_are_clear_errors(smollm2):
    with pytest.raises(InfinisimError, match="unknown policy"):
        make_policy("nope")
    with pytest.raises(InfinisimError, match="at least one token"):
        generate(smollm2.model, [[1, 2], []], Resident(), SamplingConfig(2))
    with pytest.raises(InfinisimError, match="vocabulary"):
        generate(smollm2.model, [[10**6]], Resident(), SamplingConfig(2))
    with pytest.raises(InfinisimError, match="generation length"):
        SamplingConfig(0)


def test_random_weights_for_opt_and_learned_position_limit():
    loaded = load_model("opt-125m", "float32", "cpu", random_weights=True)
    gen = generate(loaded.model, [[5, 6, 7]], Full(), SamplingConfig(3, stop_at_eos=False))
    assert len(gen.new_tokens[0]) == 3
    with pytest.raises(InfinisimError, match="position table"):
        generate(loaded.model, [[5] * 2040], Resident(), SamplingConfig(20))


def test_weights_too_large_is_a_clear_error():
    with pytest.raises(InfinisimError, match=r"llama-3.1-70b weights in float32 needs 28\d\.\d GB"):
        load_model("llama-3.1-70b", "float32", "cpu", random_weights=True)
