"""Loading: HF folders with tokenizer.json, Mistral configs, and clear errors for bad weights."""

from __future__ import annotations

import json

import pytest
import torch

from infinisim.core.errors import InfinisimError
from infinisim.executor.generate import SamplingConfig, generate, prefill_logits
from infinisim.executor.loaders import load_model
from infinisim.executor.policies import Resident


@pytest.fixture()
def tiny_llama_folder(tmp_path, smollm2):
    """A random Mistral-style checkpoint saved by transformers, with SmolLM2's tokenizer.json."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=smollm2.model.spec.vocab_size, hidden_size=64, num_hidden_layers=2,
                        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, sliding_window=None)
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    smollm2.tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path, model


def test_hf_folder_with_tokenizer_json(tiny_llama_folder, smollm2):
    folder, hf_model = tiny_llama_folder
    loaded = load_model(str(folder), "float32", "cpu")
    text = "Offloading moves the KV cache to host memory."
    assert loaded.tokenizer.encode(text).ids == smollm2.tokenizer.encode(text).ids
    ids = loaded.tokenizer.encode(text).ids
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    ours = prefill_logits(loaded.model, ids, Resident())
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-4
    assert loaded.model.spec.n_kv_heads == 2 and loaded.model.spec.family == "llama"


def test_hf_folder_errors_name_file_and_field(tiny_llama_folder):
    folder, _ = tiny_llama_folder
    weights = next(folder.glob("*.safetensors"))
    good = weights.read_bytes()

    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(InfinisimError, match=r"model\.safetensors: not a safetensors file"):
        load_model(str(folder))

    weights.write_bytes(good)
    (folder / "tokenizer.json").write_text("{")
    with pytest.raises(InfinisimError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_model(str(folder))
    (folder / "tokenizer.json").unlink()

    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(InfinisimError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight: tensor has "
                                             r"shape \((128, 64|64, 128)\), expected \((96, 64|64, 96)\)"):
        load_model(str(folder))

    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(InfinisimError, match=r"config\.json: model_type: 'gpt_neox' is not supported"):
        load_model(str(folder))

    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(InfinisimError, match=r"missing tensor model\.layers\.2"):
        load_model(str(folder))

    weights.unlink()
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InfinisimError, match=r"no \*\.safetensors weights"):
        load_model(str(folder))


def test_kv_cache_too_large_is_a_clear_error():
    loaded = load_model("smollm2-135m", "float32", "cpu", random_weights=True)
    # 64 sequences x 12,001 positions x 46 KB per position = 35 GB: more than this machine has
    with pytest.raises(InfinisimError, match=r"KV cache of 64 x 12001 positions x 30 layers needs 35\.4 GB"):
        generate(loaded.model, [[1]] * 64, Resident(), SamplingConfig(12000))


def test_unknown_names_and_dtypes():
    with pytest.raises(InfinisimError, match="unknown model 'gpt-5'"):
        load_model("gpt-5")
    with pytest.raises(InfinisimError, match="unknown dtype"):
        load_model("smollm2-135m", "int3")
