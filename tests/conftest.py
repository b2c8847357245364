"""Shared fixtures: the embedded model (ours and transformers'), the paper's prompt text, a real request trace."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import infinisim  # noqa: F401  before torch loads OpenMP: its wait (infinisim/__init__.py)

# isort: split
import torch

REPO = Path(__file__).resolve().parent.parent
PG19 = Path(os.environ.get("INFINISIM_PG19", REPO.parent / "shared" / "data" / "pg19_firstbook.txt"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    from infinisim.executor.loaders import load_model

    return load_model("smollm2-135m", "float32", "cpu")


@pytest.fixture(scope="session")
def five_layer_smollm2():
    """SmolLM2's geometry (heads, KV heads, head_dim, vocabulary) in 5 random layers: InfiniGen's three
    dense layers, then two that speculate. For tests of mechanics that do not depend on depth."""
    from dataclasses import replace

    from infinisim.executor.weights import materialize
    from infinisim.traces.spec import named_model

    return materialize(replace(named_model("smollm2-135m"), n_layers=5), None, "float32", torch.device("cpu"),
                       "random")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' LlamaForCausalLM and tokenizer on the same GGUF (the independent reference)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from infinisim.executor.loaders import embedded_gguf_path

    path = embedded_gguf_path()
    model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="session")
def pg19_text() -> str:
    if not PG19.exists():
        pytest.fail(f"{PG19} is missing: the shared data folder must sit beside the repo "
                    "(or set INFINISIM_PG19 to the file)")
    return PG19.read_text(encoding="utf-8")


AZURE_CONV = Path(os.environ.get("INFINISIM_AZURE_CONV",
                                 REPO.parent / "shared" / "data" / "azure-llm-2023" / "conv.csv"))


@pytest.fixture(scope="session")
def azure_conv() -> Path:
    """The Azure LLM inference trace (conversation service, 2023; CC-BY, see its README)."""
    if not AZURE_CONV.exists():
        pytest.fail(f"{AZURE_CONV} is missing: the shared data folder must sit beside the repo "
                    "(or set INFINISIM_AZURE_CONV to the file)")
    return AZURE_CONV
