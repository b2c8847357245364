"""Our forward pass against transformers' implementation of the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from infinisim.executor.generate import SamplingConfig, generate, prefill_logits
from infinisim.executor.loaders import load_model
from infinisim.executor.policies import Resident


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def test_tokenizer_matches_transformers(smollm2, hf_smollm2, pg19_text):
    _, hf_tok = hf_smollm2
    text = pg19_text[:30000]
    assert smollm2.tokenizer.encode(text).ids == hf_tok(text).input_ids
    assert smollm2.tokenizer.encode("Year 2024: 3.14159!").ids == hf_tok("Year 2024: 3.14159!").input_ids


def test_smollm2_logits_match_transformers(smollm2, hf_smollm2, pg19_text):
    hf_model, _ = hf_smollm2
    ids = smollm2.tokenizer.encode(pg19_text[:2000]).ids[:64]
    assert len(ids) == 64
    ours = prefill_logits(smollm2.model, ids, Resident())
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert rel_err(ours, ref) <= 1e-4


def test_greedy_paris(smollm2):
    ids = smollm2.tokenizer.encode("The capital of France is").ids
    out = generate(smollm2.model, [ids], Resident(), SamplingConfig(max_new_tokens=4))
    assert smollm2.tokenizer.decode(out.new_tokens[0]).startswith(" Paris")


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return math.exp(nll.item())


def test_perplexity_pg19_matches_transformers(smollm2, hf_smollm2, pg19_text):
    hf_model, _ = hf_smollm2
    ids = smollm2.tokenizer.encode(pg19_text).ids[:1024]
    assert len(ids) == 1024
    ours = perplexity(prefill_logits(smollm2.model, ids, Resident()), ids)
    with torch.no_grad():
        ref = perplexity(hf_model(torch.tensor([ids])).logits[0], ids)
    print(f"SmolLM2 perplexity on the first 1024 PG-19 tokens: ours {ours:.4f}, transformers {ref:.4f}")
    assert abs(ours - ref) / ref <= 0.005
    assert 1.0 < ours < 100.0  # a working language model on English prose


def _save_and_load(hf_model, tmp_path, dtype="float32"):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    return load_model(str(tmp_path), dtype, "cpu").model


def _compare_with_hf(hf_model, tmp_path, vocab):
    ours = _save_and_load(hf_model, tmp_path)
    ids = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    mine = prefill_logits(ours, ids, Resident())
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    return rel_err(mine, ref)


def test_opt_hf_folder_matches_transformers(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3, ffn_dim=256, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # random init leaves biases and norms at 0/1: perturb them so they are checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    assert _compare_with_hf(model, tmp_path, 1000) <= 1e-4


def test_qwen2_style_gqa_bias_matches_transformers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=3, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.5)
    ours = _save_and_load(model, tmp_path)
    assert ours.layers[0].attention.wq.bias is not None and ours.layers[0].attention.wo.bias is None
    assert _compare_with_hf(model, tmp_path, 1000) <= 1e-4


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # original context 16 so the llama3 frequency rescaling changes most frequencies at 64 positions
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                      rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = LlamaForCausalLM(cfg).eval()
    ours = _save_and_load(model, tmp_path)
    assert ours.spec.rope_scaling and ours.spec.rope_scaling["rope_type"] == "llama3"
    assert _compare_with_hf(model, tmp_path, 1000) <= 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(smollm2, dtype, pg19_text):
    half = load_model("smollm2-135m", dtype, "cpu")
    ids = smollm2.tokenizer.encode(pg19_text[:2000]).ids[:64]
    ref = prefill_logits(smollm2.model, ids, Resident())
    out = prefill_logits(half.model, ids, Resident())
    assert half.model.tok_embeddings.weight.dtype == getattr(torch, dtype)
    assert rel_err(out, ref) < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
